"""Resume a ZeRO-1/2 checkpoint on another topology: another world size, expert-parallel size or ZeRO stage.

DeepSpeed writes one optimizer shard per rank (`zero_pp_rank_<r>_mp_rank_00_optim_states.pt`): per parameter group,
that rank's contiguous slice of the group's flat fp32 master weights and of both Adam moments, and
`param_slice_mappings`, where each parameter's fragment lies in the slice. Concatenating a parameter's fragments in
rank order gives the parameter whole - what DeepSpeed's own `ds_to_universal` does. Its expert groups are sharded
over the expert-data-parallel ranks only (global ranks e, e + ep, e + 2ep, ... for expert-parallel rank e, DeepSpeed's
`_create_expert_and_data_parallel`), and each expert-parallel rank holds other experts under the same name: the
whole expert tensor is the concatenation, over e, of each rank's experts.

We read those files as they are, at resume, instead of writing a second, topology-free copy at every save: no extra
disk and no extra save time, and checkpoints written before this module existed reshard too. The universal layout
of DeepSpeed (`ds_to_universal` + `load_universal`) is not used: it does not convert native MoE checkpoints
(DeepSpeed issue #5716), and where it was extended to experts it left their Adam moments stale (#8147). The new
engine's fragments are set through DeepSpeed's public `safe_set_full_fp32_param` / `safe_set_full_optimizer_state`,
so its own partitioning decides what each rank keeps. Every value is copied, never recomputed: the state lands
bitwise. Each rank reads the files memory-mapped and one parameter at a time (peak memory: the largest parameter).

Not covered: ZeRO-0 with expert parallelism and ZeRO-3 (other file layouts), DeepSpeed's `elastic_checkpoint` form,
CPU offload; `cannot_reshard` names them and the trainer refuses such a resume before anything is written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

RESHARDABLE_STAGES = (1, 2)
ADAM_KEYS = ("exp_avg", "exp_avg_sq")
MODEL_STATES = "mp_rank_00_model_states.pt"
_SHARD_RE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


@dataclass(frozen=True)
class Topology:
    """How a run's state is laid out over its ranks."""

    world_size: int
    expert_parallel_size: int
    zero_stage: int

    def __str__(self) -> str:
        ranks = f"{self.world_size} rank{'s' if self.world_size != 1 else ''}"
        return f"{ranks} (EP {self.expert_parallel_size}, ZeRO-{self.zero_stage})"

    @classmethod
    def of(cls, config: dict[str, Any], world_size: int) -> Topology:
        return cls(world_size, int(config.get("expert_parallel_size", 1) or 1), int(config.get("zero_stage", 0)))

    @property
    def sharded(self) -> bool:
        """Does any rank hold a part of the state that another does not?"""
        return self.zero_stage >= 1 or self.expert_parallel_size > 1


def needs_reshard(saved: Topology, now: Topology) -> bool:
    """ZeRO-0 without experts keeps the whole state on every rank: any world size loads it as it is."""
    return saved != now and (saved.sharded or now.sharded)


def cannot_reshard(saved: Topology, now: Topology) -> str | None:
    """Why the state saved under `saved` cannot be resharded to `now`, or None if it can."""
    for which, topology in (("the checkpoint's", saved), ("this run's", now)):
        if topology.zero_stage not in RESHARDABLE_STAGES:
            return (
                f"resharding reads and writes ZeRO-1/2 optimizer shards; {which} layout is ZeRO-{topology.zero_stage}"
            )
    return None


