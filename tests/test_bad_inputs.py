"""Bad inputs and faults through the real command lines, as a hostile but fair user types them (issue 12).

For every row of CASES: a non-zero exit, one line `[prog: ]error: ...` naming the field and the value (the row's
needles) and a way out, no traceback, and the sandbox - a finished run with checkpoints, a tokenizer, shards, the
user's own files - byte for byte as it was. Each row runs as a subprocess in a copy of the sandbox of its own, a
few at a time, once per module; each test checks one row. The checks a row needs beyond that (the resume refusals,
which need a real trained run) live in tests/test_resume_safety.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from llm.data.corpus import shakespeare_files
from llm.data.tokenizer import train_tokenizer
from tests.test_outputs_safety import make_run, tree
from tests.test_plot_routing import train_record, write_run
from tests.trainer_utils import REPO, tiny_args, tiny_image_folder, tiny_vision_args

PY = sys.executable
ERROR_LINE = re.compile(r"^([\w./-]+: )?error: \S")


@dataclass(frozen=True)
class Case:
    id: str
    argv: list[str]  # {S} is the sandbox directory, {RUN} the finished run in it
    needles: tuple[str, ...]  # what the one error line must name
    env: tuple[tuple[str, str], ...] = ()


def llm(*args: str) -> list[str]:
    return [PY, "-m", "llm.pretrain", "--config", "tiny", *args]


def vision(*args: str) -> list[str]:
    return [
        PY,
        "-m",
        "vision.train",
        "--config",
        "fashion_mnist_tiny",
        "--data_dir",
        "{S}/images",
        "--output_dir",
        "{S}/vrun",
        *args,
    ]


def prepare(source: str) -> list[str]:
    return [PY, "-m", "llm.data.prepare", "--input", source, "--tokenizer", "{S}/tok", "--output-prefix", "{S}/new/x"]


CASES = [
    # --- the training config (llm.pretrain): every value checked before anything is written
    Case("yaml-malformed", [PY, "-m", "llm.pretrain", "--config", "{S}/bad.yaml"], ("bad.yaml:3", "YAML")),
    Case("config-without-value", [PY, "-m", "llm.pretrain", "--config"], ("--config", "preset")),
    Case("output-dir-is-a-file", llm("--output_dir", "{S}/notes.txt"), ("output_dir", "notes.txt", "file")),
    Case("grad-clip-negative", llm("--grad_clip", "-1"), ("grad_clip=-1", "0 turns clipping off")),
    Case("adam-eps-negative", llm("--adam_eps", "-1"), ("adam_eps=-1", "e.g.")),
    Case("adam-beta1-one", llm("--adam_beta1", "1"), ("adam_beta1=1", "[0, 1)")),
    Case("lr-nan", llm("--lr", "nan"), ("lr=nan", "learning rate")),
    Case("zero-stage-4", llm("--zero_stage", "4"), ("zero_stage=4", "--zero_stage 1")),
    Case("attention-unknown", llm("--attn_implementation", "foo"), ("attn_implementation='foo'", "sdpa")),
    Case("micro-batch-not-dividing", llm("--micro_batch_size", "3"), ("micro_batch_size=3", "multiple")),
    Case("train-iters-fraction", llm("--train_iters", "2.5"), ("--train_iters", "2.5", "int")),
    Case("split-no-train", llm("--split", "0,1"), ("split='0,1'", "e.g.")),
    Case("data-path-odd", llm("--data_path", "0.5 a b"), ("data_path", "0.5 a b", "W1 PREFIX1")),
    Case("tokenizer-missing", llm("--tokenizer", "{S}/no-tok"), ("tokenizer=", "no-tok", "llm.data.tokenizer train")),
    Case("resume-missing", llm("--resume", "{S}/no-ckpt"), ("resume=", "no-ckpt", "--resume auto")),
    Case("ds-config-unknown", llm("--ds_config", "zero9"), ("ds_config", "zero9", "zero1")),
    Case("overrides-not-json", llm("--model_overrides", "{num_experts: 4}"), ("--model_overrides", "not valid JSON")),
    Case("model-unknown", llm("--model", "llama-7b"), ("model='llama-7b'", "llama-1b")),
    Case("seq-len-over-positions", llm("--seq_len", "2048"), ("seq_len=2048", "max_position_embeddings")),
    Case("expert-parallel-on-dense", llm("--expert_parallel_size", "2"), ("expert_parallel_size=2", "parameternet")),
    Case(
        "override-key-typo",
        llm("--model", "parameternet-llama-tiny", "--model_overrides", '{"num_expertz": 4}'),
        ("num_expertz", "did you mean 'num_experts'"),
    ),
    Case(
        "override-moe-key-on-dense",
        llm("--model_overrides", '{"num_experts": 4}'),
        ("num_experts", "llama-tiny", "parameternet-llama-*"),
    ),
    Case(
        "override-top-k-too-big",
        llm("--model", "parameternet-llama-tiny", "--model_overrides", '{"top_k": 9}'),
        ("top_k=9", "num_experts=8"),
    ),
    # --- outputs: nothing of a run, nor anything we did not write, is ever replaced
    Case("export-into-the-run", [PY, "-m", "llm.export", "{RUN}", "{RUN}"], ("OUT_DIR", "checkpoints", "outside")),
    Case(
        "export-into-the-runs-parent",
        [PY, "-m", "llm.export", "{RUN}", "{RUN}/..", "--overwrite"],
        ("OUT_DIR", "checkpoints", "outside"),
    ),
    Case(
        "export-over-user-files",
        [PY, "-m", "llm.export", "{RUN}", "{S}/mine", "--overwrite"],
        ("OUT_DIR", "mine", "notes.txt", "new path"),
    ),
    Case("export-onto-a-file", [PY, "-m", "llm.export", "{RUN}", "{S}/notes.txt"], ("OUT_DIR", "notes.txt", "file")),
    Case(
        "tokenizer-over-user-files",
        [
            PY,
            "-m",
            "llm.data.tokenizer",
            "train",
            "--input",
            "{S}/play.txt",
            "--vocab-size",
            "400",
            "--out",
            "{S}/mine",
            "--overwrite",
        ],
        ("--out", "mine", "notes.txt"),
    ),
    Case(
        "tokenizer-into-a-run",
        [PY, "-m", "llm.data.tokenizer", "train", "--input", "{S}/play.txt", "--vocab-size", "400", "--out", "{RUN}"],
        ("--out", "checkpoints"),
    ),
    Case(
        "tokenizer-vocab-too-small",
        [
            PY,
            "-m",
            "llm.data.tokenizer",
            "train",
            "--input",
            "{S}/play.txt",
            "--vocab-size",
            "200",
            "--out",
            "{S}/tok-new",
        ],
        ("vocab_size=200", "use a few thousand"),
    ),
    Case(
        "prepare-input-missing",
        [
            PY,
            "-m",
            "llm.data.prepare",
            "--input",
            "{S}/none/*.jsonl",
            "--tokenizer",
            "{S}/tok",
            "--output-prefix",
            "{S}/new/sub/x",
        ],
        ("--input", "none/*.jsonl"),
    ),
    Case(
        "prepare-over-user-file",
        [
            PY,
            "-m",
            "llm.data.prepare",
            "--input",
            "{S}/docs.jsonl",
            "--tokenizer",
            "{S}/tok",
            "--output-prefix",
            "{S}/user",
            "--overwrite",
        ],
        ("--output-prefix", "user.json"),
    ),
    # --- the corpus itself (issue 25): the file and line at fault, and the fix, instead of a datasets traceback
    Case("prepare-invalid-json", prepare("{S}/bad.jsonl"), ("bad.jsonl:2", "not valid JSON", "fix or remove")),
    Case("prepare-empty-input", prepare("{S}/empty.jsonl"), ("empty.jsonl", "is empty", "remove it from --input")),
    Case(
        "prepare-missing-text-field",
        prepare("{S}/nokey.jsonl"),
        ("nokey.jsonl:2", "no text in field 'text'", "--text-key", "--skip-missing-text"),
    ),
    Case("prepare-not-utf8-text", prepare("{S}/latin1.txt"), ("latin1.txt:3", "0xe9", "not UTF-8", "iconv")),
    Case("prepare-not-utf8-jsonl", prepare("{S}/latin1.jsonl"), ("latin1.jsonl:2", "0xe9", "not UTF-8")),
    Case(
        "zero-shot-output-is-a-file",
        [PY, "-m", "evals.zero_shot", "--model", "{RUN}", "--offline", "--output_dir", "{S}/notes.txt"],
        ("--output_dir", "notes.txt", "directory"),
    ),
    Case(
        "compare-over-user-files",
        [PY, "-m", "evals.compare", "{RUN}", "{RUN}", "--out", "{S}/mine"],
        ("--out", "mine", "notes.txt"),
    ),
    Case(
        "routing-plot-over-user-file",
        [PY, "-m", "evals.plot_routing", "{S}/moe-run", "--out", "{S}/user.png"],
        ("--out", "user.png"),
    ),
    # --- the vision trainer's config
    Case("vision-lr-nan", vision("--lr", "nan"), ("lr=nan", "e.g.")),
    Case("vision-adam-beta2-one", vision("--adam_beta2", "1.0"), ("adam_beta2=1.0", "[0, 1)")),
    Case("vision-old-flag", vision("--max-steps", "2"), ("max-steps", "renamed: use train_iters")),
    Case("vision-scale-not-numbers", vision("--scale", "0.5", "big"), ("--scale", "0.5 big", "a list of numbers")),
    Case("vision-interpolation-unknown", vision("--interpolation", "random"), ("interpolation='random'", "bicubic")),
    Case(
        "vision-output-is-a-file",
        [
            PY,
            "-m",
            "vision.train",
            "--config",
            "fashion_mnist_tiny",
            "--data_dir",
            "{S}/images",
            "--output_dir",
            "{S}/notes.txt",
        ],
        ("output_dir", "notes.txt"),
    ),
    # --- the launch script's own inputs
    Case("launcher-model-unknown", ["bash", "launch/pretrain_llama.sh", "gpt2"], ("first argument", "gpt2")),
    Case(
        "launcher-nproc-not-a-number",
        ["bash", "launch/pretrain_llama.sh"],
        ("NPROC=two", "positive integer"),
        env=(("NPROC", "two"),),
    ),
    Case(
        "launcher-node-rank-missing",
        ["bash", "launch/pretrain_llama.sh"],
        ("NODE_RANK", "NNODES=2"),
        env=(("NNODES", "2"), ("NPROC", "1")),
    ),
    Case(
        "launcher-hostfile-missing",
        ["bash", "launch/pretrain_llama.sh"],
        ("HOSTFILE", "no-hosts"),
        env=(("HOSTFILE", "{S}/no-hosts"), ("NPROC", "1")),
    ),
]


@dataclass
class Outcome:
    root: Path  # the case's own copy of the sandbox
    result: subprocess.CompletedProcess[str]
    before: dict[str, str]
    after: dict[str, str]


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What a user's working directory holds: a finished run with a checkpoint, a tokenizer, a corpus, their own
    files and directories, and an image folder."""
    root = tmp_path_factory.mktemp("bad-inputs")
    play = shakespeare_files()[0]
    (root / "play.txt").write_text(Path(play).read_text(errors="replace"))
    (root / "docs.jsonl").write_text(json.dumps({"text": (root / "play.txt").read_text()[:20000]}) + "\n")
    tokenizer = train_tokenizer([root / "play.txt"], 400, root / "tok")
    make_run(root / "runs" / "llama", tokenizer)
    (root / "notes.txt").write_text("the user's own notes\n")
    (root / "mine").mkdir()
    (root / "mine" / "notes.txt").write_text("the user's own notes\n")
    (root / "user.json").write_text('{"mine": true}\n')
    (root / "user.png").write_bytes(b"\x89PNG not ours")
    write_run(root / "moe-run", [train_record(i, [[5, 3, 0, 8]] * 3) for i in (1, 2, 3)])  # routing logged
    (root / "bad.yaml").write_text("model: llama-tiny\nlr: [1, 2\nseed: 1\n")
    # corpora with one fault each (issue 25)
    (root / "bad.jsonl").write_text('{"text": "To be"}\n{"text": "or not", oops}\n{"text": "to be"}\n')
    (root / "empty.jsonl").write_text("")
    (root / "nokey.jsonl").write_text('{"text": "To be"}\n{"body": "or not to be"}\n')
    (root / "latin1.txt").write_bytes("To be,\nor not\nto be: caf\u00e9\n".encode("latin-1"))
    (root / "latin1.jsonl").write_bytes('{"text": "To be"}\n{"text": "caf\u00e9"}\n'.encode("latin-1"))
    tiny_image_folder(root / "images")
    return root


