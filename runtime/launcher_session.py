"""Run a launcher (DeepSpeed's runner, its ranks) in a session of its own, tied to the script that started it.

    python -m runtime.launcher_session OWNER_PID -- COMMAND [ARGS ...]

Why: `timeout`, a closing terminal, many schedulers and Ctrl-C signal a whole process group. In one group with the
launch script, SIGTERM reached DeepSpeed's runner (which died at once), its `launch.py` (which SIGKILLs the ranks 30 s
later and exits 1) and the ranks, so the script exited 143 while the ranks were still writing a checkpoint. In a
session of its own the launcher sees only what the script forwards (a stop request to the ranks), and the script's
exit status is the launcher's, after the last rank is gone.

Nothing is left behind: this process is the session's subreaper (orphaned ranks are reparented to it and waited for)
and dies with OWNER_PID (the kernel's parent-death signal), killing the whole session - so SIGKILL to the script's
group still stops everything, as it did when all were one group.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
# A signal nobody sends by accident: the parent-death notice, distinct from a scheduler's TERM.
OWNER_GONE = signal.SIGRTMIN + 3


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option}, {value})")


def _kill_session(*_: object) -> None:
    os.killpg(0, signal.SIGKILL)  # this process leads the session's one group: everything in it, itself last


def run(owner: int, cmd: list[str]) -> int:
    signal.signal(OWNER_GONE, _kill_session)
    _prctl(PR_SET_PDEATHSIG, OWNER_GONE)
    if os.getppid() != owner:  # the owner died before the notice was armed
        return 1
    os.setsid()
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    # Ignored signals stay ignored across exec: the launcher's processes ignore USR1 while each rank installs its own
    # handler, so a USR1 sent to every process of a SLURM step reaches only the ranks. TERM/INT get a no-op handler
    # (reset to the default in the children): a TERM to every process of a step must not end this waiter early.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: None)
    launcher = subprocess.Popen(cmd)
    code = None
    while True:  # reap the launcher and every orphan reparented here, until none is left
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        if pid == launcher.pid:
            code = os.waitstatus_to_exitcode(status)
            launcher.returncode = code
    assert code is not None
    return code if code >= 0 else 128 - code


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--" or not argv[0].isdigit():
        print("usage: python -m runtime.launcher_session OWNER_PID -- COMMAND [ARGS ...]", file=sys.stderr)
        return 2
    return run(int(argv[0]), argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
