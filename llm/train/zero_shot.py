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
from typing import Any

import torch

from evals.results import task_scores
from evals.suite import TASKS_DIR, enter_offline_mode, hub_reachable, resolve_tasks
from runtime.checkpoint import rng_state, set_rng_state

BATCH_SIZE = 16  # requests per forward: small models, short contexts


class LiveZeroShot:
    """The tasks are resolved and their documents loaded once, when the trainer starts; `__call__` evaluates."""

    def __init__(self, tasks: str, limit: int, tokenizer: Any) -> None:
        offline = not hub_reachable()
        if offline:
            enter_offline_mode()
        self.tasks = resolve_tasks(tasks, offline)
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
            raise ValueError(f"eval_tasks: unknown lm-eval task(s) {', '.join(unknown)}; `lm_eval ls tasks` lists them")
        self.task_dict = get_task_dict(self.tasks, manager)

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
