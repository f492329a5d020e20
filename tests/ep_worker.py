"""Expert-parallel checks on 2 ranks (gloo), launched by tests/test_expert_parallel.py with torchrun.

Every case compares expert parallelism (ep=2, experts sharded, tokens exchanged by all-to-all) with the unsharded
layer or model (ep=1) on the same weights, each rank feeding different tokens as in data parallelism:
  - outputs, losses, input gradients and replicated (router, attention, ...) gradients equal rank by rank;
  - each rank's expert-shard gradient equals the SUM over ranks of the ep=1 gradients of those experts (under ep=2 an
    expert sees both ranks' tokens; under ep=1 data parallelism the same sum appears after the all-reduce).
Rank 0 writes {case: {rank: {"errors": [...], "metrics": {...}}}} as JSON to argv[1]; pytest asserts on it.
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from llm.model import MoELinear, ParameterNetLlamaConfig, ParameterNetLlamaForCausalLM, RouterConfig
from llm.parallel import AllToAllExperts, expert_group_name, gather_experts, load_expert_shards, shard_experts

TOL = {"atol": 2e-5, "rtol": 1e-4}


class Case:
    def __init__(self) -> None:
        self.errors: list[str] = []
        self.metrics: dict[str, object] = {}

    def close(self, actual: torch.Tensor, expected: torch.Tensor, what: str, **tol) -> None:
        try:
            torch.testing.assert_close(actual, expected, **(tol or TOL))
        except AssertionError as exc:
            self.errors.append(f"{what}: {exc}")

    def check(self, condition: bool, what: str) -> None:
        if not condition:
            self.errors.append(what)


def summed(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t)
    return t


def expert_slice(t: torch.Tensor, rank: int, ep: int) -> torch.Tensor:
    n = t.shape[0] // ep
    return t[rank * n : (rank + 1) * n]


def cross_rank_rows(counts: torch.Tensor, rank: int, ep: int) -> int:
    """Assignments of this rank's tokens to experts that another rank owns."""
    return int(counts.sum() - expert_slice(counts, rank, ep).sum())


