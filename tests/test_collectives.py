"""Device-correct collectives (runtime/collectives.py) and the hot loop's host syncs.

Under the deepspeed launcher on CUDA the default process group is NCCL, whose device map holds only `cuda`; a
collective on a CPU tensor then raises "No backend type associated with device type cpu". gloo takes CPU tensors,
so CPU runs never meet this. A `cuda:gloo` group has exactly the device map of an NCCL group and exists without a
GPU: the tests below use it to check the rule, and scan the sources so no collective can bypass the rule.
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

from runtime.dist import free_port

REPO = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, timeout: float = 300) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", script, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------ (a) the rule
RULE_SCRIPT = r"""
import json, os, sys
import torch, torch.distributed as dist
from runtime import collectives

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
dist.init_process_group(sys.argv[1], rank=0, world_size=1)
out = {"device_types": collectives.device_types(), "group_device": str(collectives.group_device()),
       "serves_cpu_tensor": collectives.serves(torch.zeros(1))}
sub = dist.new_group([0])  # a subgroup inherits the default group's device map
out["subgroup_device"] = str(collectives.group_device(sub))
try:
    dist.all_reduce(torch.tensor([1]))  # what the trainers used to do
    out["raw_cpu_all_reduce"] = "ok"
except RuntimeError as err:
    out["raw_cpu_all_reduce"] = str(err)
if out["serves_cpu_tensor"]:
    t = torch.tensor([2.0, 3.0])
    out["wrapped"] = [collectives.all_reduce(t).tolist(), collectives.all_reduce_values([1.5, 2]),
                      collectives.any_rank(True), collectives.all_ranks(False), collectives.all_ranks(True),
                      [g.tolist() for g in collectives.all_gather(t)]]
dist.destroy_process_group()
print(json.dumps(out))
"""


def test_group_without_cpu_in_its_device_map_gets_cuda_and_refuses_raw_cpu_collectives():
    """`cuda:gloo` is what an NCCL group looks like: the rule must pick cuda, and a raw CPU all_reduce must fail
    there (so this test stands for the GPU situation, not a made-up one)."""
    out = _run(RULE_SCRIPT, "cuda:gloo", str(free_port()))
    assert out["device_types"] == ["cuda"]
    assert out["group_device"].startswith("cuda")
    assert out["subgroup_device"].startswith("cuda")
    assert out["serves_cpu_tensor"] is False  # the wrappers move a CPU tensor to cuda before the collective
    assert "No backend type associated with device type cpu" in out["raw_cpu_all_reduce"]


@pytest.mark.parametrize("backend", ["gloo", "cpu:gloo,cuda:gloo"])
def test_group_that_takes_cpu_tensors_gets_cpu(backend):
    """Plain gloo (every CPU run) and mixed device maps: CPU tensors stay where they are, no copies."""
    out = _run(RULE_SCRIPT, backend, str(free_port()))
    assert "cpu" in out["device_types"]
    assert out["group_device"] == "cpu" and out["subgroup_device"] == "cpu"
    assert out["serves_cpu_tensor"] is True and out["raw_cpu_all_reduce"] == "ok"
    assert out["wrapped"] == [[2.0, 3.0], [1.5, 2.0], True, False, True, [[2.0, 3.0]]]


def test_without_a_process_group_the_wrappers_are_a_world_of_one():
    from runtime import collectives

    assert collectives.group_device() == torch.device("cpu")
    t = torch.tensor([1.0, 2.0])
    assert collectives.all_reduce(t) is t and t.tolist() == [1.0, 2.0]
    assert collectives.all_ranks(True) and not collectives.all_ranks(False) and collectives.any_rank(True)
    assert [g.tolist() for g in collectives.all_gather(t)] == [[1.0, 2.0]]


TWO_RANK_SCRIPT = r"""
import json, os, sys
import torch, torch.distributed as dist
from runtime import collectives

rank = int(sys.argv[1])
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
dist.init_process_group("gloo", rank=rank, world_size=2)
out = {"sum": collectives.all_reduce(torch.tensor([rank + 1.0, 10.0 * rank])).tolist(),
       "max": collectives.all_reduce_values([rank], dist.ReduceOp.MAX),
       "any_rank": collectives.any_rank(rank == 1), "all_ranks": collectives.all_ranks(rank == 1),
       "all_ok": collectives.all_ranks(True),
       "gather": [g.tolist() for g in collectives.all_gather(torch.tensor([rank]))]}
