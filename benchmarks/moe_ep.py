"""Expert parallelism: time in dispatch/combine (all-to-all included) against expert compute, forward+backward.

Run on 2 ranks (gloo on CPU, NCCL on GPUs):

    torchrun --nproc_per_node 2 benchmarks/moe_ep.py [--repeats 5] [--shapes tiny_down_proj 1b_down_proj]

Every rank holds the same routed batch size (`tokens` per rank, different tokens on each rank) and routes top-1 over
8 experts with a random router, so about half of each rank's rows cross to the other rank. Timed, interleaved in each
repeat (A B C D E A B C D E ...), each the slowest rank's time of one forward+backward (collectives make ranks wait
for each other), then the median over repeats:
  ep_layer        MoELinear with experts sharded over the 2 ranks (AllToAllExperts)
  local_layer     the same MoELinear unsharded (LocalExperts: every rank holds all 8 experts, as in data parallelism)
  ep_dispatcher   only the dispatcher call: all-to-all out, regroup, grouped matmul of the local experts, back
  expert_compute  only the grouped matmul, on the rows this rank receives under ep=2
  exchange_only   dispatcher without the matmul: both all-to-alls and the regrouping, same payload sizes
Prints one JSON object (rank 0). On a 2-core CPU machine the two ranks share the cores: compare ratios, not times.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from llm.model.moe import MoELinear
from llm.model.router import RouterConfig
from llm.parallel import AllToAllExperts, shard_experts

SHAPES = {
    # name: (in_features, out_features, num_experts, tokens per rank)
    "tiny_down_proj": (688, 256, 8, 2048),
    "1b_down_proj": (8192, 2048, 8, 2048),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _same_width(rows: torch.Tensor, width: int) -> torch.Tensor:
    """A near-free stand-in for the experts that yields `width` columns, so the combine payload is the real one."""
    return rows[:, :width] if rows.shape[1] >= width else F.pad(rows, (0, width - rows.shape[1]))


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _sorted_assignments(layer: MoELinear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What MoELinear hands its dispatcher for top-1: rows sorted by expert, and rows per expert."""
    with torch.no_grad():
        expert = layer.router(x).argmax(-1)
    counts = torch.bincount(expert, minlength=layer.num_experts)
    return x[torch.argsort(expert, stable=True)], counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    group = dist.new_group(list(range(world)))

    result: dict = {
        "benchmark": "moe_ep",
        "date": datetime.date.today().isoformat(),
        "ranks": world,
        "backend": dist.get_backend(),
        "device": str(device.type),
        "device_name": torch.cuda.get_device_name(device) if use_cuda else _cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads_per_rank": torch.get_num_threads(),
        "dtype": "float32",
        "torch": torch.__version__,
        "top_k": 1,
        "repeats": args.repeats,
        "shapes": {},
    }
    for name in args.shapes:
        fan_in, fan_out, num_experts, tokens = SHAPES[name]
        torch.manual_seed(0)  # the same layer on every rank
        local = MoELinear(fan_in, fan_out, RouterConfig(num_experts=num_experts)).to(device)
        sharded = copy.deepcopy(local)
        shard_experts(sharded, group)
        dispatcher: AllToAllExperts = sharded.dispatcher
        gen = torch.Generator(device=device).manual_seed(1000 + rank)  # different tokens on each rank
        x = torch.randn(tokens, fan_in, device=device, generator=gen)
        upstream = torch.randn(tokens, fan_out, device=device, generator=gen)
        x_sorted, counts = _sorted_assignments(local, x)
        rows, local_counts, _ = dispatcher.dispatch(x_sorted, counts)  # what this rank's experts get under ep=2
        rows = rows.detach()

        def layer_step(layer: MoELinear) -> None:
            layer(x.detach().requires_grad_(True)).backward(upstream)

        def dispatcher_step() -> None:
            dispatcher(sharded, x_sorted.detach().requires_grad_(True), counts).backward(upstream)

        def compute_step() -> None:
            y = sharded.expert_forward(rows.detach().requires_grad_(True), local_counts)
            y.backward(torch.ones_like(y))

        def exchange_step() -> None:
            inp = x_sorted.detach().requires_grad_(True)
            received, _, state = dispatcher.dispatch(inp, counts)
            dispatcher.combine(_same_width(received, fan_out), state).backward(upstream)

        steps: dict[str, Callable[[], None]] = {
            "ep_layer": lambda: layer_step(sharded),
            "local_layer": lambda: layer_step(local),
            "ep_dispatcher": dispatcher_step,
            "expert_compute": compute_step,
            "exchange_only": exchange_step,
        }
        times: dict[str, list[float]] = {k: [] for k in steps}
        for rep in range(args.repeats + 1):  # round 0 warms up
            for key, step in steps.items():
                dist.barrier(group)
                _sync(device)
                start = time.perf_counter()
                step()
                _sync(device)
                elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=device)
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=group)
                if rep:
                    times[key].append(float(elapsed))
                local.zero_grad(set_to_none=True)
                sharded.zero_grad(set_to_none=True)
        med = {k: statistics.median(v) for k, v in times.items()}

        # Bytes leaving this rank, forward + backward: my rows out and my peers' results back (forward), the
        # gradients of both in reverse (backward); the slowest (largest) rank is reported.
        own = int(counts.view(world, -1)[rank].sum())
        sent, received = int(counts.sum()) - own, rows.shape[0] - own
        moved = torch.tensor(
            [sent, received, (sent + received) * (fan_in + fan_out) * 4 / 2**20], dtype=torch.float64, device=device
        )
        dist.all_reduce(moved, op=dist.ReduceOp.MAX, group=group)
        result["shapes"][name] = {
            "in": fan_in,
            "out": fan_out,
            "experts": num_experts,
            "tokens_per_rank": tokens,
            "rows_to_peer_max": int(moved[0]),
            "rows_from_peer_max": int(moved[1]),
            "all_to_all_mib_out_per_rank_fwd_bwd": round(float(moved[2]), 2),
            "median_s": {k: round(v, 5) for k, v in med.items()},
            "exchange_over_expert_compute": round(med["exchange_only"] / med["expert_compute"], 3),
            "dispatcher_overhead_share": round(1 - med["expert_compute"] / med["ep_dispatcher"], 3),
            "ep_layer_over_local_layer": round(med["ep_layer"] / med["local_layer"], 3),
        }
    if rank == 0:
        print(json.dumps(result, indent=2), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
