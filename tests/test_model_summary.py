"""Accounting of the 1B presets against an independent hand count, and the summary CLI."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llm.model.flops import account
from llm.model.memory import (
    GIB,
    TrainingLayout,
    activation_bytes,
    activation_bytes_per_token,
    estimate,
    model_state_bytes,
    parameter_split,
)
from llm.model.presets import build_model, load_model_config
from llm.model.summary import main, summarize
from tests.trainer_utils import ONE_RANK_ENGINE_PREAMBLE


def hand_count_llama(h=2048, layers=12, inter=8192, vocab=32000):
    per_layer = 4 * h * h + 3 * h * inter + 2 * h  # q,k,v,o + gate,up,down + 2 RMSNorms
    return 2 * vocab * h + layers * per_layer + h  # embeddings + untied lm_head + final norm


def hand_count_parameternet_down_proj_x8(layers=12, inter=8192, h=2048, experts=8):
    extra_experts = layers * (experts - 1) * inter * h  # 7 more copies of down_proj per layer
    routers = layers * inter * experts  # Linear(inter -> experts), no bias
    biases = layers * experts * h  # each expert's bias, as in the release's nn.Linear(8192, 2048) experts
    return hand_count_llama() + extra_experts + routers + biases


def test_llama_1b_matches_hand_count():
    row = summarize("llama-1b")
    assert row["total_params"] == hand_count_llama() == row["counted_params_meta"]
    assert row["total_params"] == pytest.approx(936e6, rel=0.005)
    assert row["active_params"] == row["total_params"]


def test_parameternet_1b_down_proj_x8():
    row = summarize("parameternet-llama-1b")
    routers = 12 * 8192 * 8
    active_biases = 12 * 2048  # the one chosen expert's bias per token and layer
    assert row["total_params"] == hand_count_parameternet_down_proj_x8() == row["counted_params_meta"]
    assert row["total_params"] == pytest.approx(2.35e9, rel=0.005)
    assert row["active_params"] == hand_count_llama() + routers + active_biases
    assert row["active_params"] == pytest.approx(937e6, rel=0.002)
    # Same FLOPs per token up to the routers: 2 x 8192 x 8 per layer.
    vanilla = account(load_model_config("llama-1b"), 2048).forward_flops_per_token
    assert row["forward_flops_per_token"] - vanilla == 12 * 2 * 8192 * 8
    assert row["flops_vs_vanilla"] < 1.001


def test_standard_moe_tiny_matches_hand_count():
    """moe-mlp-llama-tiny: one router per layer over 8 whole SwiGLU MLPs (h 256, inner 688, 4 layers, vocab 8000)."""
    h, inter, layers, experts = 256, 688, 4, 8
    row = summarize("moe-mlp-llama-tiny", seq_len=256)
    routers = layers * (h * experts + experts)  # Linear(h -> 8) with a bias (the centred router)
    extra_experts = layers * (experts - 1) * 3 * h * inter  # 7 more whole MLPs per layer
    vanilla = hand_count_llama(h=h, layers=layers, inter=inter, vocab=8000)
    assert row["total_params"] == vanilla + extra_experts + routers == row["counted_params_meta"]
    assert row["active_params"] == vanilla + routers  # one MLP per token, as the dense twin
    twin = account(load_model_config("llama-tiny"), 256).forward_flops_per_token
    assert row["forward_flops_per_token"] - twin == layers * 2 * h * experts  # the routers' matmuls only


def test_forward_flops_formula_includes_attention():
    acc = account(load_model_config("llama-1b"), 2048)
    matmul_params = hand_count_llama() - 32000 * 2048 - 12 * 2 * 2048 - 2048  # minus embedding table and norms
    attention = 12 * 4 * 2048 * 2048
    assert acc.forward_flops_per_token == 2 * matmul_params + attention
    assert acc.train_flops_per_token == 3 * acc.forward_flops_per_token


def test_summary_cli_prints_json_and_refuses_unknown(capsys):
    assert main(["llama-tiny", "parameternet-llama-tiny", "--json", "--seq-len", "256"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["model"] for r in rows] == ["llama-tiny", "parameternet-llama-tiny"]
    assert rows[1]["total_params"] > rows[0]["total_params"] and rows[1]["seq_len"] == 256
    assert main(["no-such-preset"]) == 2
    assert "no-such-preset" in capsys.readouterr().err


# --- Will it fit? (llm/model/memory.py, `summary --memory`) -------------------------------------------------------


REPO = Path(__file__).resolve().parents[1]
PRESETS = [
    "llama-1b",
    "parameternet-llama-1b",
    "llama-tiny",
    "parameternet-llama-tiny",
    "llama-small",
    "parameternet-llama-small",
    "moe-mlp-llama-tiny",
]
# (GPUs per node, nodes), as DeepSpeed's estimators take them; our --gpus is their product.
CLUSTERS = [(1, 1), (8, 1), (8, 2), (4, 16)]


def states(name: str, stage: int, gpus: int, **layout) -> float:
    return model_state_bytes(load_model_config(name), TrainingLayout(gpus=gpus, zero_stage=stage, **layout)).total


def cold_estimator_rows(printed: str) -> dict[str, float]:
    """'Options' -> per-GPU GiB, from the table an estimate_*_all_cold function prints."""
    rows = {}
    for line in printed.splitlines():
        match = re.match(r"\s*[\d.]+GB \|\s*([\d.]+)GB \| (.+)$", line)
        if match:
            rows[match.group(2).strip()] = float(match.group(1))
    return rows


@pytest.mark.parametrize("name", PRESETS)
def test_parameter_split_and_largest_layer_match_deepspeed(name):
    """DeepSpeed's ZeRO-3 estimator takes the largest layer as the most parameters one module holds directly."""
    from deepspeed.runtime.zero.stage3 import model_to_params

    config = load_model_config(name)
    split = parameter_split(config)
    with torch.device("meta"):
        model = build_model(config)
    # model_to_params dedupes shared tensors by data_ptr, which is 0 for every meta tensor: take its largest layer only.
    assert model_to_params(model)[1] == split.largest_module
    assert split.total == account(config).total_params
    experts = sum(
        getattr(m, attr).numel()
        for _, m in getattr(model, "moe_layers", lambda: [])()
        for attr in m.expert_param_names
        if getattr(m, attr) is not None
    )
    assert split.expert == experts and (experts > 0) == (not name.startswith("llama"))


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("per_node, nodes", CLUSTERS)
def test_model_states_match_deepspeed_zero2_estimator(name, per_node, nodes, capsys):
    """`estimate_zero2_model_states_mem_needs` without offload is 2P + 18P/N (bf16 params; bf16 + fp32 gradients,
    fp32 master and Adam moments sharded): our ZeRO-2 figure, to the byte. Its additional_buffer_factor scales only
    its CPU figure. DeepSpeed has no ZeRO-1 estimator: ZeRO-1 keeps the 16-bit gradients whole (2P instead of 2P/N);
    ZeRO-0 shards nothing, which is the estimator's 1-GPU case."""
    from deepspeed.runtime.zero.stage_1_and_2 import (
        estimate_zero2_model_states_mem_needs,
        estimate_zero2_model_states_mem_needs_all_cold,
    )

    total = parameter_split(load_model_config(name)).total
    gpus = per_node * nodes
    _, ds = estimate_zero2_model_states_mem_needs(total, per_node, nodes, cpu_offload=False)
    _, ds_one_gpu = estimate_zero2_model_states_mem_needs(total, 1, 1, cpu_offload=False)
    assert states(name, 2, gpus) == pytest.approx(ds, abs=2)
    assert states(name, 1, gpus) == pytest.approx(ds + 2 * total * (1 - 1 / gpus), abs=2)
    assert states(name, 0, gpus) == pytest.approx(ds_one_gpu, abs=2)
    # The same through the public function that prints its table.
    estimate_zero2_model_states_mem_needs_all_cold(total, per_node, nodes)
    printed = cold_estimator_rows(capsys.readouterr().out)
    assert printed["offload_optimizer=none"] == round(states(name, 2, gpus) / GIB, 2)


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("per_node, nodes", CLUSTERS)
def test_model_states_match_deepspeed_zero3_estimator(name, per_node, nodes, capsys):
    """`estimate_zero3_model_states_mem_needs` without offload is 4 x largest layer + 18P/N, where 18 = bf16 params
    + fp32 gradients, master and moments. stage3.py also keeps the reduced gradient partition in the
    gradient-accumulation dtype (bf16 by default, `grad_partitions_flat_buffer`): 2P/N more, which its ZeRO-2
    formula counts and its ZeRO-3 formula leaves out. We count it; the test adds it to DeepSpeed's figure."""
    from deepspeed.runtime.zero.stage3 import (
        estimate_zero3_model_states_mem_needs,
        estimate_zero3_model_states_mem_needs_all_cold,
    )

    split = parameter_split(load_model_config(name))
    gpus = per_node * nodes
    _, ds, largest = estimate_zero3_model_states_mem_needs(
        split.total, split.largest_module, per_node, nodes, cpu_offload=False, cpu_offload_params=False
    )
    ours = model_state_bytes(load_model_config(name), TrainingLayout(gpus=gpus, zero_stage=3))
    assert ours.zero3_gathered == largest
    assert ours.total == pytest.approx(ds + 2 * split.total / gpus, abs=2)
    estimate_zero3_model_states_mem_needs_all_cold(split.total, split.largest_module, per_node, nodes)
    printed = cold_estimator_rows(capsys.readouterr().out)
    row = "offload_param=none, offload_optimizer=none, zero_init=1"
    assert printed[row] == round((ours.total - 2 * split.total / gpus) / GIB, 2)