dist.destroy_process_group()
print(json.dumps(out))
"""


def test_wrappers_reduce_over_two_gloo_ranks():
    port = str(free_port())
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", TWO_RANK_SCRIPT, str(r), port],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(2)
    ]
    outs = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-4000:]
        outs.append(json.loads(stdout.strip().splitlines()[-1]))
    for out in outs:
        assert out == {
            "sum": [3.0, 10.0],
            "max": [1.0],
            "any_rank": True,
            "all_ranks": False,
            "all_ok": True,
            "gather": [[0], [1]],
        }


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: moves CPU tensors to cuda for the collective")
def test_cpu_tensors_travel_to_cuda_and_back_on_a_cuda_only_group():
    script = RULE_SCRIPT.replace('if out["serves_cpu_tensor"]:', "if True:")
    out = _run(script, "cuda:gloo", str(free_port()))
    assert out["wrapped"] == [[2.0, 3.0], [1.5, 2.0], True, False, True, [[2.0, 3.0]]]


# ------------------------------------------------------------------------------- (b) no collective bypasses it
# Tensor collectives: each takes tensors of ours, which must be on a device the group serves. Not listed, on
# purpose: barrier (it carries no tensor of ours; NCCL's barrier allocates its own on the rank's device) and the
# *_object collectives (torch picks their device itself: _get_object_coll_device).
COLLECTIVES = {
    "all_reduce",
    "all_reduce_coalesced",
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_coalesced",
    "_all_gather_base",
    "broadcast",
    "reduce",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "_reduce_scatter_base",
    "all_to_all",
    "all_to_all_single",
    "gather",
    "scatter",
    "send",
    "recv",
    "isend",
    "irecv",
    "batch_isend_irecv",
}
COLLECTIVE_MODULES = (
    "torch.distributed",
    "torch.distributed.nn",
    "torch.distributed.nn.functional",
    "torch.distributed._functional_collectives",
    "deepspeed.comm",
)
RULE_MODULE = "runtime/collectives.py"
SCANNED = ("runtime", "llm", "vision", "evals")

# (file, enclosing function, collective) -> why it may call torch.distributed directly.
DISPATCH_REASON = (
    "the model's own tensors (routing counts, token rows and their gradients) on the device the engine "
    "put the model on, which the group serves; the exchange needs the autograd-aware "
    "torch.distributed.nn all-to-all, which the wrappers do not offer"
)
ALLOWED = {
    ("llm/parallel/experts.py", "AllToAllExperts.dispatch", "torch.distributed.all_to_all_single"): DISPATCH_REASON,
    (
        "llm/parallel/experts.py",
        "AllToAllExperts.dispatch",
        "torch.distributed.nn.functional.all_to_all_single",
    ): DISPATCH_REASON,
    (
        "llm/parallel/experts.py",
        "AllToAllExperts.combine",
        "torch.distributed.nn.functional.all_to_all_single",
    ): DISPATCH_REASON,
}


class _CollectiveCalls(ast.NodeVisitor):
    """(enclosing function, dotted collective name, line) of every call of a distributed collective in a module,
    whatever the import style: `import torch.distributed as dist`, `from torch import distributed`,
    `from torch.distributed import all_reduce`, `torch.distributed.all_reduce(...)`."""

    def __init__(self, tree: ast.Module) -> None:
        self.aliases: dict[str, str] = {}
        for node in ast.walk(tree):  # imports anywhere (functions import torch.distributed lazily)
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.asname:
                        self.aliases[a.asname] = a.name
                    else:
                        self.aliases[a.name.split(".")[0]] = a.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for a in node.names:
                    self.aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        self.scope: list[str] = []
        self.found: list[tuple[str, str, int]] = []
        self.visit(tree)

    def _dotted(self, node: ast.expr) -> str | None:
        if isinstance(node, ast.Name):
            return self.aliases.get(node.id)
        if isinstance(node, ast.Attribute):
            base = self._dotted(node.value)
            return f"{base}.{node.attr}" if base else None
        return None

    def _scoped(self, node) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _scoped

    def visit_Call(self, node: ast.Call) -> None:
        name = self._dotted(node.func)
        if name:
            module, _, attr = name.rpartition(".")
            if module in COLLECTIVE_MODULES and attr in COLLECTIVES:
                self.found.append((".".join(self.scope), name, node.lineno))
        self.generic_visit(node)


def _collective_calls() -> dict[str, list[tuple[str, str, int]]]:
    calls = {}
    for top in SCANNED:
        for path in sorted((REPO / top).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            found = _CollectiveCalls(ast.parse(path.read_text(), filename=rel)).found
            if found:
                calls[rel] = found
    return calls


def test_the_scanner_sees_every_import_style():
    source = (
        "import torch\nimport torch.distributed as dist\nfrom torch import distributed as d2\n"
        "from torch.distributed import all_reduce as ar\nimport torch.distributed.nn.functional as fn\n"
        "def f(t):\n    dist.all_reduce(t)\n    d2.broadcast(t, 0)\n    ar(t)\n"
        "    torch.distributed.all_gather([t], t)\n"
        "    fn.all_to_all_single(t, t)\n    dist.barrier()\n    dist.all_gather_object([None], 1)\n"
        "    dist.get_rank()\n"
    )
    found = _CollectiveCalls(ast.parse(source)).found
    assert [name for _, name, _ in found] == [
        "torch.distributed.all_reduce",
        "torch.distributed.broadcast",
        "torch.distributed.all_reduce",
        "torch.distributed.all_gather",
        "torch.distributed.nn.functional.all_to_all_single",
    ]
    assert {scope for scope, _, _ in found} == {"f"}


def test_every_collective_goes_through_the_collectives_module():
    calls = _collective_calls()
    assert calls.get(RULE_MODULE), "the scanner found no collective in collectives.py itself: it is broken"
    offending, used = [], set()
    for rel, found in calls.items():
        if rel == RULE_MODULE:
            continue
        for scope, name, line in found:
            key = (rel, scope, name)
            if key in ALLOWED:
                used.add(key)
            else:
                offending.append(f"{rel}:{line} {scope or '<module>'} calls {name}")
    assert not offending, (
        "collectives outside runtime/collectives.py (under NCCL a CPU tensor there raises; "
        "use its wrappers, which put tensors on the group's device):\n" + "\n".join(offending)
    )
    assert used == set(ALLOWED), f"stale allow-list entries: {sorted(set(ALLOWED) - used)}"


# -------------------------------------------------------------------------------------- host syncs per step
SYNC_SCRIPT = r"""
import json, sys, torch, torch.distributed as dist
from pathlib import Path

