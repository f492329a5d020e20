"""What --eval_tasks costs (issue 23): the wall time of the tiny preset's run (launch/pretrain_llama.sh, the real
launcher, 60 iterations, validations at 20, 40 and 60) without and with zero-shot evaluation of the live model at
the default --eval_limit, interleaved repeats. Prints JSON; the target is at most 1.10x.

    .venv/bin/python benchmarks/live_eval.py [--tasks arc_easy,piqa llama] [--repeats 2] [--nproc 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(out: Path, nproc: int, extra: list[str]) -> float:
    env = {**os.environ, "NPROC": str(nproc), "SIZE": "tiny"}
    cmd = ["bash", "launch/pretrain_llama.sh", "parameternet", "--output_dir", str(out), "--progress_bar", "false"]
    start = time.perf_counter()
    subprocess.run([*cmd, *extra], cwd=REPO, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["arc_easy,piqa", "llama"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args()
    variants = {"none": [], **{tasks: ["--eval_tasks", tasks] for tasks in args.tasks}}
    times: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for name, extra in variants.items():
                out = Path(tmp) / f"{len(times[name])}-{name.replace(',', '-')}-{repeat}"
                times[name].append(run(out, args.nproc, extra))
    base = statistics.median(times["none"])
    result = {
        "run": f"tiny preset, parameternet-llama-tiny, 60 iterations, {args.nproc} ranks, eval_limit default (20)",
        "median_s": {name: round(statistics.median(ts), 2) for name, ts in times.items()},
        "all_s": {name: [round(t, 2) for t in ts] for name, ts in times.items()},
        "wall_time_vs_none": {name: round(statistics.median(ts) / base, 3) for name, ts in times.items()},
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
