"""Data pipeline throughput against what the trainer consumes (prints JSON).

    .venv/bin/python benchmarks/data_pipeline.py [--repeat 3] [--rounds 2]

- preprocessing: `prepare_corpus` on the default corpus texts (copied `--repeat` times), tokens/s with 1 and 2
  processes;
- index build: `build_datasets` into an empty cache dir (cold) and again (warm);
- loader: samples/s and tokens/s of a DataLoader over the default corpus with `PretrainingSampler`, micro batch 8 x
  seq 256 (the tiny preset's shape), main-process loading as the trainer does;
- trainer: a plain PyTorch step of `LlamaForCausalLM(llama-tiny.json)` with AdamW at the same shape, fp32.
Loader and trainer are measured interleaved (A B A B) in one run; the shared machine is noisy, so the ratio is the
figure to read. Target: loader tokens/s >= 10x trainer tokens/s.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from llm.data import PretrainingSampler, build_datasets, ensure_default_corpus  # noqa: E402
from llm.data.corpus import shakespeare_files  # noqa: E402
from llm.data.prepare import prepare_corpus_with_stats  # noqa: E402

MICRO_BATCH, SEQ_LEN = 8, 256


def bench_prepare(tokenizer_dir: Path, work: Path, repeat: int, num_proc: int) -> dict:
    inputs = work / "inputs"
    if not inputs.exists():
        inputs.mkdir()
        for copy in range(repeat):
            for path in shakespeare_files():
                shutil.copy(path, inputs / f"{copy}_{path.name}")
    stats = prepare_corpus_with_stats(
        sorted(inputs.iterdir()), tokenizer_dir, work / f"out{num_proc}" / "c", num_proc=num_proc, show_progress=False
    )
    return {
        "num_proc": num_proc,
        "tokens": stats.tokens,
        "seconds": stats.seconds,
        "tokens_per_s": stats.tokens_per_second,
    }


def bench_loader(train, samples: int) -> dict:
    sampler = PretrainingSampler(len(train), 0, MICRO_BATCH, 0, 1)
    loader = torch.utils.data.DataLoader(train, batch_sampler=sampler, num_workers=0)
    batches = samples // MICRO_BATCH
    start = time.perf_counter()
    checksum = 0
    for _, batch in zip(range(batches), loader):
        checksum += int(batch[0, 0])
    seconds = time.perf_counter() - start
    return {"samples_per_s": batches * MICRO_BATCH / seconds, "tokens_per_s": batches * MICRO_BATCH * SEQ_LEN / seconds}


def make_trainer():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_json_file(str(REPO / "llm" / "configs" / "llama-tiny.json"))
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    return model, optimizer, config


def bench_trainer(model, optimizer, train, steps: int, offset: int) -> dict:
    batches = [
        torch.stack([torch.from_numpy(train[offset + b * MICRO_BATCH + i]) for i in range(MICRO_BATCH)])
        for b in range(steps)
    ]
    start = time.perf_counter()
    for batch in batches:
        logits = model(input_ids=batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    return {"tokens_per_s": steps * MICRO_BATCH * SEQ_LEN / seconds, "loss": loss.item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="copies of the corpus texts fed to prepare")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved loader/trainer rounds")
    parser.add_argument("--loader-samples", type=int, default=4000)
    parser.add_argument("--trainer-steps", type=int, default=6)
    args = parser.parse_args()

    corpus = ensure_default_corpus()
    result: dict = {
        "benchmark": "data_pipeline",
        "date": datetime.date.today().isoformat(),
        "command": "python " + " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "processor": platform.processor(),
        },
        "shape": {"micro_batch": MICRO_BATCH, "seq_len": SEQ_LEN, "model": "llm/configs/llama-tiny.json"},
        "corpus": {
            "prefix_name": Path(corpus.prefix).name,
            "documents": corpus.num_documents,
            "tokens": corpus.num_tokens,
        },
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        result["prepare"] = [bench_prepare(corpus.tokenizer_dir, work, args.repeat, n) for n in (1, 2, 1, 2)]

        num_samples = (args.loader_samples + args.rounds * args.trainer_steps * MICRO_BATCH, 0, 0)
        start = time.perf_counter()
        train, _, _ = build_datasets(
            [corpus.prefix],
            None,
            corpus.split,
            SEQ_LEN,
            1234,
            num_samples,
            vocab_size=corpus.vocab_size,
            cache_dir=work / "cache",
        )
        cold = time.perf_counter() - start
        start = time.perf_counter()
        train, _, _ = build_datasets(
            [corpus.prefix],
            None,
            corpus.split,
            SEQ_LEN,
            1234,
            num_samples,
            vocab_size=corpus.vocab_size,
            cache_dir=work / "cache",
        )
        result["index_build_s"] = {
            "cold": round(cold, 4),
            "warm": round(time.perf_counter() - start, 4),
            "samples": len(train),
            "samples_per_epoch": train.samples_per_epoch,
        }

    model, optimizer, _ = make_trainer()
    bench_trainer(model, optimizer, train, 1, 0)  # warm-up (allocator, autograd graph)
    rounds = []
    for r in range(args.rounds):
        loader = bench_loader(train, args.loader_samples)
        trainer = bench_trainer(
            model, optimizer, train, args.trainer_steps, args.loader_samples + r * args.trainer_steps * MICRO_BATCH
        )
        rounds.append(
            {
                "loader_tokens_per_s": round(loader["tokens_per_s"]),
                "loader_samples_per_s": round(loader["samples_per_s"], 1),
                "trainer_tokens_per_s": round(trainer["tokens_per_s"], 1),
                "ratio": round(loader["tokens_per_s"] / trainer["tokens_per_s"], 1),
            }
        )
    result["rounds"] = rounds
    prep = {n: [p["tokens_per_s"] for p in result["prepare"] if p["num_proc"] == n] for n in (1, 2)}
    result["summary"] = {
        "prepare_tokens_per_s_1proc": round(float(np.median(prep[1]))),
        "prepare_tokens_per_s_2proc": round(float(np.median(prep[2]))),
        "loader_tokens_per_s": round(float(np.median([r["loader_tokens_per_s"] for r in rounds]))),
        "loader_samples_per_s": round(float(np.median([r["loader_samples_per_s"] for r in rounds])), 1),
        "trainer_tokens_per_s": round(float(np.median([r["trainer_tokens_per_s"] for r in rounds])), 1),
        "loader_over_trainer": round(float(np.median([r["ratio"] for r in rounds])), 1),
        "target": ">= 10x",
    }
    result["summary"]["meets_target"] = result["summary"]["loader_over_trainer"] >= 10
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
