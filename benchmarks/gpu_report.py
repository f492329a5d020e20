"""The GPU suite's records: one JSON line per step beside its target, and a summary computed from whatever lines
exist - so a suite cut short (a killed step, a window that ran out) still yields every figure it reached.

    python -m benchmarks.gpu_report summary OUT/gpu_suite.jsonl [--append]
        the targets met or not, the steps that failed or were skipped, and ParameterNet-1B's tokens/s over LLaMA-1B's
        (computed here from the two train lines, only when both exist at the same micro-batch and sequence length);
        works on a partial file (unreadable or truncated lines are counted, not fatal)
    python -m benchmarks.gpu_report step KIND OUT/gpu_suite.jsonl --rc RC --seconds S [--smoke] [--source FILE]
        gpu_suite.sh's per-step line from a step's output: KIND gpu_tests (FILE: pytest's JUnit XML), moe_layer,
        vision (FILE: the benchmark's stdout), skipped or failed (--what: the step, --why: the reason)
The 1B training lines are written by benchmarks/gpu_train.py itself.
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

TARGETS = {"mfu_llama": 0.45, "parameternet_vs_llama_tokens_per_s": 0.9, "moe_vs_dense": 0.8}


def last_json(path: Path) -> dict[str, Any] | None:
    return last_json_text(path.read_text(errors="replace") if path.is_file() else "")


def last_json_text(text: str) -> dict[str, Any] | None:
    """The last JSON object a benchmark printed (indented or on one line), after whatever logs came before it."""
    lines = text.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith("{"):
            try:
                found = json.loads("\n".join(lines[i:]))
            except json.JSONDecodeError:
                continue
            if isinstance(found, dict):
                return found
    return None


def read_lines(path: Path) -> tuple[list[dict[str, Any]], int]:
    """(records, unreadable lines): a line cut by a kill or mixed with other output is counted and skipped."""
    records, unreadable = [], 0
    text = path.read_text(errors="replace") if path.is_file() else ""
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            unreadable += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            unreadable += 1
    return records, unreadable


def gpu_tests_fields(xml: Path) -> dict[str, Any]:
    if not xml.is_file():
        return {"note": "no JUnit report: pytest did not finish (see gpu_suite.log)"}
    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    if suite is None:
        return {"note": f"no <testsuite> in {xml}"}
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    fields: dict[str, Any] = dict(counts)
    fields["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    fields["not_passed"] = [
        f"{case.get('classname')}::{case.get('name')}: {child.tag}"
        for case in suite.iter("testcase")
        for child in case
        if child.tag in ("failure", "error", "skipped")
    ]
    return fields


def moe_layer_fields(raw: dict[str, Any] | None) -> dict[str, Any]:
    if not raw:
        return {"note": "no JSON from benchmarks/moe_layer.py (see gpu_suite.log)"}
    shape_name, shape = next(iter(raw["shapes"].items()))
    keys = ("in", "out", "experts", "tokens", "median_s", "moe_throughput_vs_dense", "grouped_mm_kernel")
    fields = {"shape": shape_name, "dtype": raw["dtype"], "device": raw["device_name"]}
    fields.update({k: shape.get(k) for k in keys})
    fields.update(
        target=f"moe_throughput_vs_dense >= {TARGETS['moe_vs_dense']}",
        meets_target=shape["moe_throughput_vs_dense"] >= TARGETS["moe_vs_dense"],
    )
    return fields


def vision_fields(raw: dict[str, Any] | None) -> dict[str, Any]:
    if not raw:
        return {"note": "no JSON from benchmarks/vision_throughput.py (see gpu_suite.log)"}
    keys = ("train_images_per_s", "infer_images_per_s", "params_m", "gmacs")
    return {
        "device": raw["device"],
        "dtype": raw["dtype"],
        "img_size": raw["img_size"],
        "batch": raw["train_batch"],
        "models": {n: {k: m[k] for k in keys} for n, m in raw["models"].items()},
        "ratios": raw["ratios"],
        "note": "no target: reported for the record",
    }


def train_ratio(records: list[dict[str, Any]]) -> dict[str, Any]:
    """ParameterNet-1B's tokens/s over LLaMA-1B's from the suite's two train lines (the last of each model)."""
    latest: dict[str, dict[str, Any]] = {}
    for r in records:
        if r.get("step") == "train" and r.get("tokens_per_s") is not None:
            latest["parameternet" if str(r.get("model", "")).startswith("parameternet") else "llama"] = r
    if len(latest) < 2:
        missing = sorted({"llama", "parameternet"} - set(latest))
        return {"note": f"no ratio: no tokens/s of {' and '.join(missing)} in the file"}
    llama, pnet = latest["llama"], latest["parameternet"]
    setting = ("micro_batch_size", "seq_len", "activation_checkpointing")
    differ = [k for k in setting if llama.get(k) != pnet.get(k)]
    if differ:
        pairs = ", ".join(f"{k} {llama.get(k)} vs {pnet.get(k)}" for k in differ)
        return {"note": f"no ratio: the two runs differ in {pairs} (an out-of-memory retry halved one)"}
    ratio = round(pnet["tokens_per_s"] / llama["tokens_per_s"], 3)
    target = TARGETS["parameternet_vs_llama_tokens_per_s"]
    return {
        "parameternet_vs_llama_tokens_per_s": ratio,
        "micro_batch_size": llama["micro_batch_size"],
        "target": f">= {target}x the vanilla twin's tokens/s",
        "meets_target": ratio >= target,
    }


