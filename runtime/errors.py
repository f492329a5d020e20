"""Errors the user must fix: the one error type a trainer raises once running, and how every CLI prints an error (one
line, once per node)."""

from __future__ import annotations

import os
import sys


class TrainingError(RuntimeError):
    """A problem the user must fix: bad input found once the run starts, a refused resume, non-finite weights."""


def print_error(message: str, kind: str = "error", prog: str | None = None) -> None:
    """`[prog: ]error: MESSAGE` as one line in one write, flushed: ranks share a terminal or a log file, and a line
    written in pieces (print writes the text and the newline separately) interleaves with another rank's."""
    text = " ".join(part.strip() for part in str(message).splitlines() if part.strip())
    line = f"{prog + ': ' if prog else ''}{kind}: {text}\n"
    sys.stdout.flush()
    sys.stderr.write(line)
    sys.stderr.flush()


def first_rank_on_node(argv: list[str] | None = None) -> bool:
    """Is this the node's local rank 0? Every rank reads the same command line and config, so a config error is
    printed once per node (by this rank) rather than once per rank."""
    from runtime.slurm import rank_env

    env = {**os.environ, **rank_env(os.environ)}
    for key in ("LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_RANK"):
        if env.get(key, "").strip().isdigit():
            return int(env[key]) == 0
    for arg in argv or []:  # the deepspeed launcher's --local_rank=N (it sets LOCAL_RANK too)
        if arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            return arg.split("=", 1)[1].strip() in ("", "0")
    return True