def _load(path: Path) -> dict[str, Any]:
    """A DeepSpeed checkpoint file, memory-mapped: tensors and the few DeepSpeed classes its metadata uses, nothing
    else (weights_only)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [fragment_address, LossScaler, DynamicLossScaler, ZeroStageEnum]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


@dataclass(frozen=True)
class _Fragment:
    rank: int
    group: int
    start: int
    numel: int


class SavedZeroState:
    """The whole fp32 master weight and Adam moments of every parameter, read from a ZeRO-1/2 checkpoint's
    per-rank shards written under `topology` (memory-mapped; a parameter is assembled when asked for)."""

    def __init__(self, directory: Path, topology: Topology) -> None:
        self.directory = directory
        self.topology = topology
        files: dict[int, Path] = {}
        for path in directory.iterdir():
            match = _SHARD_RE.match(path.name)
            if match:
                files[int(match.group(1))] = path
        if sorted(files) != list(range(topology.world_size)):
            raise ValueError(
                f"{directory}: expected the ZeRO optimizer shards of ranks 0..{topology.world_size - 1}, found "
                f"{sorted(files)}"
            )
        self.shards = [_load(files[r])["optimizer_state_dict"] for r in range(topology.world_size)]
        first = self.shards[0]
        if not isinstance(first.get("base_optimizer_state"), dict) or "param_slice_mappings" not in first:
            raise ValueError(
                f"{directory}: its ZeRO shards have no per-parameter mapping (written with elastic_checkpoint or "
                f"by a DeepSpeed before 0.10); resume it on {topology.world_size} ranks"
            )
        self.loss_scaler_state = {k: first[k] for k in ("loss_scaler", "dynamic_loss_scale", "overflow") if k in first}
        ep = topology.expert_parallel_size
        # name -> expert-parallel rank (None for a dense parameter) -> its fragments in order
        self.fragments: dict[str, dict[int | None, list[_Fragment]]] = {}
        self.steps: dict[str, torch.Tensor] = {}
        for r, shard in enumerate(self.shards):
            groups = shard["base_optimizer_state"]["param_groups"]
            for g, mapping in enumerate(shard["param_slice_mappings"]):
                expert = bool(groups[g].get("moe", False))
                state = self._group_state(r, g)
                for name, address in mapping.items():
                    owner = r % ep if expert else None
                    self.fragments.setdefault(name, {}).setdefault(owner, []).append(
                        _Fragment(r, g, int(address.start), int(address.numel))
                    )
                    self.steps.setdefault(name, state["step"])

    def _group_state(self, rank: int, group: int) -> dict[str, Any]:
        base = self.shards[rank]["base_optimizer_state"]
        (index,) = base["param_groups"][group]["params"]  # ZeRO-1/2: one flat partition per group
        return base["state"][index]

    def _flat(self, fragment: _Fragment, key: str | None) -> torch.Tensor:
        if key is None:
            source = self.shards[fragment.rank]["single_partition_of_fp32_groups"][fragment.group]
        else:
            source = self._group_state(fragment.rank, fragment.group)[key]
        return source.narrow(0, fragment.start, fragment.numel)

    def names(self) -> set[str]:
        return set(self.fragments)

    def is_expert(self, name: str) -> bool:
        return None not in self.fragments[name]

    def full(self, name: str, key: str | None, shape: tuple[int, ...]) -> torch.Tensor:
        """The whole tensor of `name` (fp32 master weight if key is None, else that Adam moment), of `shape` (for an
        expert tensor: all experts, [E, ...])."""
        owners = self.fragments[name]
        if None not in owners and len(owners) != self.topology.expert_parallel_size:
            raise ValueError(f"{self.directory}: {name} has the experts of {len(owners)} expert-parallel ranks")
        parts = [
            self._flat(f, key) for owner in sorted(owners, key=lambda o: -1 if o is None else o) for f in owners[owner]
        ]
        flat = torch.cat(parts)
        if flat.numel() != torch.Size(shape).numel():
            raise ValueError(
                f"{self.directory}: {name} has {flat.numel()} saved values, this model's is {tuple(shape)}: the "
                f"checkpoint is of another model"
            )
        return flat.view(shape)


def _engine_states(directory: Path) -> dict[str, Any]:
    """The engine's counters and LR-scheduler position, from DeepSpeed's model-states file (rank 0's)."""
    saved = _load(directory / MODEL_STATES)
    return {k: saved.get(k) for k in ("global_steps", "global_samples", "skipped_steps", "lr_scheduler")}


def load_resharded(
    engine: Any,
    directory: Path,
    saved: Topology,
    expert_slices: dict[str, tuple[int, int, int]],
    buffers: dict[str, torch.Tensor],
) -> None:
    """Set a freshly built ZeRO-1/2 engine's weights and optimizer state from a checkpoint of another topology.

    `expert_slices`: {parameter name: (experts in all, first expert here, one past the last)} of this run's sharded
    expert tensors; `buffers`: the module's persistent buffers by name (from the checkpoint's full weights).
    Not a collective: every rank reads what it needs."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    zero = engine.optimizer
    if not hasattr(zero, "single_partition_of_fp32_groups"):
        raise ValueError(f"resharding needs a ZeRO-1/2 engine, not {type(zero).__name__}")
    state = SavedZeroState(directory, saved)
    module = engine.module
    params = dict(module.named_parameters())
    missing, extra = sorted(set(params) - state.names()), sorted(state.names() - set(params))
    if missing or extra:
        raise ValueError(
            f"{directory}: its optimizer state does not hold this model's parameters (missing {missing[:3]}, "
            f"unknown {extra[:3]}): the checkpoint is of another model"
        )

    # torch's Adam creates its state at the first step: create it now, with the saved step count of each group.
    names = {id(p): n for n, p in params.items()}
    for g, flat in enumerate(zero.single_partition_of_fp32_groups):
        group = zero.optimizer.param_groups[g]
        steps = {float(state.steps[names[id(p)]]) for p in zero.bit16_groups[g]}
        if len(steps) != 1:
            raise ValueError(f"{directory}: the parameters of optimizer group {g} were saved at steps {sorted(steps)}")
        saved_step = state.steps[names[id(zero.bit16_groups[g][0])]]
        on_device = group.get("fused") or group.get("capturable")
        zero.optimizer.state[flat] = {
            "step": saved_step.clone().to(flat.device if on_device else "cpu"),
            **{key: torch.zeros_like(flat) for key in ADAM_KEYS},
        }
    zero._hp_optimizer_states_linked = False
    zero._lazy_init_hp_params_optimizer_state()  # links each parameter's fragment of those moments

    for name, param in params.items():
        shape = tuple(param.shape)
        if name in expert_slices:
            total, lo, hi = expert_slices[name]
            shape = (total, *shape[1:])
        if state.is_expert(name) and name not in expert_slices:
            raise ValueError(f"{directory}: {name} was saved as an expert tensor; this model's is not one")
        for key in (None, *ADAM_KEYS):
            value = state.full(name, key, shape)
            if name in expert_slices:
                value = value[lo:hi]
            value = value.to(param.device)
            if key is None:
                safe_set_full_fp32_param(param, value)
                with torch.no_grad():
                    param.copy_(value.to(param.dtype))  # the low-precision copy, as DeepSpeed derives it
            else:
                safe_set_full_optimizer_state(param, value, key)

    with torch.no_grad():
        for name, buffer in module.named_buffers():
            if name in buffers:
                buffer.copy_(buffers[name].to(buffer.device))
    if state.loss_scaler_state:
        zero.loss_scaler = state.loss_scaler_state.get("loss_scaler", zero.loss_scaler)
        zero.dynamic_loss_scale = state.loss_scaler_state.get("dynamic_loss_scale", zero.dynamic_loss_scale)
    counters = _engine_states(directory)
    engine.global_steps = counters["global_steps"]
    engine.global_samples = counters["global_samples"]
    engine.skipped_steps = counters["skipped_steps"]
    scheduler = engine.lr_scheduler
    if scheduler is not None and counters["lr_scheduler"] is not None:
        # The step count only: the base LRs are per group, and the groups differ between expert-parallel sizes.
        scheduler.last_epoch = counters["lr_scheduler"]["last_epoch"]
        scheduler._step_count = counters["lr_scheduler"]["_step_count"]
