"""Zero-shot accuracy of the live model during training (--eval_tasks, --eval_limit): lm-evaluation-harness on the
engine's module itself, no export to disk in between.

lm-eval's `hf` model takes an already built `PreTrainedModel`; ours is one. Every rank runs the same evaluation on the
same documents in the same order: under ZeRO-3 each forward gathers the partitioned weights and under expert
parallelism each MoE layer exchanges tokens with all-to-alls, collectives that need every rank to make the same
calls (with plain data parallelism the other ranks' work is redundant, and the evaluation stays one code path).
lm-eval seeds Python's, numpy's and torch's generators: their states are put back afterwards, so a run with
evaluations trains as one without.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from typing import Any

import torch

from evals.results import task_scores
from evals.suite import TASKS_DIR, canonical_name, enter_offline_mode, hub_reachable, resolve_tasks
from runtime.checkpoint import rng_state, set_rng_state
from runtime.errors import print_error

BATCH_SIZE = 16  # requests per forward: small models, short contexts
# The trainer has no --online: it uses the hub's tasks whenever it can reach the hub.
HUB_FIX = "other lm-eval tasks need hub access (huggingface.co reachable, HF_HUB_OFFLINE unset)"


class LiveZeroShot:
    """The tasks are resolved and their documents loaded once, when the trainer starts; `__call__` evaluates."""

    def __init__(self, tasks: str, limit: int, tokenizer: Any) -> None:
        offline = not hub_reachable()
        if offline:
            enter_offline_mode()
        self.tasks = resolve_tasks(tasks, offline, flag="--eval_tasks", hub_fix=HUB_FIX)
        self.offline = offline
        self.limit = limit
        self.tokenizer = tokenizer
        from lm_eval.tasks import TaskManager, get_task_dict

        for name in ("lm_eval", "lm_eval.api.task", "lm_eval.evaluator", "lm_eval.models.huggingface"):
            logging.getLogger(name).setLevel(logging.ERROR)  # a record per evaluation, not pages of lm-eval's log
        # Offline, lm-eval's 14,000 built-in task configs need not be indexed: only ours can run.
        manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=not offline)
        unknown = [t for t in self.tasks if t not in manager.all_tasks]
        if unknown:
            raise ValueError(f"unknown lm-eval task(s) {', '.join(unknown)}; `lm_eval ls tasks` lists them")
        try:
            self.task_dict = get_task_dict(self.tasks, manager)
        except Exception as err:  # a task file that does not parse, a data set that does not load: any type
            raise ValueError(f"lm-eval could not load the tasks ({type(err).__name__}: {err})") from err

    @property
    def names(self) -> list[str]:
        """The tasks as the records name them (offline twins without their suffix)."""
        return [canonical_name(task) for task in self.tasks]

    def evaluate_and_log(self, model: torch.nn.Module, logger: Any, iteration: int, tokens: int, rank: int) -> None:
        """Evaluate `model` and log a `zero_shot` record (and a console line on rank 0). An evaluation is a
        measurement: no failure of lm-eval's (an out-of-memory in its batch, a tokenizer edge case, a bug of its own)
        may cost the training, so a failure is a `zero_shot_failed` record naming the tasks and the cause, and one
        warning line; the trainer goes on. Rank 0's outcome is the one recorded (the others evaluate the same)."""
        try:
            accuracies = self(model)
        except Exception as err:  # lm-eval's failures have no common type
            if torch.cuda.is_available():
                torch.cuda.empty_cache()  # an out-of-memory's leftovers must not crowd the next training step
            cause = f"{type(err).__name__}: {err}"
            logger.log({"kind": "zero_shot_failed", "iteration": iteration, "tasks": self.names, "error": cause})
            if rank == 0:
                shown = cause if len(cause) <= 300 else cause[:300] + "..."
                print_error(
                    f"zero-shot evaluation of {', '.join(self.names)} at iteration {iteration} failed ({shown}); "
                    f"recorded in metrics.jsonl as zero_shot_failed, training goes on",
                    kind="warning",
                )
            return
        logger.log({"kind": "zero_shot", "iteration": iteration, "tokens": tokens, **accuracies})
        if rank == 0:
            shown = ", ".join(f"{task} {100 * acc:.1f}%" for task, acc in accuracies.items())
            print(f"[zero-shot] iteration {iteration} ({self.limit} per task): {shown}", file=sys.stderr)

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        """{task: accuracy (acc_norm where lm-eval defines it, else acc)} of `model` as it is now. Collective."""
        from lm_eval.evaluator import evaluate
        from lm_eval.models.huggingface import HFLM

        saved = rng_state()
        was_training = model.training
        try:
            # lm-eval's progress bars and notices (several per task, on every rank) go nowhere: the trainer prints
            # one line.
            with contextlib.redirect_stderr(io.StringIO()):
                lm = HFLM(pretrained=model, tokenizer=self.tokenizer, batch_size=BATCH_SIZE)
                results = evaluate(
                    lm=lm,
                    task_dict=self.task_dict,
                    limit=self.limit,
                    log_samples=False,
                    bootstrap_iters=0,
                    verbosity="ERROR",
                )
        finally:
            set_rng_state(saved)
            model.train(was_training)
        return {score.name: score.value for score in task_scores(results)}