OURS = (str(Path("llm/train").resolve()), str(Path("runtime").resolve()))
counts = {"host_reads": 0, "collectives": 0}

def counted(fn, key):
    def wrapper(*args, **kwargs):
        if sys._getframe(1).f_code.co_filename.startswith(OURS):
            counts[key] += 1
        return fn(*args, **kwargs)
    return wrapper

# Every way a tensor's value reaches the host (a device sync on a GPU), when the trainer code asks for it.
for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"):
    setattr(torch.Tensor, name, counted(getattr(torch.Tensor, name), "host_reads"))
for name in ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter_tensor",
             "all_to_all_single", "barrier"):
    setattr(dist, name, counted(getattr(dist, name), "collectives"))

from llm.train.config import load_config
from llm.train.trainer import Trainer

from tests.trainer_utils import tiny_args

overrides = tiny_args(global_batch_size=6, warmup_iters=0, eval_interval=None, eval_iters=None, export=False,
                      train_iters=4, model="parameternet-llama-tiny", output_dir=sys.argv[1])
trainer = Trainer(load_config("tiny", cli_overrides=overrides))
batches = trainer._batches()
per_step = []
for _ in range(3):
    before = dict(counts)
    stats = trainer.train_step(batches)
    per_step.append({k: counts[k] - before[k] for k in counts})
print(json.dumps({"grad_accum": trainer.grad_accum, "per_step": per_step,
                  "counts_logged": stats["counts"] is not None}))
"""


def test_train_step_syncs_with_the_host_once(tmp_path):
    """One optimizer step of 3 micro-batches of a MoE model: exactly one collective and one host read from the
    trainer code (the skip decision, with losses, expert counts and the preemption flag in the same vector).
    DeepSpeed's own syncs are not counted; on CPU, counting calls is the honest measure."""
    out = _run(SYNC_SCRIPT, str(tmp_path / "run"), timeout=600)
    assert out["grad_accum"] == 3 and out["counts_logged"]
    assert out["per_step"] == [{"host_reads": 1, "collectives": 1}] * 3
