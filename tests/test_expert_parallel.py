"""Expert parallelism (llm/parallel/): 2 gloo ranks with experts sharded against the unsharded layer/model.

All 2-rank cases run in ONE torchrun launch of tests/ep_worker.py (start-up dominates); the tests below assert on the
JSON it writes. What "the same" means is spelled out in ep_worker.py's docstring.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llm.model import MoELinear, RouterConfig
from llm.parallel import AllToAllExperts, shard_experts
from runtime.dist import free_port

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ep_results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ep") / "results.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(REPO / "tests" / "ep_worker.py"),
        str(out),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (
        f"ep_worker failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )
    return json.loads(out.read_text())


def _errors(results: dict, case: str) -> list[str]:
    return [f"rank {rank}: {e}" for rank, entry in results[case].items() for e in entry["errors"]]


def _cases(results: dict, prefix: str) -> list[str]:
    names = [name for name in results if name.startswith(prefix)]
    assert names, f"no {prefix}* cases in {sorted(results)}"
    return names


pytestmark = pytest.mark.distributed


def test_layer_matches_single_rank(ep_results):
    names = _cases(ep_results, "layer_")
    assert len(names) == 8  # top_k 1/2 x dropless/capacity x bias
    for name in names:
        assert not _errors(ep_results, name), "\n".join([name, *_errors(ep_results, name)])
        for entry in ep_results[name].values():
            m = entry["metrics"]
            assert m["cross_rank_rows"] > 0  # tokens really crossed ranks
            assert m["expert_grad_abs_sum"] > 0
            assert (m["dropped"] > 0) == ("cap1.0" in name)  # the capacity factor really dropped tokens


@pytest.mark.parametrize(
    "kind, cases, expert_params",
    [("model_k", 4, 4), ("model_mlp_k", 2, 6)],  # ParameterNet: 2 layers x up/down; standard MoE: x gate/up/down
)
def test_model_matches_single_rank(ep_results, kind, cases, expert_params):
    names = _cases(ep_results, kind)
    assert len(names) == cases
    for name in names:
        assert not _errors(ep_results, name), "\n".join([name, *_errors(ep_results, name)])
        ranks = ep_results[name]
        assert all(r["metrics"]["cross_rank_rows"] > 0 for r in ranks.values())
        assert all(r["metrics"]["num_expert_params"] == expert_params for r in ranks.values())
        assert ranks["0"]["metrics"]["loss"] != ranks["1"]["metrics"]["loss"]  # ranks fed different tokens
        assert all((r["metrics"]["dropped"] > 0) == ("cap1.0" in name) for r in ranks.values())


def test_rank_receiving_no_tokens_gets_zero_expert_grads(ep_results):
    for name in ("zero_rows_on_rank1", "zero_rows_on_rank0"):
        assert not _errors(ep_results, name), "\n".join([name, *_errors(ep_results, name)])
        for entry in ep_results[name].values():
            m = entry["metrics"]
            if m["receives_rows"]:
                assert m["expert_grad_abs_sum"] > 0
            else:  # a zero tensor (the worker checked it is not None and equals the reference)
                assert m["expert_grad_abs_sum"] == 0.0
                assert m["cross_rank_rows"] == m["tokens"]


def test_ep_not_dividing_num_experts_is_refused(ep_results):
    assert not _errors(ep_results, "bad_ep")
    metrics = ep_results["bad_ep"]["0"]["metrics"]
    for key in ("shard_3_experts", "dispatcher_3_experts"):
        assert "ep=2" in metrics[key] and "num_experts=3" in metrics[key]
    assert "already sharded" in metrics["shard_twice"]


def test_without_torch_distributed_a_clear_error():
    if torch.distributed.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        shard_experts(MoELinear(8, 8, RouterConfig(num_experts=2)), None)
    with pytest.raises(RuntimeError, match="init_process_group"):
        AllToAllExperts(None, num_experts=2)


def _distributed_uses(source: str) -> list[str]:
    """Imports of torch.distributed and attribute uses `<x>.distributed` / `dist.<y>` in a module's code."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("torch.distributed")]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [f"{node.module}.{a.name}" for a in node.names]
            found += [n for n in names if n.startswith("torch.distributed")]
        elif isinstance(node, ast.Attribute) and node.attr == "distributed":
            found.append(ast.unparse(node))
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "dist":
            found.append(ast.unparse(node))
    return found


def test_model_package_has_no_distributed_code():
    # The model knows only the dispatcher interface (issue 13): expert parallelism lives in llm/parallel/.
    assert _distributed_uses(
        "import torch.distributed as dist\nfrom torch import distributed\ndist.get_rank()\n"
        "torch.distributed.is_initialized()\n"
    )  # the scanner sees each form
    offending = {
        path.relative_to(REPO).as_posix(): uses
        for path in sorted((REPO / "llm" / "model").rglob("*.py"))
        if (uses := _distributed_uses(path.read_text()))
    }
    assert not offending, f"distributed code in llm/model/ (move it to llm/parallel/): {offending}"
