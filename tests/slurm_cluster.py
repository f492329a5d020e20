"""A real 2-node SLURM cluster on this machine for the tests: one slurmctld and two slurmd (n1, n2, one CPU each).

Use it by importing the fixture into a test module:

    from tests.slurm_cluster import SlurmCluster, slurm_cluster  # noqa: F401  (pytest finds the fixture by name)

    def test_x(slurm_cluster: SlurmCluster, tmp_path):
        job = slurm_cluster.sbatch(["--requeue", "job.sh"], cwd=tmp_path)
        result = slurm_cluster.wait(job, timeout=60)
        assert result.state == "COMPLETED" and result.exit_code == 0

Everything of the cluster lives in a temp dir (its slurm.conf, state, spool dirs, pid files and logs); the client
commands and daemons find that slurm.conf through SLURM_CONF, so /etc/slurm is never touched and two clusters (two
pytest runs) can be up at once on different free ports. munged is the machine's: it is started if not running and
left running, since other clusters may use it. Skips (with the reason) where slurm or munge is not installed
(scripts/install_system_data.sh installs them where apt works) or where we are not root (slurmd must be).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

NODES = ("n1", "n2")

# A requeued job may start again only after AuthInfo's cred_expire (default 120 s): slurmctld holds it back with
# BeginTime = requeue time + cred_expire + 1, so that the old job's step credentials (signed for the same job id)
# have expired everywhere. 5 is the smallest value slurm accepts (below it slurm logs "cred_expire=N invalid" and
# falls back to 120). Credentials only need to outlive a step's launch, which takes well under a second here.
CRED_EXPIRE_S = 5

TERMINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE", "OUT_OF_MEMORY"}
)


@dataclass(frozen=True)
class JobResult:
    """A job's end: its final state, the exit code of its batch script and the signal that ended it (0 if none)."""

    state: str
    exit_code: int
    signal: int
    info: dict[str, str]


@dataclass
class SlurmCluster:
    """The handle the fixture yields. `env` is os.environ without any SLURM_* of an outer job, plus SLURM_CONF: the
    environment for any slurm command run against this cluster (run() and sbatch() use it)."""

    root: Path
    conf: Path
    env: dict[str, str]
    logs: dict[str, Path]  # "slurmctld", "n1", "n2": each daemon's log file
    ctld_port: int
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def run(
        self,
        args: Sequence[str],
        timeout: float = 60,
        check: bool = True,
        cwd: Path | None = None,
        env_extra: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess:
        """Run a command (e.g. ["srun", "-N2", "hostname"]) against this cluster; text output captured."""
        env = {**self.env, **(env_extra or {})}
        proc = subprocess.run(list(args), env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}\n{self.log_tails()}"
            )
        return proc

    def sbatch(self, args: Sequence[str], cwd: Path | None = None, env_extra: Mapping[str, str] | None = None) -> int:
        """Submit with `sbatch --parsable ARGS` from cwd (default: the cluster's dir); returns the job id. The job
        inherits the environment sbatch runs in (sbatch's default --export=ALL), env_extra included."""
        out = self.run(["sbatch", "--parsable", *args], cwd=cwd or self.root, env_extra=env_extra).stdout
        return int(out.strip().split(";")[0])

    def job_info(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, NodeList, StdOut, ...)."""
        out = self.run(["scontrol", "show", "job", "--oneliner", str(job_id)]).stdout
        return parse_scontrol(out)

    def wait(self, job_id: int, timeout: float) -> JobResult:
        """Poll until the job reaches a terminal state (a requeued job is pending again, not terminal)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job_info(job_id)
            state = info.get("JobState", "")
            if state in TERMINAL_STATES:
                code, _, sig = info.get("ExitCode", "0:0").partition(":")
                return JobResult(state, int(code), int(sig or 0), info)
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {state} after {timeout} s: {info}\n{self.log_tails()}")
            time.sleep(0.2)

    def log_tails(self, lines: int = 25) -> str:
        """The end of every daemon's log, for error messages. A daemon in the foreground logs to its stderr too, so
        that is shown only where the log file is missing (a fatal error before the daemon opened it)."""
        parts = []
        for path in self.logs.values():
            for p in (path, path.with_suffix(".stderr")):
                if p.exists():
                    tail = p.read_text(errors="replace").splitlines()[-lines:]
                    parts.append(f"--- {p} ---\n" + "\n".join(tail))
                    break
        return "\n".join(parts)


