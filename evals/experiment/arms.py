"""The arms of each experiment (launch/experiment.sh) and what the report holds about one arm.

`paper-llm` is the paper's LLM question at one size: vanilla LLaMA against ParameterNet-LLaMA (8 experts, top-1, on
down_proj: the headline), the projection ablation of the paper's Table 7 (gate_proj, up_proj, down_proj, 8 experts
each), the expert count (2, 4, 8 on down_proj) and a vanilla LLaMA widened to ParameterNet's total parameter count
(more FLOPs per token): the ceiling that the free parameters approach. The expert-count arms use down_proj, the
paper's projection for LLaMA and the preset's, because all arms run in one go: which projection wins is only known
afterwards, and the report says whether it was down_proj.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from evals.experiment.stats import PairedDifference
from evals.runs import RunGroup
from evals.scores import GroupScores

BASELINE = "vanilla"  # every paired difference is against this arm
HEADLINE = "pn-down-e8"
CEILING = "vanilla-wide"
# The roles an arm plays in the generated reading (evals.experiment.reading, .scaling), named in the arm tables below.
ROLES = {
    "baseline": "the baseline",
    "headline": "the headline",
    "ceiling": "the ceiling",
    "control": "the standard MoE control",
    "peer": "the peer implementation",
}


@dataclass(frozen=True)
class Arm:
    name: str  # directory under OUT and column label
    kind: str  # launch/pretrain_llama.sh's first argument: llama | parameternet (with SIZE: the preset)
    what: str  # one line for the report
    overrides: dict[str, Any] = field(default_factory=dict)  # --model_overrides
    preset: str | None = None  # a model preset family instead of KIND's (moe-mlp-llama: --model moe-mlp-llama-SIZE)
    role: str | None = None  # what the generated reading makes of it: one of ROLES
    ablations: tuple[str, ...] = ()  # the ablation groups it is compared within: "projection", "experts"
    max_seeds: int | None = None  # a diagnostic arm: trained with at most this many of the experiment's seeds

    def run_spec(self, size: str) -> str:
        """launch/compare.sh's --run "NAME KIND [--key value ...]" (split on spaces: the JSON has none)."""
        spec = f"{self.name} {self.kind}"
        if self.preset is not None:
            spec += f" --model {self.preset}-{size}"
        if self.overrides:
            spec += " --model_overrides " + json.dumps(self.overrides, separators=(",", ":"))
        return spec


def _moe(projection: str, experts: int) -> dict[str, Any]:
    return {"moe_projections": [projection], "num_experts": experts, "top_k": 1}


def matched_intermediate_size(size: str) -> tuple[int, int, int]:
    """The vanilla intermediate_size whose total parameter count is nearest to parameternet-llama-SIZE with 8
    experts on down_proj; returns (intermediate_size, its total parameters, ParameterNet's total parameters).

    Each unit of intermediate_size adds 3 x hidden weights per layer (gate, up, down), so the nearest size is within
    1.5 x hidden x layers parameters of the target."""
    from llm.model.flops import account
    from llm.model.presets import load_model_config

    target = account(load_model_config(f"parameternet-llama-{size}", **_moe("down_proj", 8))).total_params
    base = load_model_config(f"llama-{size}")

    def total(inter: int) -> int:
        return account(load_model_config(f"llama-{size}", intermediate_size=inter)).total_params

    per_unit = total(base.intermediate_size + 1) - total(base.intermediate_size)
    guess = base.intermediate_size + round((target - total(base.intermediate_size)) / per_unit)
    best = min((guess - 1, guess, guess + 1), key=lambda inter: abs(total(inter) - target))
    return best, total(best), target


def _pn(
    name: str, projection: str, experts: int, *ablations: str, recipe: str, what: str = "", role: str | None = None
) -> Arm:
    """A ParameterNet arm. `recipe` names its routing (ROUTING_RECIPES) in the run's overrides, so that the runs of
    an experiment mean the same when a preset's default routing changes."""
    text = f"ParameterNet: {experts} experts on {projection}, top-1{what}"
    overrides = {**_moe(projection, experts), "routing_recipe": recipe}
    return Arm(name, "parameternet", text, overrides, role=role, ablations=ablations)