def test_expert_parallel_shards_expert_weights_and_keeps_optimizer_share():
    """EP over E ranks: each rank holds 1/E of the experts; ZeRO shards those over the N/E expert-data ranks, so the
    optimizer state per rank is the same 1/N share as without EP."""
    config = load_model_config("parameternet-llama-1b")
    split = parameter_split(config)
    for stage in (1, 2):
        plain = model_state_bytes(config, TrainingLayout(gpus=8, zero_stage=stage))
        for ep in (2, 8):
            sharded = model_state_bytes(config, TrainingLayout(gpus=8, zero_stage=stage, expert_parallel=ep))
            assert sharded.weights == 2 * (split.dense + split.expert / ep)
            assert sharded.optimizer == pytest.approx(plain.optimizer) == pytest.approx(12 * split.total / 8)
            assert sharded.fp32_gradients == pytest.approx(4 * split.total / 8)
            expected_grads = 2 * split.total / 8 if stage == 2 else 2 * (split.dense + split.expert / ep)
            assert sharded.gradients == pytest.approx(expected_grads)
    for layout, message in [
        (TrainingLayout(gpus=8, zero_stage=3, expert_parallel=2), "zero=3"),
        (TrainingLayout(gpus=6, expert_parallel=4), "does not divide gpus=6"),
        (TrainingLayout(gpus=12, expert_parallel=3), "num_experts=8"),
    ]:
        with pytest.raises(ValueError, match=message):
            model_state_bytes(config, layout)
    with pytest.raises(ValueError, match="needs a ParameterNet model"):
        model_state_bytes(load_model_config("llama-1b"), TrainingLayout(gpus=2, expert_parallel=2))


