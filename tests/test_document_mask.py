"""Document-masked packing (--document_mask, llm/train/packing.py): the attention inputs built from a packed batch, and
the logits of a packed sample equal to those of each of its documents run alone (vanilla LLaMA, ParameterNet-LLaMA
with the raw and the centred router), which they are not without the mask."""

import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM

from llm.model import ParameterNetLlamaConfig, ParameterNetLlamaForCausalLM
from llm.train.packing import attention_inputs, document_mask, document_positions, varlen_lengths
from tests.tiny import TINY
from tests.trainer_utils import REPO

EOS = 2


def test_positions_documents_and_mask_of_a_packed_batch():
    tokens = torch.tensor([[5, 2, 7, 8, 2, 9], [2, 3, 4, 5, 6, 2]])
    positions, documents = document_positions(tokens, EOS)
    assert positions.tolist() == [[0, 1, 0, 1, 2, 0], [0, 0, 1, 2, 3, 4]]
    assert documents.tolist() == [[0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 1, 1]]  # an EOS belongs to the document it ends
    mask = document_mask(documents)
    assert mask.shape == (2, 1, 6, 6) and mask.dtype == torch.bool
    expected = torch.zeros(6, 6, dtype=torch.bool)
    for start, end in ((0, 2), (2, 5), (5, 6)):
        expected[start:end, start:end] = torch.ones(end - start, end - start, dtype=torch.bool).tril()
    assert torch.equal(mask[0, 0], expected)
    assert mask[1, 0, 0].tolist() == [True] + [False] * 5 and mask[1, 0, 5].tolist() == [False] + [True] * 5
    cu_seqlens, longest = varlen_lengths(positions)  # the flattened batch: 2 + 3 + 1 | 1 + 5 tokens
    assert cu_seqlens.tolist() == [0, 2, 5, 6, 7, 12] and cu_seqlens.dtype == torch.int32 and longest == 5


def test_attention_inputs_per_kernel():
    tokens = torch.tensor([[5, 2, 7, 8]])
    sdpa = attention_inputs(tokens, EOS, "sdpa")
    assert sdpa["position_ids"].tolist() == [[0, 1, 0, 1]] and sdpa["use_cache"] is False
    assert sdpa["attention_mask"].dtype == torch.bool
    eager = attention_inputs(tokens, EOS, "eager", torch.bfloat16)
    assert eager["attention_mask"].dtype == torch.bfloat16
    assert torch.equal(eager["attention_mask"] == 0, sdpa["attention_mask"])
    flash = attention_inputs(tokens, EOS, "flash_attention_2")
    assert "attention_mask" not in flash and flash["cu_seq_lens_q"].tolist() == [0, 2, 4] and flash["max_length_k"] == 2
    with pytest.raises(ValueError, match="flex_attention"):
        attention_inputs(tokens, EOS, "flex_attention")


def test_no_eos_is_one_document_per_row():
    tokens = torch.tensor([[5, 6, 7], [8, 9, 10]])
    positions, documents = document_positions(tokens, EOS)
    assert positions.tolist() == [[0, 1, 2]] * 2 and documents.tolist() == [[0, 0, 0]] * 2
    assert torch.equal(document_mask(documents)[0, 0], torch.ones(3, 3, dtype=torch.bool).tril())


def _packed_rows() -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
    """Two packed rows of 20 tokens and their documents (each ends with EOS but a row's last, cut one)."""
    generator = torch.Generator().manual_seed(0)

    def document(length: int, eos: bool = True) -> torch.Tensor:
        body = torch.randint(3, 256, (length,), generator=generator)
        if eos:
            body[-1] = EOS
        return body

    rows = [
        [document(6), document(9), document(5, eos=False)],
        [document(3), document(1), document(12), document(4, eos=False)],
    ]
    return torch.stack([torch.cat(r) for r in rows]), rows


