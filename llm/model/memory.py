"""Per-GPU training memory of LLaMA / ParameterNet-LLaMA on the DeepSpeed engine, and whether it fits a GPU.

Model states (bytes per parameter, what DeepSpeed 0.19 allocates for our configs: torch AdamW, no offload):

    precision          weights  16/32-bit grads  fp32 grads (step)  fp32 master  Adam m + v
    bf16 / fp16           2            2                4               4            8
    fp32, ZeRO-0          4            4                -               -            8      (plain torch AdamW)
    fp32, ZeRO-1/2/3      4            4                4               4            8      (ZeRO keeps fp32 copies)

ZeRO shards over the data-parallel ranks: stage 1 the fp32 grads, master and moments; stage 2 also the 16/32-bit
gradients; stage 3 also the weights, plus DeepSpeed's ZeRO-3 working set: the largest module gathered with its full
gradient, 2 x (2 or 4 bytes) x its parameters. (Tensors under stage3_param_persistence_threshold, 1e5 elements in
ds_configs/zero3.json, i.e. norms and routers, stay whole on every rank: under 1M parameters at 1B, not counted.)
Expert parallelism over E ranks keeps 1/E of every expert tensor on a rank, and ZeRO shards those over the
expert-data-parallel group (N/E ranks), so expert optimizer state per rank is the same 1/N share as for dense
parameters; only weights (and, below stage 2, gradients) shrink with E. Where these come from, in DeepSpeed:
`runtime/zero/stage_1_and_2.py` (`single_partition_of_fp32_groups`, its `.grad` made in `step`),
`runtime/zero/stage3.py` (`grad_partitions_flat_buffer` in the gradient-accumulation dtype, which is the model dtype
by default), `runtime/fp16/unfused_optimizer.py` (bf16 at stage 0 with a torch optimizer).

How this relates to DeepSpeed's own estimators (checked in tests/test_model_summary.py): stage 2 equals
`estimate_zero2_model_states_mem_needs(cpu_offload=False)` (2P + 18P/N) exactly; stage 1 is that plus the
16-bit gradients ZeRO-1 keeps whole (DeepSpeed has no stage-1 estimator); stage 0 is its 1-GPU figure; stage 3 is
`estimate_zero3_model_states_mem_needs` (4 x largest layer + 18P/N) plus the 2P/N 16-bit gradient partition that
stage3.py allocates and that formula leaves out.

Activations (analytic, bytes per token, b = 2 in bf16/fp16, 4 in fp32): the per-layer count of Korthikanti et al.
2022 ("Reducing Activation Recomputation in Large Transformer Models", 34sbh + 5as^2b) adapted to this model: no
dropout masks; flash/SDPA attention, so no s^2 score matrix, but the kernel's fp32 log-sum-exp per head; SwiGLU
keeps four f-wide tensors (gate, up, SiLU output, product); transformers' RMSNorm keeps an fp32 copy of its input
(4h) and the normalised 16-bit x (b h). Per layer:
    attention  b h (q/k/v input) + b (q + 2 kv) (Q, K, V after RoPE) + b q (output = o_proj input) + 4 heads
    MLP        b h (gate/up input) + 4 b f
    norms      2 x (4h + b h + 4)
    MoE        per MoE projection: top_k b (in + out) (expert-sorted input, expert output) + router (8E + 4 + k(24+b))
               + with router_input 'centered', (4 - b) in (its fp32 centred input instead of the b-byte one)
    standard MoE (moe_mlp): b h + top_k (b h + 4 b f + b h) (sorted input, SwiGLU tensors, expert output) + router
Activation checkpointing keeps each layer's input (b h) plus one layer recomputed in the backward. The head adds the
final norm and the lm_head input; logits + cross entropy take (b + 12) V per token: the logits the trainer holds,
the fp32 log-probabilities log_softmax keeps, and the two fp32 gradients of its backward (`F.cross_entropy(
logits.float())` in llm/train/trainer.py). The layer and head counts equal, to the byte, what autograd saves for the
backward on CPU (where SDPA runs its flash kernel too) for the tiny presets, and the loss adds exactly the fp32
log-probabilities (tests/test_model_summary.py); on CUDA the flash and memory-efficient SDPA kernels keep the same
tensors (assumed, not measured here). Not counted, left to the headroom: transient buffers inside single ops, the
backward's activation gradients, SDPA's math fallback (an explicit attention mask: s^2 scores), and the logits of
the previous micro-batch, which `train_step` keeps (its `out`) through the next forward and the optimizer step.

Peak = max(forward/backward: weights + grads + master + moments + activations, optimizer step: every model state),
since the fp32 gradient copy exists only in the step, after the activations are freed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from transformers import LlamaConfig

from .configuration_parameternet_llama import ParameterNetLlamaConfig
from .flops import account, router_params

GIB = 2**30
PRECISIONS = ("bf16", "fp16", "fp32")
# Headroom (analytic, not measured): the CUDA context, cuBLAS workspaces and NCCL buffers (~1 GiB), plus a share of
# the GPU for caching-allocator fragmentation, ZeRO's communication buckets (reduce_bucket_size 5e7 elements) and the
# transient buffers of single ops that the activation count leaves out.
CONTEXT_GIB = 1.0
FRAGMENTATION_SHARE = 0.10


def default_headroom_gib(gpu_memory_gib: float) -> float:
    return CONTEXT_GIB + FRAGMENTATION_SHARE * gpu_memory_gib


@dataclass(frozen=True)
class TrainingLayout:
    gpus: int = 1  # data-parallel ranks in all (DeepSpeed's nodes x GPUs per node)
    zero_stage: int = 1
    expert_parallel: int = 1
    precision: str = "bf16"
    micro_batch: int = 1
    seq_len: int | None = None  # None: the model's max_position_embeddings
    activation_checkpointing: bool = False


@dataclass(frozen=True)
class ParameterSplit:
    dense: int  # replicated over expert-parallel ranks (everything but expert tensors; routers included)
    expert: int  # MoE expert weights (and expert biases), all experts
    largest_module: int  # most parameters held directly by one module: DeepSpeed's "largest layer" for ZeRO-3

    @property
    def total(self) -> int:
        return self.dense + self.expert


def parameter_split(config: LlamaConfig) -> ParameterSplit:
    hidden, vocab = config.hidden_size, config.vocab_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q_width, kv_width = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    shapes = {
        "gate_proj": (hidden, config.intermediate_size),
        "up_proj": (hidden, config.intermediate_size),
        "down_proj": (config.intermediate_size, hidden),
    }
    attn_bias = bool(config.attention_bias)
    modules = [
        vocab * hidden,
        hidden * q_width + attn_bias * q_width,
        hidden * kv_width + attn_bias * kv_width,
        q_width * hidden + attn_bias * hidden,
    ]
    if not config.tie_word_embeddings:
        modules.append(vocab * hidden)
    expert_per_layer = 0
    if isinstance(config, ParameterNetLlamaConfig) and config.moe_mlp:
        # MoEMLP holds its three [E, ...] expert tensors itself; its router is a Linear submodule.
        expert_per_layer = config.num_experts * 3 * hidden * config.intermediate_size
        modules += [expert_per_layer, router_params(config, hidden)]
        shapes = {}
    for name, (fan_in, fan_out) in shapes.items():
        if isinstance(config, ParameterNetLlamaConfig) and name in config.moe_projections:
            # MoELinear holds [E, out, in] (+ [E, out] bias) itself; its router is a Linear submodule.
            experts = config.num_experts * (fan_in * fan_out + (fan_out if config.expert_output_bias else 0))
            expert_per_layer += experts
            modules += [experts, router_params(config, fan_in)]
        else:
            modules.append(fan_in * fan_out + (fan_out if config.mlp_bias else 0))
    expert = config.num_hidden_layers * expert_per_layer
    total = account(config).total_params
    return ParameterSplit(dense=total - expert, expert=expert, largest_module=max(modules))


@dataclass(frozen=True)
class ModelStates:
    """Bytes per GPU."""

    weights: float
    gradients: float  # in the model dtype, what the backward writes
    fp32_gradients: float  # the fp32 copy of the gradient partition the optimizer steps on (optimizer step only)
    optimizer: float  # fp32 master weights + Adam moments
    zero3_gathered: float  # ZeRO-3 only: the largest module gathered, weights + gradients

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.fp32_gradients + self.optimizer + self.zero3_gathered

    @property
    def during_backward(self) -> float:
        return self.total - self.fp32_gradients


def _bytes_per_value(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def validate(config: LlamaConfig, layout: TrainingLayout) -> None:
    """Refuse a layout the trainer would refuse, naming the field and the fix."""
    if layout.gpus < 1:
        raise ValueError(f"gpus={layout.gpus} must be >= 1")
    if layout.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero={layout.zero_stage} must be 0, 1, 2 or 3")
    if layout.precision not in PRECISIONS:
        raise ValueError(f"precision={layout.precision!r} is not one of {PRECISIONS}")
    if layout.micro_batch < 1 or (layout.seq_len is not None and layout.seq_len < 1):
        raise ValueError(f"micro_batch={layout.micro_batch}, seq_len={layout.seq_len}: both must be >= 1")
    if layout.seq_len is not None and layout.seq_len > config.max_position_embeddings:
        raise ValueError(
            f"seq_len={layout.seq_len} exceeds the model's max_position_embeddings="
            f"{config.max_position_embeddings}; use --seq-len <= {config.max_position_embeddings}"
        )
    ep = layout.expert_parallel
    if ep < 1:
        raise ValueError(f"ep={ep} must be >= 1")
    if ep == 1:
        return
    if not isinstance(config, ParameterNetLlamaConfig):
        raise ValueError(f"ep={ep} needs a ParameterNet model (with MoE projections); use --ep 1 for a vanilla LLaMA")
    if layout.gpus % ep:
        raise ValueError(f"ep={ep} does not divide gpus={layout.gpus}; choose an expert-parallel size that divides it")
    if config.num_experts % ep:
        raise ValueError(f"ep={ep} does not divide num_experts={config.num_experts}")
    if layout.zero_stage == 3:
        raise ValueError(
            f"ep={ep} with zero=3 is not supported (DeepSpeed refuses MoE under ZeRO-3, and so does the "
            f"trainer); use zero 1 or 2 with expert parallelism"
        )


def model_state_bytes(config: LlamaConfig, layout: TrainingLayout) -> ModelStates:
    validate(config, layout)
    split = parameter_split(config)
    stage, n, ep = layout.zero_stage, layout.gpus, layout.expert_parallel

    def per_rank(bytes_per_param: int, sharded: bool) -> float:
        # Dense parameters are sharded over all N ranks; each rank's 1/E of the experts over the N/E ranks of its
        # expert-data-parallel group.
        dense = split.dense / n if sharded else split.dense
        expert = split.expert / ep / (n // ep) if sharded else split.expert / ep
        return bytes_per_param * (dense + expert)

    b = _bytes_per_value(layout.precision)
    # A plain fp32 torch AdamW (ZeRO-0) steps on the model's own parameters and gradients: no fp32 copies.
    fp32_copies = not (stage == 0 and layout.precision == "fp32")
    return ModelStates(
        weights=per_rank(b, sharded=stage >= 3),
        gradients=per_rank(b, sharded=stage >= 2),
        fp32_gradients=per_rank(4, sharded=stage >= 1) if fp32_copies else 0.0,
        optimizer=per_rank(8 + (4 if fp32_copies else 0), sharded=stage >= 1),
        zero3_gathered=2 * b * split.largest_module if stage == 3 else 0.0,
    )


@dataclass(frozen=True)
class ActivationBytes:
    """Bytes per token (the model's) or per GPU (`activation_bytes`): analytic estimates."""

    layer: float  # one decoder layer, saved for its backward
    layers: float  # all layers (or, with checkpointing, the layer inputs plus one layer recomputed)
    head: float  # final norm + lm_head input
    logits: float  # logits + cross entropy

    @property
    def total(self) -> float:
        return self.layers + self.head + self.logits


def layer_activation_bytes_per_token(config: LlamaConfig, precision: str) -> int:
    b = _bytes_per_value(precision)
    h, f, heads = config.hidden_size, config.intermediate_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    q, kv = heads * head_dim, config.num_key_value_heads * head_dim
    norm = 4 * h + b * h + 4  # fp32 input copy + normalised 16-bit x + fp32 1/rms
    attention = b * h + b * (q + 2 * kv) + b * q + 4 * heads  # flash/SDPA keeps Q, K, V, output, log-sum-exp
    mlp = b * h + 4 * b * f
    router_input = getattr(config, "router_input", "raw")
    if isinstance(config, ParameterNetLlamaConfig) and config.moe_mlp:
        # A standard MoE: per assignment the expert-sorted input, the four f-wide SwiGLU tensors and the expert
        # output; the router's tensors once per layer (as below, on the hidden state).
        k, experts = config.top_k, config.num_experts
        mlp = b * h + k * (b * h + 4 * b * f + b * h) + 8 * experts + 4 + k * (24 + b)
        if router_input == "centered":
            mlp += (4 - b) * h
    elif isinstance(config, ParameterNetLlamaConfig):
        shapes = {"gate_proj": (h, f), "up_proj": (h, f), "down_proj": (f, h)}
        k, experts = config.top_k, config.num_experts
        for name in config.moe_projections:
            fan_in, fan_out = shapes[name]
            # Expert-sorted input copy (grouped GEMM) and expert output (gate multiply), per assignment; the router:
            # fp32 logits and probabilities, z-loss log-sum-exp, top-k indices, two int64 permutations, the gate.
            mlp += k * b * (fan_in + fan_out) + 8 * experts + 4 + k * (24 + b)
            if router_input == "centered":
                # The router keeps its fp32 centred, normalised input instead of the b-byte input (which it reads
                # detached): 4 - b bytes more per input value (autograd's saved tensors, tests/test_model_summary.py).
                mlp += (4 - b) * fan_in
    return attention + mlp + 2 * norm


def activation_bytes_per_token(config: LlamaConfig, precision: str, checkpointing: bool) -> ActivationBytes:
    b = _bytes_per_value(precision)
    h, layers = config.hidden_size, config.num_hidden_layers
    layer = layer_activation_bytes_per_token(config, precision)
    stored = layers * b * h + layer if checkpointing else layers * layer
    head = (4 * h + b * h + 4) + b * h  # final norm + its output, the lm_head input
    logits = (b + 12) * config.vocab_size  # logits, fp32 log-probs, two fp32 gradients in the softmax backward
    return ActivationBytes(layer=layer, layers=stored, head=head, logits=logits)


def activation_bytes(config: LlamaConfig, layout: TrainingLayout) -> ActivationBytes:
    """Per GPU: micro_batch x seq_len tokens (expert parallelism moves tokens between ranks; balanced, the same)."""
    validate(config, layout)
    per_token = activation_bytes_per_token(config, layout.precision, layout.activation_checkpointing)
    tokens = layout.micro_batch * (layout.seq_len or config.max_position_embeddings)
    return ActivationBytes(**{k: v * tokens for k, v in asdict(per_token).items()})


@dataclass(frozen=True)
class MemoryEstimate:
    layout: TrainingLayout
    params: ParameterSplit
    states: ModelStates
    activations: ActivationBytes
    gpu_memory_gib: float
    headroom_gib: float
    largest_micro_batch: int  # at this layout's checkpointing setting; 0 when even the model states do not fit
    largest_micro_batch_checkpointing: int  # with activation checkpointing

    @property
    def peak(self) -> float:
        return peak_bytes(self.states, self.activations.total)

    @property
    def usable(self) -> float:
        return (self.gpu_memory_gib - self.headroom_gib) * GIB

    @property
    def fits(self) -> bool:
        return self.peak <= self.usable

    def as_dict(self) -> dict:
        return {
            "layout": asdict(self.layout),
            "params": {**asdict(self.params), "total": self.params.total},
            "bytes_per_gpu": {
                **asdict(self.states),
                "model_states": self.states.total,
                "activations": self.activations.layers,
                "head": self.activations.head,
                "logits": self.activations.logits,
                "peak": self.peak,
            },
            "gpu_memory_gib": self.gpu_memory_gib,
            "headroom_gib": self.headroom_gib,
            "usable_gib": self.usable / GIB,
            "fits": self.fits,
            "largest_micro_batch": self.largest_micro_batch,
            "largest_micro_batch_checkpointing": self.largest_micro_batch_checkpointing,
        }


def peak_bytes(states: ModelStates, activations: float) -> float:
    # The fp32 gradient copy lives only in the optimizer step, when the activations are already freed.
    return max(states.during_backward + activations, states.total)


def _largest_micro_batch(states: ModelStates, per_sample: float, usable: float) -> int:
    """Activations grow linearly with the micro batch."""
    if peak_bytes(states, per_sample) > usable:
        return 0
    return math.floor((usable - states.during_backward) / per_sample)


def estimate(
    config: LlamaConfig, layout: TrainingLayout, gpu_memory_gib: float = 80.0, headroom_gib: float | None = None
) -> MemoryEstimate:
    if gpu_memory_gib <= 0:
        raise ValueError(f"gpu_memory={gpu_memory_gib} GiB must be > 0")
    headroom = default_headroom_gib(gpu_memory_gib) if headroom_gib is None else headroom_gib
    if headroom < 0:
        raise ValueError(f"headroom={headroom} GiB must be >= 0")
    if layout.seq_len is None:
        layout = replace(layout, seq_len=config.max_position_embeddings)
    states = model_state_bytes(config, layout)
    usable = (gpu_memory_gib - headroom) * GIB
    largest = {}
    for checkpointing in (layout.activation_checkpointing, True):
        one = activation_bytes_per_token(config, layout.precision, checkpointing).total * layout.seq_len
        largest[checkpointing] = _largest_micro_batch(states, one, usable)
    return MemoryEstimate(
        layout,
        parameter_split(config),
        states,
        activation_bytes(config, layout),
        gpu_memory_gib,
        headroom,
        largest[layout.activation_checkpointing],
        largest[True],
    )


__all__ = [
    "ActivationBytes",
    "MemoryEstimate",
    "ModelStates",
    "ParameterSplit",
    "TrainingLayout",
    "activation_bytes",
    "activation_bytes_per_token",
    "default_headroom_gib",
    "estimate",
    "layer_activation_bytes_per_token",
    "model_state_bytes",
    "parameter_split",
    "peak_bytes",
    "validate",
]