def test_fp32_bytes_per_parameter():
    """fp32 at ZeRO-0 is a plain torch AdamW (weights, grads, m, v: 16 B/param); ZeRO keeps fp32 copies anyway."""
    total = parameter_split(load_model_config("llama-1b")).total
    assert states("llama-1b", 0, 1, precision="fp32") == 16 * total
    assert states("llama-1b", 1, 1, precision="fp32") == 24 * total
    assert states("llama-1b", 1, 8, precision="fp32") == 8 * total + 16 * total / 8
    assert states("llama-1b", 0, 1, precision="bf16") == 20 * total


def test_activation_estimate_scales_and_checkpointing_shrinks_it():
    config = load_model_config("parameternet-llama-1b")
    base = activation_bytes(config, TrainingLayout(micro_batch=2, seq_len=1024))
    assert activation_bytes(config, TrainingLayout(micro_batch=4, seq_len=1024)).total == 2 * base.total
    assert activation_bytes(config, TrainingLayout(micro_batch=2, seq_len=2048)).total == 2 * base.total
    ckpt = activation_bytes(config, TrainingLayout(micro_batch=2, seq_len=1024, activation_checkpointing=True))
    assert ckpt.layers < base.layers / 5 and ckpt.logits == base.logits
    # Flash/SDPA: no seq^2 term, so bytes per token do not depend on the sequence length.
    assert base.total / (2 * 1024) == activation_bytes(config, TrainingLayout(seq_len=16)).total / 16
    # The MoE down_proj keeps more than the dense one (sorted input copy, expert output, router), never less.
    vanilla = activation_bytes(load_model_config("llama-1b"), TrainingLayout(micro_batch=2, seq_len=1024))
    assert vanilla.layers < base.layers < 1.25 * vanilla.layers
    assert base.logits == 2 * 1024 * 14 * 32000  # bf16 logits + fp32 log-probs + two fp32 grads