# Trained on 2026-11-30 with the paper's routing, the presets' default then (since 2026-12-06 it is `centered`):
# every ParameterNet arm names it, so the README's command still trains what the committed runs are.
PAPER_LLM: tuple[Arm, ...] = (
    Arm(BASELINE, "llama", "LLaMA, dense SwiGLU MLP (the baseline)", role="baseline"),
    _pn(HEADLINE, "down_proj", 8, "projection", "experts", recipe="paper", what=" (the headline)", role="headline"),
    _pn(
        "pn-gate-e8", "gate_proj", 8, "projection", recipe="paper"
    ),  # which projection gets the experts: the paper's Table 7
    _pn("pn-up-e8", "up_proj", 8, "projection", recipe="paper"),
    _pn("pn-down-e2", "down_proj", 2, "experts", recipe="paper"),  # how many experts
    _pn("pn-down-e4", "down_proj", 4, "experts", recipe="paper"),
    # intermediate_size is filled in per size (sized_arms): the one nearest to the headline's total parameters.
    Arm(
        CEILING,
        "llama",
        f"LLaMA widened to {HEADLINE}'s total parameters: more FLOPs per token (the ceiling)",
        role="ceiling",
    ),
)
STANDARD_MOE = "moe-mlp-e8"
# The token-scaling study (issue 20) at SIZE=micro: >= 2 tokens per non-embedding parameter, validated at 10
# log-spaced budgets, with a conventional MoE as the control that tells a weak design from a regime where no MoE wins.
PAPER_LLM_SCALING: tuple[Arm, ...] = (
    PAPER_LLM[0],
    _pn(HEADLINE, "down_proj", 8, recipe="centered", what=" (the headline)", role="headline"),
    _pn("pn-up-e8", "up_proj", 8, recipe="centered", what=" (the paper's best, Table 7)"),
    Arm(
        STANDARD_MOE,
        "parameternet",
        "standard MoE: 8 whole SwiGLU MLP experts (gate, up, down), top-1 (the control)",
        {"routing_recipe": "centered"},
        preset="moe-mlp-llama",
        role="control",
    ),
    PAPER_LLM[-1],
)
# The canonical result (issue 32): a standard MoE against its dense twin where the ceiling has room to win
# (llm/configs/micro-room.yaml: 6.2 tokens per non-embedding parameter, one pass over pd-english). The primary endpoint,
# fixed before the runs: the final validation loss, paired t interval against vanilla. Every routed arm uses the gate
# that won at iteration 117 of the token-scaling study ("normalized": the chosen expert's output unscaled under
# top-1, as Megatron-Core's softmax-after-top-k and Mixtral give), so the arms differ in what is routed, not how.
NORMALIZED_GATE = {"router_gate": "normalized"}
CANONICAL_MOE: tuple[Arm, ...] = (
    PAPER_LLM[0],
    PAPER_LLM[-1],
    Arm(
        STANDARD_MOE,
        "parameternet",
        "standard MoE: 8 whole SwiGLU MLP experts, top-1, normalized gate, centered router (the control)",
        NORMALIZED_GATE,
        preset="moe-mlp-llama",
        role="control",
    ),
    # The peer: transformers' own MixtralForCausalLM at the standard MoE's shapes, with its own router, init and
    # load-balancing loss (llm/model/peers.py; weight 0.01 as Switch's and the paper's, in the preset).
    Arm(
        "mixtral-e8",
        "parameternet",
        "peer: transformers' MixtralForCausalLM, 8 SwiGLU experts, top-1, its own router and aux loss",
        preset="mixtral",
        role="peer",
    ),
    Arm(
        "pn-up-e8",
        "parameternet",
        "ParameterNet: 8 experts on up_proj (the paper's best, Table 7), top-1, normalized gate, centered router",
        {**_moe("up_proj", 8), **NORMALIZED_GATE},
        role="headline",
    ),
    # Diagnostic: the paper's raw linear router (aux 0.01, no z-loss) instead of the centered one, same gate.
    Arm(
        "moe-mlp-e8-paper",
        "parameternet",
        "standard MoE as the control but routed by the paper's raw linear router (diagnostic)",
        {**NORMALIZED_GATE, "routing_recipe": "paper"},
        preset="moe-mlp-llama",
        max_seeds=2,
    ),
    # Diagnostic: Hash Layers (Roller et al. 2021), a fixed token-id -> expert map: what a learned router adds.
    Arm(
        "moe-mlp-e8-hash",
        "parameternet",
        "standard MoE as the control but routed by a fixed hash of the token id, no router loss (diagnostic)",
        {
            "router_type": "hash",
            "router_input": "raw",
            "router_aux_loss_coef": 0.0,
            "router_z_loss_coef": 0.0,
            **NORMALIZED_GATE,
        },
        preset="moe-mlp-llama",
        max_seeds=2,
    ),
)
EXPERIMENTS: dict[str, tuple[Arm, ...]] = {
    "paper-llm": PAPER_LLM,
    "paper-llm-scaling": PAPER_LLM_SCALING,
    "canonical-moe": CANONICAL_MOE,
}
# The experiments read by validation loss at log-spaced budgets (evals.experiment.scaling), with their training preset.
SCALING_EXPERIMENTS: dict[str, str] = {"paper-llm-scaling": "micro", "canonical-moe": "micro-room"}