def _vanilla(attn: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(**TINY)
    config._attn_implementation = attn
    return LlamaForCausalLM(config).double().eval()


def _parameternet(attn: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    fields = dict(moe_projections=["gate_proj", "up_proj", "down_proj"], num_experts=4, top_k=2, capacity_factor=None)
    config = ParameterNetLlamaConfig(**{**TINY, **fields, **overrides})
    config._attn_implementation = attn
    model = ParameterNetLlamaForCausalLM(config).double().eval()
    with torch.no_grad():  # a trained-looking router bias, so that the centred router's first positions differ too
        for _, layer in model.moe_layers():
            if layer.router.bias is not None:
                layer.router.bias.normal_(0.0, 1.0)
    return model


MODELS = {
    "llama": _vanilla,
    "parameternet-raw": lambda attn: _parameternet(attn, router_input="raw"),
    "parameternet-centered": lambda attn: _parameternet(attn, router_input="centered"),
    "moe-mlp-centered": lambda attn: _parameternet(attn, router_input="centered", moe_mlp=True),
}


def _document_kwargs(model: torch.nn.Module, tokens: torch.Tensor, attn: str) -> dict:
    kwargs = attention_inputs(tokens, EOS, attn, torch.float64)
    if hasattr(model, "moe_layers"):
        kwargs["document_mask"] = True  # what the trainer adds for ParameterNet models
    return kwargs


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", list(MODELS))
def test_packed_logits_equal_each_document_alone(name, attn):
    model = MODELS[name](attn)
    tokens, rows = _packed_rows()
    tol = 1e-9 if attn == "sdpa" else 1e-6  # eager attention takes its softmax in fp32 even for a float64 model
    with torch.no_grad():
        packed = model(input_ids=tokens, **_document_kwargs(model, tokens, attn)).logits
        plain = model(input_ids=tokens).logits
        for r, documents in enumerate(rows):
            start = 0
            for doc in documents:
                alone = model(input_ids=doc.unsqueeze(0)).logits[0]
                end = start + len(doc)
                torch.testing.assert_close(packed[r, start:end], alone, rtol=tol, atol=tol)
                if start > 0:  # without the mask, a later document sees the earlier ones
                    assert not torch.allclose(plain[r, start:end], alone, rtol=1e-4, atol=1e-4)
                start = end
        if name.endswith("centered"):  # the attention mask alone is not enough: the routers' mean must restart too
            kwargs = _document_kwargs(model, tokens, attn)
            kwargs.pop("document_mask")
            assert not torch.allclose(model(input_ids=tokens, **kwargs).logits, packed, rtol=1e-4, atol=1e-4)
        # The first document of a row has nothing before it: the same with or without the mask.
        torch.testing.assert_close(plain[:, :3], packed[:, :3], rtol=tol, atol=tol)


def _varlen_reference(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """flash-attn's varlen kernel written out: causal attention within each cu_seq_lens segment of the flattened
    batch; what transformers' flash_attention_2 path runs from the same keyword arguments."""
    assert attention_mask is None, "the flash path gets no mask"
    cu_seqlens = kwargs["cu_seq_lens_q"]
    assert torch.equal(cu_seqlens, kwargs["cu_seq_lens_k"]) and kwargs["max_length_q"] == kwargs["max_length_k"]
    groups = module.num_key_value_groups
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    batch, heads, seq, dim = query.shape
    q, k, v = (t.transpose(1, 2).reshape(batch * seq, heads, dim) for t in (query, key, value))
    out = torch.empty_like(q)
    for a, b in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        seg = [t[a:b].transpose(0, 1) for t in (q, k, v)]
        out[a:b] = F.scaled_dot_product_attention(*seg, is_causal=True, scale=scaling).transpose(0, 1)
    return out.view(batch, seq, heads, dim), None


@pytest.mark.parametrize("name", ["llama", "parameternet-centered"])
def test_flash_kwargs_reach_attention_and_give_the_same_logits(name):
    """No flash-attn on CPU: a pure-torch varlen kernel registered in transformers' AttentionInterface receives the
    flash_attention_2 keyword arguments through the model, and gives the logits of each document alone."""
    AttentionInterface.register("varlen_reference", _varlen_reference)
    model = MODELS[name]("sdpa")
    tokens, rows = _packed_rows()
    with torch.no_grad():
        alone = [[model(input_ids=doc.unsqueeze(0)).logits[0] for doc in documents] for documents in rows]
        kwargs = _document_kwargs(model, tokens, "flash_attention_2")
        model.config._attn_implementation = "varlen_reference"
        packed = model(input_ids=tokens, **kwargs).logits
    for r in range(len(rows)):
        torch.testing.assert_close(packed[r], torch.cat(alone[r]), rtol=1e-9, atol=1e-9)


def test_centred_router_mean_restarts_per_document():
    from llm.model.moe import MoELinear
    from llm.model.router import RouterConfig

    torch.manual_seed(0)
    layer = MoELinear(8, 8, RouterConfig(num_experts=4, top_k=1, input="centered")).double()
    x = torch.randn(1, 7, 8, dtype=torch.float64)
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1]])
    packed = layer.router.logits(x, positions)
    alone = torch.cat([layer.router.logits(x[:, a:b]) for a, b in ((0, 3), (3, 5), (5, 7))])
    torch.testing.assert_close(packed, alone, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.router.logits(x, torch.arange(7)), layer.router.logits(x))  # one document


TRAINER_STEP = """
import json, sys, torch
from llm.train.config import load_config
from llm.train.trainer import Trainer
from tests.trainer_utils import TINY_MODEL, tiny_args

overrides = tiny_args(global_batch_size=2, warmup_iters=0, eval_iters=0, export=False, train_iters=1, seq_len=64,
                      model="parameternet-llama-tiny", output_dir=sys.argv[1], model_overrides=TINY_MODEL,
                      document_mask=True)
trainer = Trainer(load_config("tiny", cli_overrides=overrides))
batch = next(trainer._batches()).clone()
batch[0, 10] = batch[1, 40] = trainer.eos_id  # a document boundary in each row (the plays are long)
kwargs = trainer._document_inputs(batch, batch)
stats = trainer.train_step(iter([batch]))
print(json.dumps({"eos": trainer.eos_id, "tokens": batch[:, :-1].tolist(),
                  "positions": kwargs["position_ids"].tolist(), "mask": list(kwargs["attention_mask"].shape),
                  "flags": [kwargs["document_mask"], kwargs["use_cache"]], "lm_loss": stats["lm_loss"]}))
"""


def test_trainer_passes_document_inputs_built_from_its_batch(tmp_path):
    """One step of the real trainer (a tiny centred ParameterNet, the embedded corpus) under --document_mask: the
    inputs it passes come from its own batch and the step trains."""
    proc = subprocess.run(
        [sys.executable, "-c", TRAINER_STEP, str(tmp_path / "run")],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["eos"] == EOS and result["flags"] == [True, False] and result["mask"] == [2, 1, 64, 64]
    expected, _ = document_positions(torch.tensor(result["tokens"]), EOS)
    assert result["positions"] == expected.tolist()
    assert result["positions"][0][11] == 0 and result["positions"][1][41] == 0
    assert math.isfinite(result["lm_loss"])