def compare_layers(case: Case, ref: MoELinear, x: torch.Tensor, upstream: torch.Tensor, group, rank: int) -> None:
    """ref (ep=1) against a sharded copy of it on the same input."""
    ep = dist.get_world_size(group)
    sharded = copy.deepcopy(ref)
    shard_experts(sharded, group)
    case.check(isinstance(sharded.dispatcher, AllToAllExperts), f"dispatcher is {sharded.dispatcher!r}")
    case.check(sharded.weight.shape[0] == ref.num_experts // ep, f"weight shape {tuple(sharded.weight.shape)}")
    case.check(torch.equal(sharded.weight, expert_slice(ref.weight, rank, ep)), "sharded weight != slice of full")
    for name, param in (("weight", sharded.weight), ("bias", sharded.bias)):
        if param is not None:
            case.check(
                param.allreduce is False and param.group_name == expert_group_name(ep),
                f"{name} not tagged as an expert parameter",
            )
    case.check(not hasattr(sharded.router.weight, "allreduce"), "router weight tagged as expert parameter")
    full = gather_experts(sharded, group)
    case.check(torch.equal(full["weight"], ref.weight.detach()), "gather_experts weight != full weight")

    results = []
    for layer in (ref, sharded):
        layer.router_loss_weights = (1.0, 1.0)  # aux + z through the graph (router.RouterLoss)
        layer.zero_grad(set_to_none=True)
        xi = x.detach().clone().requires_grad_(True)
        out = layer(xi)
        stats = layer.last_stats
        loss = (out * upstream).sum()
        loss.backward()
        grads = {n: p.grad for n, p in layer.named_parameters()}
        results.append((out.detach(), xi.grad, grads, stats))
    (out_ref, gx_ref, g_ref, s_ref), (out_ep, gx_ep, g_ep, s_ep) = results

    case.close(out_ep, out_ref, "output")
    case.close(gx_ep, gx_ref, "input gradient")
    case.close(g_ep["router.weight"], g_ref["router.weight"], "router gradient")
    case.check(torch.equal(s_ep.tokens_per_expert, s_ref.tokens_per_expert), "tokens_per_expert differ")
    case.check(torch.equal(s_ep.dropped_tokens, s_ref.dropped_tokens), "dropped_tokens differ")
    for name in ("weight", "bias"):
        if name in g_ref:
            case.check(g_ep[name] is not None, f"expert {name} gradient is None")
            if g_ep[name] is not None:
                case.close(g_ep[name], expert_slice(summed(g_ref[name]), rank, ep), f"expert {name} gradient")
    case.metrics.update(
        tokens=x.shape[0],
        cross_rank_rows=cross_rank_rows(s_ref.tokens_per_expert, rank, ep),
        dropped=int(s_ref.dropped_tokens),
        expert_grad_abs_sum=float(g_ep["weight"].abs().sum()),
    )


def case_layer(top_k: int, capacity_factor: float | None, bias: bool, group, rank: int) -> Case:
    case = Case()
    torch.manual_seed(0)  # the same layer on every rank
    ref = MoELinear(16, 8, RouterConfig(num_experts=4, top_k=top_k, capacity_factor=capacity_factor), bias=bias)
    if bias:
        torch.nn.init.normal_(ref.bias)
    gen = torch.Generator().manual_seed(100 + rank)  # different tokens, and a different number, on each rank
    tokens = (24, 40)[rank]
    x = torch.randn(tokens, 16, generator=gen)
    upstream = torch.randn(tokens, 8, generator=gen)
    compare_layers(case, ref, x, upstream, group, rank)
    return case


def case_zero_rows(target_expert: int, group, rank: int) -> Case:
    """Every token on both ranks picks `target_expert`: the other rank's experts receive no rows at all."""
    case = Case()
    torch.manual_seed(0)
    ref = MoELinear(16, 8, RouterConfig(num_experts=4, top_k=1), bias=True)
    with torch.no_grad():
        ref.router.weight.fill_(-1.0)
        ref.router.weight[target_expert] = 1.0
    gen = torch.Generator().manual_seed(300 + rank)
    x = torch.rand(12 + 4 * rank, 16, generator=gen) + 0.1  # positive: the target expert always wins
    upstream = torch.randn(x.shape[0], 8, generator=gen)
    compare_layers(case, ref, x, upstream, group, rank)
    owner = target_expert // (ref.num_experts // dist.get_world_size(group))
    case.metrics.update(owner=owner, receives_rows=rank == owner)
    return case


def case_model(top_k: int, capacity_factor: float | None, group, rank: int, mlp: bool = False) -> Case:
    """ParameterNet (MoE up_proj and down_proj) or, with `mlp`, the standard MoE (whole SwiGLU MLP experts)."""
    case = Case()
    ep = dist.get_world_size(group)
    experts = {"moe_mlp": True, "moe_projections": ["gate_proj", "up_proj", "down_proj"]} if mlp else {}
    config = ParameterNetLlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=256,
        num_experts=4,
        top_k=top_k,
        capacity_factor=capacity_factor,
        **{"moe_projections": ["up_proj", "down_proj"], **experts},
        router_z_loss_coef=0.001,
    )
    torch.manual_seed(1234)
    ref = ParameterNetLlamaForCausalLM(config)
    torch.manual_seed(1234)  # built again from the seed, as every rank of a training run does, then sharded
    model = ParameterNetLlamaForCausalLM(config)
    ref_params = dict(ref.named_parameters())
    for name, param in model.named_parameters():
        case.check(torch.equal(param, ref_params[name]), f"initial {name} differs from the seed's")
    shard_experts(model, group)
    expert_names = {
        f"{m}.{attr}"
        for m, layer in ref.moe_layers()
        for attr in layer.expert_param_names
        if attr in dict(layer.named_parameters())
    }
    for name, param in model.named_parameters():
        if name in expert_names:
            case.check(torch.equal(param, expert_slice(ref_params[name], rank, ep)), f"shard of {name}")
    full = gather_experts(model, group)
    case.check(set(full) == expert_names, f"gather_experts keys {sorted(full)}")
    for name, tensor in full.items():
        case.check(torch.equal(tensor, ref_params[name].detach()), f"gather_experts {name} != full tensor")

    gen = torch.Generator().manual_seed(200 + rank)
    input_ids = torch.randint(0, config.vocab_size, ((2, 3)[rank], 16), generator=gen)
    outputs = []
    for m in (ref, model):
        out = m(input_ids=input_ids, labels=input_ids)
        out.loss.backward()
        outputs.append(out)
    out_ref, out_ep = outputs
    case.close(out_ep.logits, out_ref.logits, "logits")
    case.close(out_ep.loss, out_ref.loss, "loss")
    case.close(out_ep.aux_loss, out_ref.aux_loss, "aux_loss")
    case.check(torch.equal(out_ep.tokens_per_expert, out_ref.tokens_per_expert), "tokens_per_expert differ")
    case.check(torch.equal(out_ep.dropped_tokens, out_ref.dropped_tokens), "dropped_tokens differ")
    for name, param in model.named_parameters():
        reference = ref_params[name].grad
        if name in expert_names:
            case.close(param.grad, expert_slice(summed(reference), rank, ep), f"gradient of {name}")
        else:
            case.close(param.grad, reference, f"gradient of {name}")
    # Resuming: every rank loaded rank 0's experts (what a one-writer checkpoint gives); restore them from full tensors.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in expert_names:
                param.fill_(float("nan"))
    load_expert_shards(model, {name: ref_params[name].detach() for name in expert_names})
    for name, param in model.named_parameters():
        if name in expert_names:
            case.check(torch.equal(param, expert_slice(ref_params[name], rank, ep)), f"load_expert_shards {name}")
    for bad, what in (
        ({}, "no full expert tensor"),
        ({n: ref_params[n].detach()[:2] for n in expert_names}, "full tensor has shape"),
    ):
        try:
            load_expert_shards(model, bad)
            case.errors.append(f"load_expert_shards accepted a dict without {what!r}")
        except ValueError as exc:
            case.check(what in str(exc), f"load_expert_shards message: {exc}")
    counts = out_ref.tokens_per_expert
    case.metrics.update(
        loss=float(out_ep.loss.detach()),
        dropped=int(out_ref.dropped_tokens.sum()),
        cross_rank_rows=sum(cross_rank_rows(c, rank, ep) for c in counts),
        num_expert_params=len(expert_names),
    )
    return case


