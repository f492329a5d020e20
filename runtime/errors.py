"""Errors the user must fix: the one error type a trainer raises once running, how every CLI prints an error (one
line, once per node), and both trainers' entry point (`trainer_main`, whose `run_trainer` applies that rule to a whole
run)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any


class TrainingError(RuntimeError):
    """A problem the user must fix: bad input found once the run starts, a refused resume, non-finite weights."""


# What a trainer refuses with one line and exit 2 (anything else is a bug: its traceback, on every rank).
USER_ERRORS = (TrainingError, ValueError, FileNotFoundError)


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


def run_trainer(body: Callable[[], object], argv: list[str], prog: str | None = None) -> int:
    """Both trainers' entry point after their command line is parsed: run `body` (set-up and training), turn a user
    error into one `[prog: ]error:` line and exit code 2 (0 when the run ends), and stop listening for stop signals and
    close the process group whatever happened.

    Who prints: the node's first rank (`first_rank_on_node`), and, for an error marked `rank_specific`, every rank
    that raises it. Why: every other error is met alike by every rank - they read the same command line, config and
    files, and what one rank finds alone (a lock held, a full disk at a save) the trainers make every rank's through
    a collective before raising - so one line per node says it all, where one per rank said it N times. Once per
    node rather than once on rank 0: nodes may see different files (node-local data or checkpoints), and a refusal
    met on another node only would go unreported by rank 0. An error only one rank meets (an image that its loader
    cannot decode) is marked `rank_specific = True` and printed by that rank: its node's first rank may never see
    it."""
    from runtime.dist import PreemptionFlag

    try:
        body()
        code = 0
    except USER_ERRORS as err:
        if getattr(err, "rank_specific", False) or first_rank_on_node(argv):
            print_error(str(err), prog=prog)  # one line in one write: ranks share the terminal
        code = 2
    finally:
        # The launch script repeats its stop request until the ranks exit; Python restores the default (fatal) action
        # for handled signals while it shuts down, so stop listening before then.
        PreemptionFlag.stop_listening()
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return code


def trainer_main(
    engine: Any,
    load_config: Callable[..., Any],
    doc: str,
    body: Callable[[Any], object],
    argv: list[str] | None = None,
    warnings: Callable[[Any], list[str]] | None = None,
) -> int:
    """Both trainers' `main`: the command line through `engine` (a runtime.config.ConfigEngine; `load_config(path,
    cli_overrides=...)` builds and checks the config; --help and a bad command line return here), the config's
    `warnings` once per node, then `body(config)` under `run_trainer`, errors prefixed with `engine.prog`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, code = engine.parse_command_line(argv, lambda path, pairs: load_config(path, cli_overrides=pairs), doc)
    if cfg is None:
        return code
    if warnings is not None and first_rank_on_node(argv):  # the same on every rank: once per node
        for note in warnings(cfg):
            print_error(note, kind="warning", prog=engine.prog)
    return run_trainer(lambda: body(cfg), argv, engine.prog)