def parse_scontrol(line: str) -> dict[str, str]:
    """KEY=VALUE pairs of a `scontrol show ... --oneliner` line. A value may hold spaces (a command's arguments):
    a word without '=' continues the previous value."""
    info: dict[str, str] = {}
    key = None
    for word in line.split():
        k, eq, v = word.partition("=")
        if eq and k:
            key = k
            info[key] = v
        elif key is not None:
            info[key] += " " + word
    return info


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (all held open while picking, so they differ)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def ensure_hosts_entry(names: Sequence[str] = NODES, hosts: Path = Path("/etc/hosts")) -> None:
    """The node names must resolve (slurmd -N n1 looks itself up; srun resolves the nodes it launches on): append
    '127.0.0.1 n1 n2' to /etc/hosts when some name is not already mapped there. Only ever appends one line; never
    rewrites or removes other lines."""
    text = hosts.read_text()
    mapped = set()
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if fields and fields[0] == "127.0.0.1":
            mapped.update(fields[1:])
    missing = [n for n in names if n not in mapped]
    if missing:
        with hosts.open("a") as f:
            f.write(("" if text.endswith("\n") or not text else "\n") + f"127.0.0.1 {' '.join(names)}\n")


def ensure_munge() -> None:
    """A working munged with a key: slurm authenticates every message with it."""
    if _munge_works():
        return
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        subprocess.run(["mungekey", "-c", "-k", str(key)], check=True, capture_output=True)
        shutil.chown(key, "munge", "munge")
        key.chmod(0o600)
    # munged refuses to run with a key or socket dir it does not own: run it as the munge user, as the service does.
    run_dir = Path("/run/munge")
    run_dir.mkdir(mode=0o755, exist_ok=True)
    shutil.chown(run_dir, "munge", "munge")
    started = subprocess.run(["runuser", "-u", "munge", "--", "munged"], capture_output=True, text=True)
    deadline = time.monotonic() + 10
    while not _munge_works():
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"munged does not work (munged rc={started.returncode}: {started.stderr.strip()}); "
                "see /var/log/munge/munged.log"
            )
        time.sleep(0.2)