def case_bad_ep(group, rank: int) -> Case:
    case = Case()
    attempts: dict[str, Callable[[], object]] = {
        "shard_3_experts": lambda: shard_experts(MoELinear(8, 8, RouterConfig(num_experts=3)), group),
        "dispatcher_3_experts": lambda: AllToAllExperts(group, num_experts=3),
    }
    for name, attempt in attempts.items():
        try:
            attempt()
            case.errors.append(f"{name}: no ValueError")
        except ValueError as exc:
            case.metrics[name] = str(exc)
    layer = MoELinear(8, 8, RouterConfig(num_experts=4))
    shard_experts(layer, group)
    try:
        shard_experts(layer, group)
        case.errors.append("sharding twice: no ValueError")
    except ValueError as exc:
        case.metrics["shard_twice"] = str(exc)
    return case


def main() -> None:
    out_path = Path(sys.argv[1])
    # A rank that skips a collective (e.g. a backward all-to-all) must fail the test quickly, not hang it.
    timeout = datetime.timedelta(seconds=60)
    dist.init_process_group("gloo", timeout=timeout)
    rank = dist.get_rank()
    group = dist.new_group([0, 1], timeout=timeout)
    torch.set_num_threads(1)  # two ranks share two cores
    cases: dict[str, Callable[[], Case]] = {}
    for top_k in (1, 2):
        for capacity in (None, 1.0):
            for bias in (False, True):
                cases[f"layer_k{top_k}_cap{capacity}_bias{bias}"] = lambda k=top_k, c=capacity, b=bias: case_layer(
                    k, c, b, group, rank
                )
            cases[f"model_k{top_k}_cap{capacity}"] = lambda k=top_k, c=capacity: case_model(k, c, group, rank)
    for top_k, capacity in ((1, None), (2, 1.0)):  # the standard MoE on the same machinery
        cases[f"model_mlp_k{top_k}_cap{capacity}"] = lambda k=top_k, c=capacity: case_model(k, c, group, rank, mlp=True)
    cases["zero_rows_on_rank1"] = lambda: case_zero_rows(0, group, rank)
    cases["zero_rows_on_rank0"] = lambda: case_zero_rows(3, group, rank)
    cases["bad_ep"] = lambda: case_bad_ep(group, rank)

    # A crash is not caught: the rank exits non-zero and torchrun stops its peer (which would wait in a collective).
    results: dict[str, dict[str, dict]] = {}
    for name, run in cases.items():
        case = run()
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, {"errors": case.errors, "metrics": case.metrics})
        results[name] = {str(r): g for r, g in enumerate(gathered)}
    if rank == 0:
        tmp = out_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1))
        os.replace(tmp, out_path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
