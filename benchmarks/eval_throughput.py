"""Zero-shot evaluation speed: lm-eval loglikelihood requests/s of ParameterNet-LLaMA against vanilla LLaMA (JSON).

    .venv/bin/python benchmarks/eval_throughput.py [--size tiny] [--limit 20] [--rounds 7] [--batch_size 16]

Both models (the `llama-SIZE` and `parameternet-llama-SIZE` presets, freshly initialised: speed does not depend on
the weights) answer the same loglikelihood requests - the offline HellaSwag, ARC-Easy and PIQA documents, `--limit`
of each - through lm-eval's own `HFLM.loglikelihood`, in rounds A B, B A, ... (interleaved: the shared machine is
noisy, so the ratios measured within one run are the figures to read: the median of the per-round ratios, and the
ratio of each model's fastest round, which interference from other processes affects least). The paper's claim is
that inference speed is preserved; target: ParameterNet >= 0.9x vanilla requests/s.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from evals.suite import BENCHMARKS, TASKS_DIR  # noqa: E402
from llm.data import load_tokenizer  # noqa: E402
from llm.data.corpus import ensure_default_corpus  # noqa: E402
from llm.model import build_model, load_model_config  # noqa: E402
from llm.model.flops import account  # noqa: E402

TASKS = ("hellaswag", "arc_easy", "piqa")


def build_requests(limit: int) -> list[Any]:
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    loaded = manager.load_task_or_group([BENCHMARKS[name].offline_task for name in TASKS])
    requests = []
    for task in loaded.values():
        task.build_all_requests(limit=limit)
        requests.extend(task.instances)
    return requests


def timed(lm: HFLM, requests: list[Any]) -> tuple[float, list[float]]:
    start = time.perf_counter()
    answers = lm.loglikelihood(requests, disable_tqdm=True)
    return time.perf_counter() - start, [logprob for logprob, _ in answers]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="tiny", help="preset size: llama-SIZE vs parameternet-llama-SIZE")
    p.add_argument("--limit", type=int, default=20, help="documents per task")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds per model (after one warm-up each)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    for name, value in (("--limit", args.limit), ("--rounds", args.rounds), ("--batch_size", args.batch_size)):
        if value < 1:
            p.error(f"{name} {value}: must be >= 1")

    tokenizer = load_tokenizer(ensure_default_corpus().tokenizer_dir)
    requests = build_requests(args.limit)
    names = {"llama": f"llama-{args.size}", "parameternet": f"parameternet-llama-{args.size}"}
    lms: dict[str, HFLM] = {}
    info: dict[str, dict[str, Any]] = {}
    for key, preset in names.items():
        torch.manual_seed(0)
        config = load_model_config(preset)
        model = build_model(config).eval()
        lms[key] = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size, device=args.device)
        acc = account(config)
        info[key] = {
            "preset": preset,
            "total_params": acc.total_params,
            "active_params": acc.active_params,
            "forward_flops_per_token": acc.forward_flops_per_token,
        }

    reference: dict[str, list[float]] = {}
    for key, lm in lms.items():  # warm-up (allocator, kernels), and the answers every round must reproduce
        _, reference[key] = timed(lm, requests)
    seconds: dict[str, list[float]] = {key: [] for key in lms}
    for r in range(args.rounds):
        order = list(lms) if r % 2 == 0 else list(reversed(lms))
        for key in order:
            dt, answers = timed(lms[key], requests)
            if answers != reference[key]:
                raise RuntimeError(f"{key}: loglikelihoods changed between rounds; the measurement is not sound")
            seconds[key].append(dt)

    per_round = [seconds["llama"][r] / seconds["parameternet"][r] for r in range(args.rounds)]
    # Interference from other processes only ever adds time: the fastest round of each model is its cleanest.
    best = min(seconds["llama"]) / min(seconds["parameternet"])
    result = {
        "benchmark": "eval_throughput",
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "tasks": list(TASKS),
        "docs_per_task": args.limit,
        "requests": len(requests),
        "batch_size": args.batch_size,
        "rounds": args.rounds,
        **{
            key: {
                **info[key],
                "seconds": [round(s, 3) for s in seconds[key]],
                "requests_per_s_median": round(len(requests) / statistics.median(seconds[key]), 2),
                "requests_per_s_best": round(len(requests) / min(seconds[key]), 2),
            }
            for key in lms
        },
        "ratio_parameternet_over_llama_per_round": [round(x, 3) for x in per_round],
        "ratio_parameternet_over_llama_median": round(statistics.median(per_round), 3),
        "ratio_parameternet_over_llama_best": round(best, 3),
        "target": ">= 0.9",
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
