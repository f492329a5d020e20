"""Images/s of ParameterNet-600M against its static twin and timm's ghostnet_100: what FLOPs parity costs in latency.

    python benchmarks/vision_throughput.py                      # 224x224, CPU, all threads
    python benchmarks/vision_throughput.py --threads 1 --rounds 7 --img-size 160
    python benchmarks/vision_throughput.py --device cuda --dtype bfloat16 --infer-batch 256 --train-batch 256 --iters 10

Inference (eval mode, no_grad) and training (train mode, forward + backward + AdamW step) are timed for every model,
interleaved model by model within each round (A B C A B C ...) so that a noisy shared machine slows all models alike;
the figures are medians over rounds. Parameters and multiply-adds (forward, batch 1, `torch.utils.flop_counter`) are
printed beside them. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import vision  # noqa: E402,F401  (registers the models)
from vision.summary import count_macs, count_params  # noqa: E402

DEFAULT_MODELS = ("parameternet_600m", "ghostnet_600m", "ghostnet_100")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(x: torch.Tensor, dtype: torch.dtype | None):
    # bf16 as in training: autocast with fp32 master weights (what vision.train does with precision=bf16 on GPUs).
    return torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None)


def time_inference(model: torch.nn.Module, x: torch.Tensor, iters: int, dtype: torch.dtype | None = None) -> float:
    model.eval()
    with torch.no_grad(), _autocast(x, dtype):
        _sync(x.device)
        start = time.perf_counter()
        for _ in range(iters):
            model(x)
        _sync(x.device)
        return (time.perf_counter() - start) / iters


def time_training(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    iters: int,
    dtype: torch.dtype | None = None,
) -> float:
    model.train()
    _sync(x.device)
    start = time.perf_counter()
    for _ in range(iters):
        with _autocast(x, dtype):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(x.device)
    return (time.perf_counter() - start) / iters


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--infer-batch", type=int, default=16)
    parser.add_argument("--train-batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians are reported")
    parser.add_argument("--iters", type=int, default=2, help="timed batches per model per round and mode")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16"], help="bfloat16 = autocast over fp32 weights"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    device = torch.device(args.device)
    amp = torch.bfloat16 if args.dtype == "bfloat16" else None
    models = {name: timm.create_model(name, num_classes=1000).to(device) for name in args.models}
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}
    x_inf = torch.randn(args.infer_batch, 3, args.img_size, args.img_size, device=device)
    x_train = torch.randn(args.train_batch, 3, args.img_size, args.img_size, device=device)
    y_train = torch.randint(0, 1000, (args.train_batch,), device=device)

    for name, model in models.items():  # warm-up: allocator, oneDNN/cuDNN algorithm caches
        time_inference(model, x_inf, 1, amp)
        time_training(model, optimizers[name], x_train, y_train, 1, amp)

    infer: dict[str, list[float]] = {n: [] for n in models}
    train: dict[str, list[float]] = {n: [] for n in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            infer[name].append(time_inference(model, x_inf, args.iters, amp))
            train[name].append(time_training(model, optimizers[name], x_train, y_train, args.iters, amp))

    results = {}
    for name, model in models.items():
        infer_s, train_s = statistics.median(infer[name]), statistics.median(train[name])
        results[name] = {
            "params_m": round(count_params(model) / 1e6, 3),
            "gmacs": round(count_macs(model.cpu(), args.img_size) / 1e9, 4),
            "infer_images_per_s": round(args.infer_batch / infer_s, 2),
            "train_images_per_s": round(args.train_batch / train_s, 2),
            "infer_ms_per_batch": round(1e3 * infer_s, 1),
            "train_ms_per_batch": round(1e3 * train_s, 1),
            "infer_spread": round((max(infer[name]) - min(infer[name])) / infer_s, 3),
            "train_spread": round((max(train[name]) - min(train[name])) / train_s, 3),
        }
    ratios = {}
    for dynamic, static in vision.STATIC_TWINS.items():
        if dynamic in results and static in results:
            a, b = results[dynamic], results[static]
            ratios[f"{dynamic}/{static}"] = {
                "params": round(a["params_m"] / b["params_m"], 3),
                "macs": round(a["gmacs"] / b["gmacs"], 3),
                "infer_latency": round(b["infer_images_per_s"] / a["infer_images_per_s"], 3),
                "train_step_time": round(b["train_images_per_s"] / a["train_images_per_s"], 3),
            }
    report = {
        "benchmark": "vision_throughput",
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": args.dtype,
        "cpu": cpu_name(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "threads": torch.get_num_threads(),
        "img_size": args.img_size,
        "infer_batch": args.infer_batch,
        "train_batch": args.train_batch,
        "rounds": args.rounds,
        "iters": args.iters,
        "models": results,
        "ratios": ratios,
        "note": "medians over interleaved rounds; spread = (max - min) / median over rounds; training = fwd+bwd+AdamW",
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
