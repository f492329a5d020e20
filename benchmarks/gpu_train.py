"""One 1B training-throughput step of the GPU suite: plan a micro-batch, measure, retry once at half on out-of-memory.

    python -m benchmarks.gpu_train llama --jsonl OUT/gpu_suite.jsonl --limit 110 --gpu_memory_gib 79.2

1. The micro-batch: llm/model/memory.py's planner for BOTH 1B models (ZeRO-1, bf16, one GPU, seq 2048), with 15% of
   the GPU's memory left free by the plan (its analytic activation count leaves transients out), the largest that
   both fit, capped at 16; activation checkpointing only if none fits without. Both models get the same micro-batch,
   so their tokens/s compare (benchmarks/gpu_report.py computes the ratio). If the plan fails (an error, no GPU
   memory figure), FALLBACK_MICRO_BATCH: 2, which by the same planner leaves LLaMA-1B 73% and ParameterNet-1B 45% of
   an 80 GB H100 free.
2. benchmarks/train_throughput.py in a child process (--synthetic_data --build_on_device: no corpus, no datasets, the
   model created on the GPU), within the step's limit.
3. On a CUDA out-of-memory (the child's exit 3), once more at half the micro-batch, in what is left of the limit.
One JSON line (stdout and --jsonl) with the figures, the plan and every attempt. The step is independent of the other
model's: neither reads the other's line.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.gpu_report import TARGETS, emit, last_json_text

REPO = Path(__file__).resolve().parents[1]
HEADROOM_SHARE = 0.15  # of the GPU's memory, left free by the plan
FALLBACK_MICRO_BATCH = 2
MICRO_BATCH_CAP = 16
OOM_EXIT = 3  # benchmarks/train_throughput.py's exit code on a CUDA out-of-memory
MIN_RETRY_SECONDS = 15  # a retry with less time left than this would only time out


@dataclass(frozen=True)
class Plan:
    micro_batch: int
    activation_checkpointing: bool
    source: str  # "planner", "given" or "fallback: <why>"
    largest: dict[str, int] | None = None  # per model, at HEADROOM_SHARE, without checkpointing
    planned_free_share: dict[str, float] | None = None  # per model at the chosen micro-batch: 1 - peak / GPU memory


@dataclass
class Attempt:
    micro_batch: int
    rc: int
    seconds: float
    oom: bool
    result: dict[str, Any] | None  # train_throughput.py's JSON, when it printed one


def plan_micro_batch(size: str, seq_len: int, gpu_memory_gib: float | None, cap: int = MICRO_BATCH_CAP) -> Plan:
    """The largest micro-batch both models of `size` fit with HEADROOM_SHARE of the GPU free; FALLBACK_MICRO_BATCH when
    the plan cannot be made. Never raises: a failed plan must not cost the measurement."""
    if gpu_memory_gib is None:
        return Plan(FALLBACK_MICRO_BATCH, False, "fallback: no GPU memory figure (the probe gave none)")
    try:
        from llm.model import load_model_config
        from llm.model.memory import GIB, TrainingLayout, estimate

        configs = {p: load_model_config(p) for p in (f"llama-{size}", f"parameternet-llama-{size}")}
        layout = TrainingLayout(gpus=1, zero_stage=1, precision="bf16", micro_batch=1, seq_len=seq_len)
        headroom = HEADROOM_SHARE * gpu_memory_gib
        estimates = {p: estimate(c, layout, gpu_memory_gib, headroom) for p, c in configs.items()}
        largest = {p: e.largest_micro_batch for p, e in estimates.items()}
        checkpointing = min(largest.values()) < 1
        fits = min(
            e.largest_micro_batch_checkpointing if checkpointing else e.largest_micro_batch for e in estimates.values()
        )
        if fits < 1:
            return Plan(0, False, "planner: no micro-batch fits either model's states", largest)
        micro = min(cap, fits)
        chosen = TrainingLayout(1, 1, 1, "bf16", micro, seq_len, checkpointing)
        free = {
            p: round(1 - estimate(c, chosen, gpu_memory_gib, headroom).peak / (gpu_memory_gib * GIB), 3)
            for p, c in configs.items()
        }
        return Plan(micro, checkpointing, "planner", largest, free)
    except Exception as exc:  # noqa: BLE001 - any failure of the planner falls back; the line says which
        return Plan(FALLBACK_MICRO_BATCH, False, f"fallback: the planner failed: {type(exc).__name__}: {exc}"[:300])


def run_child(command: list[str], timeout: float, log: Path) -> tuple[int, str]:
    """(exit code, stdout) of `command` in its own process group; 124 when it ran past `timeout` (the group killed)."""
    with log.open("a") as err:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=max(timeout, 1))
            return proc.returncode, out
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            return 124, out
        except KeyboardInterrupt:
            # The suite's own timeout (SIGINT) reached us first: the child, in its own session, must not outlive us
            # holding the GPU.
            os.killpg(proc.pid, signal.SIGKILL)
            raise


def measure(micro_batch: int, deadline: float, attempt: Callable[[int, float], tuple[int, str]]) -> list[Attempt]:
    """The attempts: `attempt(micro_batch, seconds left)` -> (rc, stdout); once more at half after an out-of-memory."""
    attempts: list[Attempt] = []
    while True:
        started = time.monotonic()
        rc, out = attempt(micro_batch, deadline - started)
        result = last_json_text(out)
        oom = rc == OOM_EXIT or bool(result and result.get("oom")) or "CUDA out of memory" in out
        attempts.append(Attempt(micro_batch, rc, round(time.monotonic() - started, 1), oom, result))
        retry = oom and micro_batch > 1 and len(attempts) == 1 and deadline - time.monotonic() >= MIN_RETRY_SECONDS
        if not retry:
            return attempts
        micro_batch //= 2


def record(kind: str, size: str, plan: Plan, attempts: list[Attempt], limit: float, smoke: bool) -> dict[str, Any]:
    """The step's JSON line: the figures of the last attempt that printed them, the plan and every attempt."""
    model = f"llama-{size}" if kind == "llama" else f"parameternet-llama-{size}"
    last = attempts[-1] if attempts else None
    line: dict[str, Any] = {"suite": "gpu_suite", "step": "train", "model": model}
    line["rc"] = last.rc if last else 2
    line["seconds"] = round(sum(a.seconds for a in attempts), 1)
    line["limit_s"] = limit
    if smoke:
        line["smoke"] = True  # a CPU run of the plumbing: not a figure of any GPU
    raw = last.result if last and last.rc == 0 else None
    if raw and "median_tokens_per_s" in raw:
        line["tokens_per_s"] = raw["median_tokens_per_s"][f"trainer_{kind}"]
        line.update({k: raw.get(f"{k}_{kind}") for k in ("tflops", "mfu")})
        keys = ("peak_tflops", "seq_len", "micro_batch_size", "global_batch_size", "zero_stage", "precision")
        keys += ("activation_checkpointing", "max_memory_allocated_gib", "device", "built_on", "synthetic_data")
        line.update({k: raw.get(k) for k in keys})
        if kind == "llama":
            line["target"] = f"MFU >= {TARGETS['mfu_llama']}"
            line["meets_target"] = None if line["mfu"] is None else line["mfu"] >= TARGETS["mfu_llama"]
    else:
        why = "timed out" if last and last.rc == 124 else f"exit {last.rc}" if last else "no attempt"
        line["note"] = f"no figures: {why} (see gpu_suite.log)"
    line["plan"] = asdict(plan)
    line["attempts"] = [{k: v for k, v in asdict(a).items() if k != "result"} for a in attempts]
    return line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_train", description=__doc__.splitlines()[0])
    p.add_argument("kind", choices=("llama", "parameternet"))
    p.add_argument("--jsonl", type=Path, required=True)
    p.add_argument("--log", type=Path, default=Path(os.devnull), help="where the child's stderr goes")
    p.add_argument("--limit", type=float, required=True, help="seconds for the whole step, retry included")
    p.add_argument("--gpu_memory_gib", type=float, default=None, help="the GPU's memory (the probe's line)")
    p.add_argument("--size", default="1b")
    p.add_argument("--seq_len", type=int, default=2048)
    p.add_argument("--cap", type=int, default=MICRO_BATCH_CAP)
    p.add_argument("--micro_batch", type=int, default=None, help="skip the plan: this micro-batch")
    p.add_argument("--smoke", action="store_true", help="a CPU run of the plumbing (tiny shapes): not a figure")
    p.epilog = "Flags after -- go to benchmarks/train_throughput.py (e.g. -- --rounds 3 --steps 3)."
    argv = sys.argv[1:] if argv is None else list(argv)
    train_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    deadline = time.monotonic() + args.limit
    if args.micro_batch is not None:
        plan = Plan(args.micro_batch, False, "given")
    else:
        plan = plan_micro_batch(args.size, args.seq_len, args.gpu_memory_gib, args.cap)
    attempts: list[Attempt] = []
    if plan.micro_batch >= 1:

        def attempt(micro: int, seconds_left: float) -> tuple[int, str]:
            command = [sys.executable, str(REPO / "benchmarks" / "train_throughput.py"), "--size", args.size]
            command += ["--precision", "bf16", "--seq_len", str(args.seq_len), "--zero_stage", "1", "--no_bare"]
            command += ["--micro_batch_size", str(micro), "--global_batch_size", str(micro), "--kinds", args.kind]
            command += ["--synthetic_data", "--build_on_device", *train_args]
            if plan.activation_checkpointing:
                command.append("--activation_checkpointing")
            return run_child(command, seconds_left, args.log)

        attempts = measure(plan.micro_batch, deadline, attempt)
    line = record(args.kind, args.size, plan, attempts, args.limit, args.smoke)
    if not attempts:
        line["note"] = f"not run: {plan.source}"
    emit(line, args.jsonl)
    return 0


if __name__ == "__main__":
    sys.exit(main())