def summary(path: Path) -> dict[str, Any]:
    records, unreadable = read_lines(path)
    steps = [r for r in records if r.get("suite") == "gpu_suite" and r.get("step") != "summary"]
    record: dict[str, Any] = {"suite": "gpu_suite", "step": "summary", "rc": 0, "lines": len(steps)}
    if unreadable:
        record["unreadable_lines"] = unreadable
    if any(r.get("smoke") for r in steps):
        record["smoke"] = True  # a CPU run of the plumbing: not a figure of any GPU
    ratio = train_ratio(steps)
    record["ratio"] = ratio
    targets = {
        r["step"] + (f":{r['model']}" if "model" in r else ""): r.get("meets_target") for r in steps if "target" in r
    }
    if "meets_target" in ratio:
        targets["parameternet_vs_llama_tokens_per_s"] = ratio["meets_target"]
    record["targets"] = targets
    record["failed_steps"] = [
        r["step"] + (f":{r['model']}" if "model" in r else "")
        for r in steps
        if r.get("rc", 0) not in (0, None) and r.get("step") not in ("skipped", "preflight_mismatch")
    ]
    record["skipped_steps"] = [f"{r.get('what')}: {r.get('why')}" for r in steps if r.get("step") == "skipped"]
    record["mismatches"] = sum(1 for r in steps if r.get("step") == "preflight_mismatch")
    return record


def emit(record: dict[str, Any], jsonl: Path | None) -> None:
    line = json.dumps(record)
    print(line)
    if jsonl is not None:
        with jsonl.open("a") as f:
            f.write(line + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_report", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("summary", help="targets, failures and the ParameterNet/LLaMA ratio from a (partial) file")
    s.add_argument("jsonl", type=Path)
    s.add_argument("--append", action="store_true", help="also append the summary line to the file")
    t = sub.add_parser("step", help="gpu_suite.sh's line for one step")
    t.add_argument("kind", choices=("gpu_tests", "moe_layer", "vision", "skipped", "failed"))
    t.add_argument("jsonl", type=Path)
    t.add_argument("--rc", type=int, default=0)
    t.add_argument("--seconds", type=int, default=0)
    t.add_argument("--limit", type=int, default=None, help="the step's time limit in seconds")
    t.add_argument("--smoke", action="store_true")
    t.add_argument("--source", type=Path, default=None, help="the step's output (JUnit XML for gpu_tests)")
    t.add_argument("--what", default=None, help="skipped: the step's name")
    t.add_argument("--why", default=None, help="skipped: why it did not run")
    args = parser.parse_args(argv)
    if args.command == "summary":
        emit(summary(args.jsonl), args.jsonl if args.append else None)
        return 0
    record: dict[str, Any] = {"suite": "gpu_suite", "step": args.kind, "rc": args.rc, "seconds": args.seconds}
    if args.limit is not None:
        record["limit_s"] = args.limit
        record["timed_out"] = args.rc in (124, 137)
    if args.smoke:
        record["smoke"] = True  # a CPU run of the plumbing: not a figure of any GPU
    source = args.source if args.source is not None else Path("/nonexistent")
    if args.kind == "gpu_tests":
        record.update(gpu_tests_fields(source))
    elif args.kind == "moe_layer":
        record.update(moe_layer_fields(last_json(source)))
    elif args.kind == "vision":
        record.update(vision_fields(last_json(source)))
    elif args.kind == "skipped":
        record.update(what=args.what, why=args.why)
    else:  # a step whose own program left no line of its own
        record.update(step=args.what, note=args.why)
    emit(record, args.jsonl)
    return 0


if __name__ == "__main__":
    sys.exit(main())