def _fill(text: str, sandbox: Path) -> str:
    return text.replace("{S}", str(sandbox)).replace("{RUN}", str(sandbox / "runs" / "llama"))


@pytest.fixture(scope="module")
def outcomes(sandbox: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    """Every case in a copy of the sandbox of its own, three at a time (most exit before importing torch, the rest
    spend their time importing), with the copy's file tree before and after."""
    copies = tmp_path_factory.mktemp("cases")

    def one(case: Case) -> Outcome:
        root = copies / case.id
        shutil.copytree(sandbox, root, symlinks=True)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NNODES", "NODE_RANK", "HOSTFILE", "NPROC"):
            env.pop(name, None)
        env.update({k: _fill(v, root) for k, v in case.env})
        before = tree(root)
        result = subprocess.run(
            [_fill(a, root) for a in case.argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
        )
        return Outcome(root, result, before, tree(root))

    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(zip([c.id for c in CASES], pool.map(one, CASES)))


def test_the_table_is_long_enough() -> None:
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_with_one_clear_line_and_nothing_changes(case: Case, outcomes: dict[str, Outcome]) -> None:
    outcome = outcomes[case.id]
    result = outcome.result
    shown = f"{case.argv}\nexit {result.returncode}\nstdout:\n{result.stdout[-1500:]}\nstderr:\n{result.stderr[-3000:]}"
    assert result.returncode != 0, shown
    assert "Traceback" not in result.stderr + result.stdout, shown
    errors = [line for line in result.stderr.splitlines() if ERROR_LINE.match(line)]
    assert len(errors) == 1, shown
    for needle in case.needles:
        assert _fill(needle, outcome.root) in errors[0], (needle, errors[0])
    changed = sorted(set(outcome.after.items()) ^ set(outcome.before.items()))
    assert not changed, f"the refused command changed files: {changed[:10]}"


def test_an_unreadable_image_stops_the_run_naming_it_or_is_skipped_and_counted(tmp_path: Path) -> None:
    """Issue 25: a truncated image in an ImageFolder was skipped by timm for its neighbour ("Skipped sample", no file
    named, nothing in summary.json). Now it stops the run with one line naming the file and the fix - also when a
    DataLoader worker process read it - or, with --skip_bad_images true, is skipped, named, and counted."""
    images = tiny_image_folder(tmp_path / "images")
    bad = sorted((images / "train" / "a").iterdir())[1]
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])  # truncated: PIL opens it, decoding fails
    base = [PY, "-m", "vision.train", *tiny_vision_args(data_dir=images, num_workers=None)]  # each run sets num_workers
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def run(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*base, *extra], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)

    refused = run("--num_workers", "1", "--output_dir", str(tmp_path / "refused"))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    [line] = [line for line in refused.stderr.splitlines() if ERROR_LINE.match(line)]
    assert line.startswith(f"vision.train: error: {bad}: unreadable image (image file is truncated"), line
    assert "replace or remove the file, or pass --skip_bad_images true" in line
    assert not (tmp_path / "refused" / "summary.json").exists()

    skipped = run("--num_workers", "0", "--skip_bad_images", "true", "--output_dir", str(tmp_path / "skipped"))
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    assert f"vision.train: warning: skipped unreadable image {bad}" in skipped.stderr
    summary = json.loads((tmp_path / "skipped" / "summary.json").read_text())
    # 2 steps of 4 of the 8 training images: every one is read once, the bad one skipped once
    assert summary["skipped_images"] == 1


