"""Trainer throughput: our DeepSpeed trainer against a bare PyTorch loop (same model, batch, AdamW, clipping), and
ParameterNet-LLaMA against LLaMA through the trainer - all in one process, interleaved in rounds (A B C D A B C D ...),
reported as ratios of median tokens/s.

    python benchmarks/train_throughput.py [--size tiny] [--rounds 4] [--steps 3] [--precision fp32] [--zero_stage 1]
On a GPU machine (benchmarks/gpu_suite.sh runs each model in its own process, so each gets the whole GPU):
    python benchmarks/train_throughput.py --size 1b --kinds llama --precision bf16 --seq_len 2048 \
        --micro_batch_size 8 --global_batch_size 8 --no_bare [--activation_checkpointing]
The device is DeepSpeed's accelerator: CUDA where a GPU is visible, else CPU. MFU = model FLOPs per token (active
parameters and attention, llm/model/flops.py; activation-checkpointing recompute not counted) x tokens/s / peak: the
dense bf16 peak of the GPU from runtime/metrics.py (989 TFLOP/s for H100/H200 SXM), or --peak_tflops. Without a
known peak (a CPU, an unknown GPU) MFU is left out.

--synthetic_data trains on random tokens with a word-level tokenizer (throughput does not depend on the text): no
corpus build, so neither datasets nor sentencepiece is needed (the GPU suite's 1B steps). --build_on_device creates
the model on the GPU directly (no fp32 copy in host memory). A CUDA out-of-memory prints one JSON object with
"oom": true and exits 3 (benchmarks/gpu_train.py then retries at half the micro-batch).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn.functional as F

from llm.train.config import load_config
from llm.train.optim import parameter_groups, schedule
from llm.train.trainer import Trainer
from runtime.metrics import peak_flops

KINDS = ("llama", "parameternet")
OOM_EXIT = 3  # the exit code of a CUDA out-of-memory (benchmarks/gpu_train.py retries at half the micro-batch)


def synthetic_inputs(directory: Path, vocab_size: int, tokens: int, seed: int = 0) -> tuple[str, str]:
    """(shard prefix, tokenizer directory): `tokens` uniformly random ids in 64 documents, and a word-level tokenizer
    of three special tokens (its ids fit any vocab): what the trainer reads, built without datasets or sentencepiece."""
    import numpy as np
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    from llm.data.indexed_dataset import IndexedDatasetBuilder, dtype_for_vocab

    directory.mkdir(parents=True, exist_ok=True)
    prefix = directory / "synthetic_text_document"
    builder = IndexedDatasetBuilder(prefix, dtype=dtype_for_vocab(vocab_size))
    ids = np.random.default_rng(seed).integers(3, vocab_size, size=tokens, dtype=np.int64)
    for document in np.array_split(ids, 64):
        builder.add_document(document)
    builder.finalize()
    special = {"<unk>": 0, "<s>": 1, "</s>": 2}
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab=special, unk_token="<unk>")),
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
    )
    tokenizer.save_pretrained(str(directory / "tokenizer"))
    return str(prefix), str(directory / "tokenizer")


class BareLoop:
    """The same model, data and optimizer without DeepSpeed: forward, backward, clip, AdamW step."""

    def __init__(self, trainer: Trainer) -> None:
        from llm.model import build_model

        cfg = trainer.cfg
        torch.manual_seed(cfg.seed)
        self.device = torch.device(trainer.device)
        self.model = build_model(trainer.model_config, attn_implementation=cfg.attn_implementation).to(self.device)
        if cfg.precision == "bf16":
            self.model = self.model.to(torch.bfloat16)
        self.model.train()
        self.opt = torch.optim.AdamW(
            parameter_groups(self.model, cfg.weight_decay),
            lr=cfg.lr,
            betas=(cfg.adam_beta1, cfg.adam_beta2),
            eps=cfg.adam_eps,
            fused=True,
        )
        self.cfg, self.accum, self.step_no = cfg, trainer.grad_accum, 0

    def train_step(self, batches) -> None:
        for group in self.opt.param_groups:
            group["lr"] = schedule(self.cfg).lr_at(self.step_no)
        for _ in range(self.accum):
            batch = next(batches).to(self.device)
            out = self.model(input_ids=batch[:, :-1])
            loss = F.cross_entropy(out.logits.float().flatten(0, 1), batch[:, 1:].flatten())
            if getattr(out, "router_loss", None) is not None:
                loss = loss + out.router_loss
            (loss / self.accum).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step_no += 1


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--size", default="tiny")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per timed block")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--seq_len", type=int, default=256)
    p.add_argument("--micro_batch_size", type=int, default=8)
    p.add_argument("--global_batch_size", type=int, default=8)
    p.add_argument("--zero_stage", type=int, default=1)
    p.add_argument("--no_bare", action="store_true", help="skip the bare loops (e.g. 1B ParameterNet on one GPU)")
    p.add_argument(
        "--kinds",
        nargs="+",
        default=list(KINDS),
        choices=KINDS,
        help="which models to time (one per process gives each the whole GPU)",
    )
    p.add_argument("--activation_checkpointing", action="store_true")
    p.add_argument("--synthetic_data", action="store_true", help="random tokens: no corpus build, no datasets")
    p.add_argument("--build_on_device", action="store_true", help="create the model on the GPU (or CPU) directly")
    p.add_argument("--attn_implementation", default="sdpa", choices=["sdpa", "flash_attention_2", "eager"])
    p.add_argument(
        "--peak_tflops",
        type=float,
        default=None,
        help="peak FLOP/s per device for MFU, in TFLOP/s (default: the GPU's dense bf16 peak from "
        "runtime/metrics.py, e.g. 989 for H100/H200 SXM)",
    )
    args = p.parse_args()
    for name in ("rounds", "steps", "seq_len", "micro_batch_size", "global_batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name} {getattr(args, name)}: must be >= 1")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        p.error(f"--peak_tflops {args.peak_tflops}: must be > 0 (TFLOP/s per device)")

    try:
        run(args)
    except RuntimeError as err:
        # torch.OutOfMemoryError, or an allocation failing inside cuBLAS/NCCL ("CUDA error: out of memory").
        if not isinstance(err, torch.OutOfMemoryError) and "out of memory" not in str(err).lower():
            raise
        oom = {"benchmark": "train_throughput", "oom": True, "kinds": args.kinds}
        oom.update(micro_batch_size=args.micro_batch_size, error=str(err).strip().splitlines()[0][:300])
        print(json.dumps(oom))
        sys.exit(OOM_EXIT)


def run(args: argparse.Namespace) -> None:
    tmp = tempfile.mkdtemp(prefix="bench-train-")
    total_iters = (args.rounds + 1) * args.steps * 2 + 2
    data: dict[str, object] = {}
    if args.synthetic_data:
        from llm.model import load_model_config

        vocab = load_model_config(f"llama-{args.size}").vocab_size
        # Enough for every sample the run draws (the 3% validation split included), at least 2M tokens.
        needed = int(1.1 * (total_iters + 1) * args.global_batch_size * (args.seq_len + 1) / 0.969)
        prefix, tokenizer_dir = synthetic_inputs(Path(tmp) / "data", vocab, max(needed, 2_000_000))
        data = dict(data_path=[prefix], tokenizer=tokenizer_dir)
    build_device = None
    if args.build_on_device:
        build_device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
    contenders: dict[str, object] = {}
    trainers = {}
    for kind in args.kinds:
        preset = f"llama-{args.size}" if kind == "llama" else f"parameternet-llama-{args.size}"
        cfg = load_config(
            None,
            overrides=dict(
                model=preset,
                seq_len=args.seq_len,
                micro_batch_size=args.micro_batch_size,
                global_batch_size=args.global_batch_size,
                train_iters=total_iters,
                precision=args.precision,
                zero_stage=args.zero_stage,
                activation_checkpointing=args.activation_checkpointing,
                attn_implementation=args.attn_implementation,
                output_dir=os.path.join(tmp, kind),
                progress_bar=False,
                export=False,
                warmup_iters=0,
                eval_iters=0,
                **data,
            ),
        )  # timing only: no validation split needed at any seq_len
        trainer = Trainer(cfg, build_device=build_device)
        trainers[kind] = trainer
        contenders[f"trainer_{kind}"] = (trainer, trainer._batches())
        if not args.no_bare:
            contenders[f"bare_{kind}"] = (BareLoop(trainer), trainer._batches())
    tokens_per_step = args.global_batch_size * args.seq_len
    device = torch.device(next(iter(trainers.values())).device)

    def block(runner, batches) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            runner.train_step(batches)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return args.steps * tokens_per_step / (time.perf_counter() - start)

    rates: dict[str, list[float]] = {name: [] for name in contenders}
    for rnd in range(args.rounds + 1):  # round 0 warms up
        for name, (runner, batches) in contenders.items():
            rate = block(runner, batches)
            if rnd:
                rates[name].append(rate)
    med = {name: statistics.median(v) for name, v in rates.items()}
    result = {
        "benchmark": "train_throughput",
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "precision": args.precision,
        "size": args.size,
        "seq_len": args.seq_len,
        "micro_batch_size": args.micro_batch_size,
        "global_batch_size": args.global_batch_size,
        "zero_stage": args.zero_stage,
        "activation_checkpointing": args.activation_checkpointing,
        "attn_implementation": args.attn_implementation,
        "synthetic_data": args.synthetic_data,
        "built_on": build_device or "cpu",
        "rounds": args.rounds,
        "steps_per_block": args.steps,
        "median_tokens_per_s": {k: round(v, 1) for k, v in med.items()},
    }
    if len(trainers) == 2:
        result["parameternet_vs_llama_trainer"] = round(med["trainer_parameternet"] / med["trainer_llama"], 3)
    if not args.no_bare:
        for kind in trainers:
            result[f"trainer_vs_bare_{kind}"] = round(med[f"trainer_{kind}"] / med[f"bare_{kind}"], 3)
    peak = args.peak_tflops * 1e12 if args.peak_tflops is not None else peak_flops(device, args.precision)
    if device.type == "cuda":
        result["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    for kind, trainer in trainers.items():
        flops = trainer.accounting.train_flops_per_token * med[f"trainer_{kind}"]  # one device
        result[f"tflops_{kind}"] = round(flops / 1e12, 3)
        if peak is not None:
            result[f"mfu_{kind}"] = round(flops / peak, 4)
    if peak is not None:
        result["peak_tflops"] = round(peak / 1e12, 1)
    print(json.dumps(result, indent=2))
    import torch.distributed as dist

    dist.destroy_process_group()


if __name__ == "__main__":
    main()
