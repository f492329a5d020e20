"""SLURM helpers: node lists for the launch scripts, and ranks for one-task-per-rank `srun` steps.

`python -m runtime.slurm hostnames 'gpu[01-03,07]'` prints one host a line (what `scontrol show hostnames` does,
for machines without scontrol and for tests); `python -m runtime.slurm node-env` prints the launcher variables of an
srun task that runs one launcher per node."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping


def expand_nodelist(nodelist: str) -> list[str]:
    """'a[01-02],b3,c[7,9-10]' -> ['a01', 'a02', 'b3', 'c7', 'c9', 'c10']."""
    hosts: list[str] = []
    for match in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist):
        prefix, ranges = match.group(1), match.group(2)
        if ranges is None:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            if "-" in part:
                lo, hi = part.split("-", 1)
                hosts.extend(f"{prefix}{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1))
            else:
                hosts.append(prefix + part)
    return hosts


def _master(environ: Mapping[str, str]) -> dict[str, str]:
    """The step's first node, on a port every task derives from the job id, unless MASTER_ADDR/PORT are given."""
    return {
        "MASTER_ADDR": environ.get("MASTER_ADDR") or expand_nodelist(environ["SLURM_STEP_NODELIST"])[0],
        "MASTER_PORT": environ.get("MASTER_PORT") or str(20000 + int(environ.get("SLURM_JOB_ID", "0")) % 20000),
    }


def node_env(environ: Mapping[str, str]) -> dict[str, str]:
    """For a launcher run as one srun task per node (launch/common.sh): NNODES, NODE_RANK and the rendezvous.
    {} outside a multi-node step or when NNODES is already set."""
    if "SLURM_STEP_ID" not in environ or int(environ.get("SLURM_STEP_NUM_NODES", "1")) < 2 or "NNODES" in environ:
        return {}
    return {"NNODES": environ["SLURM_STEP_NUM_NODES"], "NODE_RANK": environ["SLURM_NODEID"], **_master(environ)}


def rank_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The torch.distributed variables of a task in an `srun` step that runs one task per rank; {} elsewhere.

    Only job steps count (SLURM_STEP_NUM_TASKS is set by srun, not in the batch script or an salloc shell, where
    SLURM_NTASKS describes the allocation, not this process). The rendezvous is the step's first node, on a port
    every task derives from the job id (as node_env does for one launcher per node) unless MASTER_PORT is given."""
    if "RANK" in environ or "SLURM_STEP_NUM_TASKS" not in environ or "SLURM_PROCID" not in environ:
        return {}
    return {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": environ["SLURM_STEP_NUM_TASKS"],
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
        **_master(environ),
    }


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "hostnames":
        print("\n".join(expand_nodelist(argv[1])))
        return 0
    if argv == ["node-env"]:  # KEY=VALUE lines for launch/common.sh
        print("\n".join(f"{k}={v}" for k, v in node_env(os.environ).items()))
        return 0
    print("usage: python -m runtime.slurm hostnames NODELIST | node-env", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