def sized_arms(experiment: str, size: str) -> list[Arm]:
    """The experiment's arms for the presets of `size`, the ceiling's intermediate_size computed for it."""
    if experiment not in EXPERIMENTS:
        raise ValueError(f"experiment {experiment!r} is not known; known: {', '.join(EXPERIMENTS)}")
    arms = list(EXPERIMENTS[experiment])
    for i, arm in enumerate(arms):
        if arm.role == "ceiling":
            wide, _, _ = matched_intermediate_size(size)
            arms[i] = replace(arm, overrides={"intermediate_size": wide})
    return arms


def role(table: Sequence[Arm], name: str) -> Arm | None:
    """The arm of `table` that plays the role `name` (one of ROLES), if it has one."""
    if name not in ROLES:
        raise ValueError(f"role {name!r} is not one of {', '.join(ROLES)}")
    return next((arm for arm in table if arm.role == name), None)


def select_arms(experiment: str, size: str, names: str | None) -> list[Arm]:
    """The experiment's arms, all of them or those named (comma-separated, kept in the experiment's order)."""
    arms = sized_arms(experiment, size)
    if names is None or names.strip() in ("", "all"):
        return arms
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = {arm.name for arm in arms}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise ValueError(f"ARMS: {', '.join(unknown)} not in {experiment}; its arms are {', '.join(known)} (or all)")
    if BASELINE not in wanted:
        raise ValueError(f"ARMS={names}: include {BASELINE!r}, the baseline every paired difference is taken against")
    if len(set(wanted)) < 2:
        raise ValueError(f"ARMS={names}: give at least two arms ({BASELINE} and one to compare with it)")
    return [arm for arm in arms if arm.name in wanted]


VISION_BASELINE = "static"  # the vision experiment's baseline: the twin with plain convolutions


@dataclass(frozen=True)
class VisionArm:
    name: str
    model: str  # a vision/models registry name
    num_experts: int | None  # --num_experts (None: the static twin has none)
    what: str

    def train_args(self) -> str:
        """The arm's vision.train flags, for launch/experiment.sh."""
        args = f"{self.name} --model {self.model}"
        return args + (f" --num_experts {self.num_experts}" if self.num_experts is not None else "")


# The paper's premise at 28-32 px (issue 14): total stride 4, so the dynamic convolutions' kernel mixing stays within
# ~6% of the twin's multiply-adds (python -m vision.summary --img-size 32 --breakdown).
PAPER_VISION: tuple[VisionArm, ...] = (
    VisionArm(VISION_BASELINE, "ghostnet_tiny_os4", None, "GhostNet, plain convolutions (the static twin)"),
    *(
        VisionArm(
            f"pn-e{e}", "parameternet_tiny_os4", e, f"ParameterNet: dynamic convolutions with {e} expert{'s' * (e > 1)}"
        )
        for e in (1, 2, 4)
    ),
)
VISION_EXPERIMENTS: dict[str, tuple[VisionArm, ...]] = {"paper-vision": PAPER_VISION}


def select_vision_arms(experiment: str, names: str | None) -> list[VisionArm]:
    """The vision experiment's arms, all of them or those named (comma-separated, in the experiment's order)."""
    arms = list(VISION_EXPERIMENTS[experiment])
    if names is None or names.strip() in ("", "all"):
        return arms
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = [arm.name for arm in arms]
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise ValueError(f"ARMS: {', '.join(unknown)} not in {experiment}; its arms are {', '.join(known)} (or all)")
    if VISION_BASELINE not in wanted or len(set(wanted)) < 2:
        raise ValueError(f"ARMS={names}: include {VISION_BASELINE!r}, the baseline, and at least one other arm")
    return [arm for arm in arms if arm.name in wanted]


@dataclass
class ArmResult:
    """One arm's finished and evaluated runs and what the report says about them."""

    name: str
    what: str
    group: RunGroup
    scores: GroupScores
    loss: dict[int, float]  # seed -> final validation loss
    accuracy: dict[int, float]  # seed -> average zero-shot accuracy over the tasks
    tokens_per_s: dict[int, float]  # seed -> median of the run's train records
    curves: dict[int, dict[float, float]]  # seed -> {training tokens: validation loss}
    evaluations: dict[int, Path]  # seed -> the evaluation file reported (eval/results/<key>.json)
    loss_diff: PairedDifference | None = None  # this arm - baseline
    accuracy_diff: PairedDifference | None = None

    def summary_value(self, key: str) -> float | None:
        values = [run.summary.get(key) for run in self.group.runs]
        numbers = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        return numbers[0] if numbers else None

    @property
    def model(self) -> str:
        """The preset and overrides as trained (summary.json)."""
        run = self.group.runs[0]
        name = str(run.summary.get("model", "n/a"))
        overrides = run.summary.get("model_overrides") or {}
        if overrides:
            name += " " + json.dumps(overrides, separators=(",", ":"))
        return name