def _munge_works() -> bool:
    """`munge -n | unmunge`: a credential encoded and decoded with the machine's key."""
    try:
        cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        if cred.returncode != 0:
            return False
        return subprocess.run(["unmunge"], input=cred.stdout, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def write_conf(root: Path, ctld_port: int, node_ports: Sequence[int]) -> Path:
    host = socket.gethostname().split(".")[0]
    nodes = "\n".join(
        f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs=1 State=UNKNOWN"
        for name, port in zip(NODES, node_ports)
    )
    conf = root / "slurm.conf"
    # Why the less usual settings:
    #  - proctrack/linuxproc and task/none: jobs are tracked by pid, so no cgroup hierarchy has to be set up.
    #  - SlurmdPidFile/SlurmdSpoolDir with %n: two slurmd on one host each need their own.
    #  - ReturnToService=2: a node that went down (e.g. a slurmd restarted by a test) comes back when it registers.
    #  - JobRequeue=1: batch jobs are requeueable unless they say --no-requeue.
    #  - cred_expire: see CRED_EXPIRE_S. sched_interval/bf_interval: look at a job whose BeginTime passed at once
    #    (the defaults of 60 s / 30 s would add up to a minute to the requeue delay).
    #  - KillWait/SlurmdTimeout/MessageTimeout short: a test cancelling a job or losing a node does not wait minutes.
    #  - MinJobAge: finished jobs stay visible to `scontrol show job` long enough for a test to look at them.
    conf.write_text(f"""\
ClusterName=test{ctld_port}
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire={CRED_EXPIRE_S}
StateSaveLocation={root}/state
SlurmctldPidFile={root}/slurmctld.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdPidFile={root}/slurmd-%n.pid
SlurmdSpoolDir={root}/slurmd-%n
SlurmdLogFile={root}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
MpiDefault=none
JobRequeue=1
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
SlurmctldTimeout=10
SlurmdTimeout=10
MessageTimeout=10
KillWait=2
InactiveLimit=0
MinJobAge=600
{nodes}
PartitionName=test Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
""")
    return conf


def _start(cmd: list[str], env: Mapping[str, str], stderr: Path) -> subprocess.Popen:
    # -D keeps each daemon in the foreground as our child: we hold its pid and reap it, and its own session keeps a
    # Ctrl-C on pytest from reaching it before the teardown has cancelled the jobs.
    with stderr.open("w") as err:
        return subprocess.Popen(
            cmd, env=dict(env), stdin=subprocess.DEVNULL, stdout=err, stderr=err, start_new_session=True
        )


def _node_states(cluster: SlurmCluster) -> dict[str, str]:
    proc = cluster.run(["sinfo", "--noheader", "--Node", "--format=%N %t"], check=False, timeout=15)
    return dict(line.split() for line in proc.stdout.splitlines() if len(line.split()) == 2)


def _listens(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def start_cluster(root: Path, timeout: float = 60) -> SlurmCluster:
    """Start munge (if needed), slurmctld and two slurmd from a slurm.conf in root; return once both nodes are
    idle. On failure the daemons already started are stopped before the error propagates."""
    ensure_munge()
    ensure_hosts_entry()
    ctld_port, *node_ports = free_ports(1 + len(NODES))
    conf = write_conf(root, ctld_port, node_ports)
    for d in ("state", *(f"slurmd-{n}" for n in NODES)):
        (root / d).mkdir(exist_ok=True)
    # Without the caller's SLURM_*/SBATCH_*/SRUN_* variables: pytest run inside a job of a real cluster would
    # otherwise have srun create its steps in that job's id, here, and sbatch take that job's options.
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SLURMD_", "SBATCH_", "SRUN_", "SALLOC_"))
    }
    env["SLURM_CONF"] = str(conf)
    logs = {"slurmctld": root / "slurmctld.log", **{n: root / f"slurmd-{n}.log" for n in NODES}}
    cluster = SlurmCluster(root=root, conf=conf, env=env, logs=logs, ctld_port=ctld_port)
    try:
        # -i: ignore any state in StateSaveLocation (a fresh dir anyway); -f: our config, for certain.
        cluster.procs["slurmctld"] = _start(
            ["slurmctld", "-D", "-i", "-f", str(conf)], env, logs["slurmctld"].with_suffix(".stderr")
        )
        for n in NODES:
            cluster.procs[n] = _start(["slurmd", "-D", "-N", n, "-f", str(conf)], env, logs[n].with_suffix(".stderr"))
        deadline = time.monotonic() + timeout
        while True:
            dead = {name: p.returncode for name, p in cluster.procs.items() if p.poll() is not None}
            # sinfo retries a controller that does not answer for about 10 s: ask it only once slurmctld listens,
            # so that a daemon dying at start-up is reported at once.
            states = _node_states(cluster) if not dead and _listens(ctld_port) else {}
            if all(states.get(n) == "idle" for n in NODES):
                return cluster
            if dead or time.monotonic() > deadline:
                why = f"daemons exited {dead}" if dead else f"not idle after {timeout} s"
                raise RuntimeError(
                    f"SLURM cluster in {root} did not come up ({why}); sinfo: {states}\n{cluster.log_tails()}"
                )
            time.sleep(0.1)
    except BaseException:
        stop_cluster(cluster)
        raise


def stop_cluster(cluster: SlurmCluster, timeout: float = 20) -> None:
    """Cancel every job of this cluster (their processes are slurmstepd's, outside the daemons' process groups),
    then stop the daemons: `scontrol shutdown`, SIGTERM for any left (a slurmd whose slurmctld is gone), SIGKILL
    for any still running after the timeout."""
    ctld = cluster.procs.get("slurmctld")
    # A client command retries a controller that does not answer for many seconds: ask only one that listens, and
    # never let a hung one abort the teardown.
    if ctld is not None and ctld.poll() is None and _listens(cluster.ctld_port):
        try:
            cluster.run(["scancel", "--full", "--user=root"], check=False, timeout=10)
            deadline = time.monotonic() + timeout / 2
            while time.monotonic() < deadline:
                squeue = cluster.run(["squeue", "--noheader", "--format=%i"], check=False, timeout=10)
                if squeue.returncode != 0 or not squeue.stdout.strip():
                    break
                time.sleep(0.25)
            cluster.run(["scontrol", "shutdown"], check=False, timeout=10)
        except subprocess.TimeoutExpired:
            pass
    for proc in cluster.procs.values():
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + timeout / 2
    for proc in cluster.procs.values():
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


def skip_reason() -> str | None:
    """Why a real cluster cannot run here, or None."""
    commands = (
        "slurmctld",
        "slurmd",
        "sbatch",
        "srun",
        "scontrol",
        "sinfo",
        "squeue",
        "scancel",
        "munge",
        "unmunge",
        "munged",
        "mungekey",
        "runuser",
    )
    missing = [c for c in commands if shutil.which(c) is None]
    if missing:
        return f"SLURM not installed (missing {', '.join(missing)}; scripts/install_system_data.sh installs it)"
    if os.geteuid() != 0:
        return "a real SLURM cluster needs root (slurmd runs jobs as their users)"
    return None


@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A running 2-node cluster for the tests of one module; stopped afterwards whatever the outcome."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    try:
        yield cluster
    finally:
        stop_cluster(cluster)
