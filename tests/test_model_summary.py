"""Accounting of the 1B presets against an independent hand count, and the summary CLI."""

import json

import pytest

from llm.model.flops import account
from llm.model.presets import load_model_config
from llm.model.summary import main, summarize


def hand_count_llama(h=2048, layers=12, inter=8192, vocab=32000):
    per_layer = 4 * h * h + 3 * h * inter + 2 * h  # q,k,v,o + gate,up,down + 2 RMSNorms
    return 2 * vocab * h + layers * per_layer + h  # embeddings + untied lm_head + final norm


def test_llama_1b_matches_hand_count():
    row = summarize("llama-1b")
    assert row["total_params"] == hand_count_llama() == row["counted_params_meta"]
    assert row["total_params"] == pytest.approx(936e6, rel=0.005)
    assert row["active_params"] == row["total_params"]


def test_parameternet_1b_down_proj_x8():
    row = summarize("parameternet-llama-1b")
    extra_experts = 12 * 7 * 8192 * 2048  # 7 more copies of down_proj per layer
    routers = 12 * 8192 * 8
    assert row["total_params"] == hand_count_llama() + extra_experts + routers == row["counted_params_meta"]
    assert row["total_params"] == pytest.approx(2.35e9, rel=0.005)
    assert row["active_params"] == hand_count_llama() + routers
    assert row["active_params"] == pytest.approx(937e6, rel=0.002)
    # Same FLOPs per token up to the routers: 2 x 8192 x 8 per layer.
    vanilla = account(load_model_config("llama-1b"), 2048).forward_flops_per_token
    assert row["forward_flops_per_token"] - vanilla == 12 * 2 * 8192 * 8
    assert row["flops_vs_vanilla"] < 1.001


def test_forward_flops_formula_includes_attention():
    acc = account(load_model_config("llama-1b"), 2048)
    matmul_params = 936_429_568 - 32000 * 2048 - 12 * 2 * 2048 - 2048  # minus embedding table and norms
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