@pytest.mark.parametrize("name", ["llama-tiny", "parameternet-llama-tiny", "moe-mlp-llama-tiny"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_estimate_equals_what_autograd_saves(name, dtype, checkpointing, one_torch_thread):
    """The per-layer count, to the byte, against every tensor autograd saves for the backward on CPU (SDPA picks the
    flash kernel there too), parameters left out. With checkpointing the forward saves the layer inputs; the one
    layer recomputed in the backward is not in the forward. The loss adds the fp32 log-probs."""
    config = load_model_config(name)
    torch.manual_seed(0)
    model = build_model(config, attn_implementation="sdpa", dtype=dtype).train()
    if checkpointing:
        model.activation_checkpointing_enable()  # as the trainer does
    batch, seq = 2, 64
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def saved_bytes(with_loss: bool) -> int:
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            if storage.data_ptr() not in weights:
                storages[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = model(input_ids=ids).logits
            if with_loss:
                torch.nn.functional.cross_entropy(logits.float().reshape(-1, config.vocab_size), ids.reshape(-1))
        return sum(storages.values())

    precision = "bf16" if dtype == torch.bfloat16 else "fp32"
    per_token = activation_bytes_per_token(config, precision, checkpointing)
    tokens = batch * seq
    analytic = (per_token.layers - (per_token.layer if checkpointing else 0) + per_token.head) * tokens
    head_dim = config.hidden_size // config.num_attention_heads
    rope = 0 if checkpointing else 2 * seq * head_dim * dtype.itemsize  # cos and sin, shared by every layer
    extra = saved_bytes(False) - analytic - rope - ids.nbytes
    # Per-layer (not per-token) routing tensors: expert counts and fractions, [num_experts] each.
    per_layer_bound = 16 * getattr(config, "num_experts", 0) * config.num_hidden_layers
    if getattr(config, "router_input", "raw") == "centered" and dtype != torch.float32:
        # and the fp32 copy of each 16-bit router weight, [E, fan_in], that the centred router multiplies by
        fan_in = config.hidden_size if config.moe_mlp else config.intermediate_size
        per_layer_bound += 4 * config.num_experts * fan_in * config.num_hidden_layers
    assert 0 <= extra <= per_layer_bound, (saved_bytes(False), analytic)
    log_probs = saved_bytes(True) - saved_bytes(False)
    assert 4 * config.vocab_size * tokens <= log_probs <= 4 * config.vocab_size * tokens + 64


def run_summary(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llm.model.summary", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def test_memory_cli_fits_and_does_not_fit(capsys):
    """One GPU, ZeRO-1, micro-batch 12 at seq 2048: vanilla fits an 80 GiB GPU, ParameterNet (2.5x the model
    states) does not. One subprocess (importing transformers takes seconds); --json in process."""
    run = run_summary(
        "llama-1b",
        "parameternet-llama-1b",
        "--memory",
        "--gpus",
        "1",
        "--zero",
        "1",
        "--micro-batch",
        "12",
        "--seq-len",
        "2048",
    )
    assert run.returncode == 0, run.stderr
    vanilla, parameternet = run.stdout.split("\n\n")
    assert vanilla.startswith("llama-1b:") and parameternet.startswith("parameternet-llama-1b:")
    assert "FITS: peak" in vanilla and "DOES NOT FIT: peak" in parameternet
    for block in (vanilla, parameternet):
        assert "* analytic estimate" in block and "model states" in block and "GPU 80 GiB" in block
    weights = re.search(r"weights\s+bf16\s+([\d.]+)", parameternet).group(1)
    assert float(weights) == round(2 * hand_count_parameternet_down_proj_x8() / GIB, 2)

    assert main(["parameternet-llama-1b", "--memory", "--micro-batch", "12", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["fits"] is False and 0 < row["largest_micro_batch"] < 12
    assert row["bytes_per_gpu"]["peak"] > row["usable_gib"] * GIB
    assert row["layout"] == {
        "gpus": 1,
        "zero_stage": 1,
        "expert_parallel": 1,
        "precision": "bf16",
        "micro_batch": 12,
        "seq_len": 2048,
        "activation_checkpointing": False,
    }


def test_memory_cli_gpu_memory_decides(capsys):
    """The same layout does not fit an 80 GiB H100 and fits a 140 GiB H200 (in process: one subprocess is enough)."""
    layout = ["parameternet-llama-1b", "--memory", "--gpus", "1", "--zero", "1", "--micro-batch", "16"]
    assert main(layout) == 0
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert main([*layout, "--gpu-memory", "140"]) == 0
    out = capsys.readouterr().out
    assert "GPU 140 GiB - headroom 15.00 GiB" in out and "FITS: peak" in out


def test_memory_cli_refuses_bad_layouts(capsys):
    assert main(["llama-1b", "--memory", "--ep", "2", "--gpus", "2"]) == 2
    assert "ParameterNet" in capsys.readouterr().err
    assert main(["llama-tiny", "--memory", "--seq-len", "4096"]) == 2
    assert "max_position_embeddings=1024" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["llama-tiny", "--gpus", "8"])  # a memory option without --memory
    assert "--gpus needs --memory" in capsys.readouterr().err


def test_memory_estimate_largest_micro_batch_is_the_boundary():
    config = load_model_config("parameternet-llama-1b")
    est = estimate(config, TrainingLayout(gpus=1, zero_stage=1, micro_batch=1, seq_len=2048), gpu_memory_gib=80)
    largest = est.largest_micro_batch
    assert largest > 1 and est.largest_micro_batch_checkpointing > largest
    at = estimate(config, TrainingLayout(gpus=1, zero_stage=1, micro_batch=largest, seq_len=2048))
    over = estimate(config, TrainingLayout(gpus=1, zero_stage=1, micro_batch=largest + 1, seq_len=2048))
    assert at.fits and not over.fits
    # Model states alone over the budget: nothing fits.
    assert estimate(config, TrainingLayout(gpus=1, zero_stage=0), gpu_memory_gib=40).largest_micro_batch == 0


ENGINE_PROBE = (
    ONE_RANK_ENGINE_PREAMBLE
    + r"""
import torch.nn.functional as F
from llm.model.presets import build_model, load_model_config
from runtime.ds_config import complete_ds_config
from llm.train.optim import parameter_groups

def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)

config = load_model_config("parameternet-llama-tiny", num_hidden_layers=2, vocab_size=1024)
for precision, stage in (("bf16", 0), ("bf16", 1), ("bf16", 2), ("fp32", 0), ("fp32", 1)):
    torch.manual_seed(0)
    model = build_model(config, attn_implementation="sdpa")
    adamw = {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}
    ds = complete_ds_config(f"zero{stage}", micro_batch_size=1, global_batch_size=1, data_parallel_size=1,
                            precision=precision, optimizer=adamw)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=parameter_groups(model, 0.1),
                                                   config=ds)
    inner = getattr(optimizer, "optimizer", optimizer)  # the torch AdamW under DeepSpeed's wrapper, if any
    seen = {"master": 0, "fp32_grads": 0, "moments": 0, "on_module_params": True}

    def hook(opt, args, kwargs):
        # ZeRO steps one parameter group at a time: add up over the calls.
        params = [p for g in opt.param_groups for p in g["params"]]
        module = {p.untyped_storage().data_ptr() for p in engine.module.parameters()}
        seen["on_module_params"] &= all(p.untyped_storage().data_ptr() in module for p in params)
        seen["master"] += nbytes(params)
        seen["fp32_grads"] += nbytes([p.grad for p in params if p.grad is not None])
        seen["moments"] += nbytes([t for p in params for t in opt.state[p].values()
                                   if torch.is_tensor(t) and t.numel() == p.numel()])

    inner.register_step_post_hook(hook)
    ids = torch.randint(0, config.vocab_size, (1, 16))
    out = engine(input_ids=ids)
    engine.backward(F.cross_entropy(out.logits.float().reshape(-1, config.vocab_size), ids.reshape(-1)))
    grads = nbytes([p.grad for p in engine.module.parameters() if p.grad is not None])
    engine.step()
    print(json.dumps({"precision": precision, "stage": stage, "weights": nbytes(list(engine.module.parameters())),
                      "module_grads": grads, **seen}), flush=True)
    engine.destroy()
"""
)


@pytest.mark.slow
def test_model_state_bytes_equal_a_deepspeed_engine_on_cpu():
    """One step of a real DeepSpeed engine (1 CPU rank, our ds_configs and AdamW block): the bytes of the module's
    weights, and, seen from inside the optimizer step, of the tensors AdamW steps on (fp32 master), their gradients
    (the fp32 copy) and its moments, equal the analytic figures. (ZeRO moves the 16-bit gradients into its own
    buffers, so those are compared only at stage 0.)"""
    result = subprocess.run(
        [sys.executable, "-c", ENGINE_PROBE],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 5
    config = load_model_config("parameternet-llama-tiny", num_hidden_layers=2, vocab_size=1024)
    for row in rows:
        ours = model_state_bytes(config, TrainingLayout(zero_stage=row["stage"], precision=row["precision"]))
        assert row["weights"] == ours.weights, row
        if row["on_module_params"]:  # fp32 ZeRO-0: a plain AdamW on the model's own tensors
            assert row["precision"] == "fp32" and row["stage"] == 0 and ours.fp32_gradients == 0
            assert row["fp32_grads"] == ours.gradients and row["moments"] == ours.optimizer
        else:
            assert row["master"] + row["moments"] == ours.optimizer, row
            assert row["fp32_grads"] == ours.fp32_gradients, row
        if row["stage"] == 0:
            assert row["module_grads"] == ours.gradients, row