# ---------------------------------------------------------------------------------------------- issue 33
def tiny_llm(output_dir: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The tiny LLM run (one rank), offline: lm-eval's offline twins, no hub."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NPROC"):
        full_env.pop(name, None)
    argv = [
        *llm("--model", "llama-tiny", *tiny_args(global_batch_size=4, export=False)),
        "--output_dir",
        str(output_dir),
    ]
    return subprocess.run([*argv, *extra], cwd=REPO, env=full_env, capture_output=True, text=True, timeout=900)


def one_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    [line] = [line for line in proc.stderr.splitlines() if ERROR_LINE.match(line)]
    return line


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ('{"id": "ab12', "is not valid JSON (Unterminated string starting at: line 1 column 8 (char 7))"),
        ("{}", 'has no run id ("id" is missing or not a string)'),
        ('["x"]', "holds an array, not an object with the run id"),
        ('{"id": "a/b"}', "holds the run id 'a/b', which W&B does not accept"),
    ],
    ids=["truncated", "empty-object", "array", "bad-id"],
)
def test_a_malformed_wandb_run_json_is_one_line_naming_the_file_and_the_fix(tmp_path: Path, content, problem) -> None:
    """Issue 33, item 2: a bad wandb-run.json gave a bare JSON error, a KeyError or a TypeError traceback."""
    from runtime.errors import TrainingError
    from runtime.metrics import WANDB_ID, MetricsLogger, WandbSettings

    (tmp_path / WANDB_ID).write_text(content)
    with pytest.raises(TrainingError) as err:
        MetricsLogger(tmp_path, enabled=True, tensorboard=False, wandb=WandbSettings("p"))
    assert str(err.value) == (
        f"{tmp_path / WANDB_ID} {problem}; it keeps the W&B run id that every resume of this run logs into. Write it "
        f'back as {{"id": "RUN_ID"}} (RUN_ID ends the names of {tmp_path / "wandb"}/run-*-RUN_ID), or move the file '
        f"away to log into a new W&B run"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [WANDB_ID]  # refused before anything is written


def test_a_malformed_wandb_run_json_stops_the_trainer_with_one_line(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "wandb-run.json").write_text('{"id": "ab12')
    proc = tiny_llm(out, "--train_iters", "1", "--wandb_project", "p", env={"WANDB_MODE": "offline"})
    line = one_error(proc)
    assert line.startswith(f"error: {out / 'wandb-run.json'} is not valid JSON (Unterminated string"), line
    assert sorted(p.name for p in out.iterdir()) == ["wandb-run.json"]


def test_eval_tasks_errors_name_the_trainers_own_flag(tmp_path: Path, monkeypatch) -> None:
    """Issue 33, item 3: `--eval_tasks ','` said "give ... --tasks arc_easy,piqa" and an unknown task "need --online",
    flags the trainer refuses."""
    line = one_error(tiny_llm(tmp_path / "run", "--eval_tasks", ","))
    assert line == (
        "error: eval_tasks=',': --eval_tasks names no task; give task names, e.g. --eval_tasks arc_easy,piqa, or "
        "--eval_tasks llama"
    )
    assert not (tmp_path / "run").exists()

    from evals.live import LiveZeroShot

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError) as err:
        LiveZeroShot("arc_easy,no_such_task", 2, tokenizer=None)
    assert str(err.value).startswith("--eval_tasks: unknown task 'no_such_task' for the offline suite; known: ")
    assert str(err.value).endswith(
        "other lm-eval tasks need hub access (huggingface.co reachable, HF_HUB_OFFLINE unset)"
    )
    assert "--online" not in str(err.value) and "--tasks" not in str(err.value)


def test_a_blank_eval_tasks_means_no_zero_shot_evaluation(tmp_path: Path) -> None:
    """Issue 33, item 3: `--eval_tasks ''` (or blanks: `--eval_tasks "$TASKS"` with TASKS unset) means none."""
    out = tmp_path / "run"
    proc = tiny_llm(out, "--train_iters", "1", "--eval_tasks", " ")
    assert proc.returncode == 0, proc.stderr[-3000:]
    kinds = {json.loads(line)["kind"] for line in (out / "metrics.jsonl").read_text().splitlines()}
    assert "valid" in kinds and not kinds & {"zero_shot", "zero_shot_failed"}
