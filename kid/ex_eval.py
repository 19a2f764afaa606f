"""Execution accuracy on a dev slice during training: :class:`ExecutionAccuracyCallback`.

At every evaluation of a :class:`kid.trainer.DistillTrainer` (``eval_strategy``, or ``trainer.evaluate()``) the
student answers the slice's questions with greedy decoding (CodeS prompts cut as in training, LoRA adapters merged
for decoding, length-grouped ``generate`` calls; every process decodes its share), and the real evaluator
(:func:`kid.evaluation.evaluate_predictions`: read-only, time-limited queries in worker processes) scores the SQL.

Not blocked longer than the generation.  The scoring runs in a background thread (``asynchronous=True``, the
default) while training goes on; its result is logged when it arrives (``eval_ex``, with ``eval_ex_step`` the
step whose model was scored, and the time split ``eval_ex_generation_s`` / ``eval_ex_scoring_s`` /
``eval_ex_waited_s``: how long the training loop waited for the score).  The loop waits only where the score
must be known:

* before the next evaluation (one score in flight at a time);
* before a checkpoint is saved at a later step than the evaluation, or when training stops (checkpoint rotation
  must know which checkpoint is the best before it deletes any, and a checkpoint's state records every score
  before it);
* at the end of training (before ``load_best_model_at_end`` loads the best checkpoint).

In a single process a finished score is also picked up at the end of any step; with several processes only at
those points, where rank 0 broadcasts it (a collective every process reaches at the same step).

Best checkpoint.  With ``metric_for_best_model="eval_ex"`` (or "ex") the Trainer's best-metric bookkeeping
(``state.best_metric``, ``best_global_step``, ``best_model_checkpoint``: what rotation keeps and
``load_best_model_at_end`` loads) is updated when the score arrives, for the step it belongs to.  Where the
Trainer needs the value at the evaluation itself (``save_strategy="best"``, a ``reduce_lr_on_plateau`` schedule),
the callback waits for the score there (synchronous mode).
"""
from __future__ import annotations

import math
import os
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from transformers import TrainerCallback

__all__ = ["ExecutionAccuracyCallback"]


@dataclass
class _Pending:
    step: int
    generation_s: float
    future: Future | None  # rank 0 only
    count: int = 0


@dataclass
class EvaluationResult:
    """One evaluation: the step whose model was scored, EX, examples, and where the time went."""
    step: int
    ex: float
    count: int
    correct: int
    generation_s: float
    scoring_s: float
    waited_s: float
    extra: dict = field(default_factory=dict)


def _rows(examples) -> list[dict]:
    """The slice as a list of dicts (a ``datasets.Dataset`` of kid.data rows, or any sequence of mappings)."""
    if hasattr(examples, "to_list"):
        return list(examples.to_list())
    return [dict(x) for x in examples]


class ExecutionAccuracyCallback(TrainerCallback):
    """Execution accuracy (``eval_<metric_name>``, default ``eval_ex``) of greedy decoding on ``examples`` at every
    evaluation of a :class:`~kid.trainer.DistillTrainer` (module docstring).

    examples: the dev slice: a :mod:`kid.data` dataset (or mappings) with ``prompt``, ``query`` and ``db_id``
        (``prompt_question``: the part the prompt's truncation keeps; ``hardness`` / ``difficulty``: optional).
    db_dir: the databases, ``DIR/<db_id>/<db_id>.sqlite``.
    bird: BIRD's semantics (None: when the rows' ``source`` says bird).
    max_new_tokens / max_input_tokens: the SQL and prompt budgets (as in training).
    batch_size: prompts per ``generate`` call (None: ``args.per_device_eval_batch_size``).
    asynchronous: score in a background thread (False: wait for the score at the evaluation).
    timeout_s, max_rows, keep_distinct, num_workers: the evaluator's (worker processes: default at most 4, since
        training runs meanwhile).
    merge_lora: decode with the LoRA adapters merged into a copy of the weights (as the training rollout does).
    output_dir: write each evaluation's report (per-example predictions and results) to
        ``output_dir/evaluations/step-<N>.json``.

    Pass it in ``DistillTrainer(..., callbacks=[...])``; it binds to the trainer there.
    """

    def __init__(self, examples, db_dir, *, bird: bool | None = None, max_new_tokens: int = 128,
                 max_input_tokens: int = 1024, batch_size: int | None = None, asynchronous: bool = True,
                 metric_name: str = "ex", timeout_s: float = 30.0, max_rows: int | None = None,
                 keep_distinct: bool = False, num_workers: int | None = None, merge_lora: bool = True,
                 output_dir: str | os.PathLike | None = None):
        rows = _rows(examples)
        if not rows:
            raise ValueError("the execution-accuracy slice is empty")
        for key in ("prompt", "query", "db_id"):
            if any(key not in r for r in rows):
                raise ValueError(f"every example of the execution-accuracy slice needs {key!r}")
        if max_new_tokens < 1 or max_input_tokens < 1 or (batch_size is not None and batch_size < 1):
            raise ValueError("max_new_tokens, max_input_tokens and batch_size must be >= 1")
        if not metric_name or metric_name.startswith("eval_"):
            raise ValueError(f"metric_name {metric_name!r}: give the name without the eval_ prefix")
        self.examples = examples
        self.rows = rows
        self.db_dir = Path(db_dir)
        self.bird = bool(rows[0].get("source", "").startswith("bird")) if bird is None else bool(bird)
        self.max_new_tokens, self.max_input_tokens, self.batch_size = max_new_tokens, max_input_tokens, batch_size
        self.asynchronous = asynchronous
        self.metric_name = metric_name
        self.timeout_s, self.max_rows, self.keep_distinct = timeout_s, max_rows, keep_distinct
        self.num_workers = num_workers
        self.merge_lora = merge_lora
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.history: list[EvaluationResult] = []
        self._trainer_ref = None
        self._pending: _Pending | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._prompt_ids: list[list[int]] | None = None

    # ---- binding -------------------------------------------------------------------------------------------

    @property
    def metric_key(self) -> str:
        return f"eval_{self.metric_name}"

    def bind(self, trainer) -> None:
        """Attach to ``trainer`` (DistillTrainer does it for the callbacks it is given).  Switches to synchronous
        scoring where the Trainer needs the value at the evaluation itself."""
        self._trainer_ref = weakref.ref(trainer)
        args = trainer.args
        if self.asynchronous and self.selects_best(args):
            schedule = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
            if args.save_strategy == "best" or schedule in ("reduce_lr_on_plateau", "greedy"):
                self.asynchronous = False

    def selects_best(self, args) -> bool:
        """Whether ``metric_for_best_model`` is this callback's metric."""
        name = getattr(args, "metric_for_best_model", None)
        if not name:
            return False
        return (name if name.startswith("eval_") else f"eval_{name}") == self.metric_key

    @property
    def deferred(self) -> bool:
        """The metric arrives after the evaluation (the Trainer must not look for it in evaluate()'s result)."""
        return self.asynchronous

    def _trainer(self):
        trainer = self._trainer_ref() if self._trainer_ref is not None else None
        if trainer is None:
            raise RuntimeError("ExecutionAccuracyCallback is not bound to a trainer: pass it to DistillTrainer("
                               "callbacks=[...])")
        return trainer

    # ---- one evaluation ------------------------------------------------------------------------------------

    def evaluate(self, trainer) -> dict:
        """Generate for the slice (every process its share) and start scoring; returns the metrics when they are
        known now (synchronous mode), else ``{}`` (they are logged when they arrive)."""
        self.settle(trainer)  # one evaluation in flight at a time
        step = trainer.state.global_step
        started = time.perf_counter()
        predictions = self._generate(trainer)
        generation_s = time.perf_counter() - started
        future = None
        if predictions is not None:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kid-ex-scoring")
            future = self._executor.submit(self._score, predictions, step)
        self._pending = _Pending(step, generation_s, future, len(self.rows))
        if not self.asynchronous:
            return self.settle(trainer)
        return {}

    def settle(self, trainer=None, *, block: bool = True) -> dict:
        """Apply the pending score (waiting for it unless ``block=False``): log it, update the best checkpoint.
        Every process must call it at the same points (with several processes rank 0 broadcasts the score)."""
        pending = self._pending
        if pending is None:
            return {}
        trainer = trainer or self._trainer()
        world = trainer.args.world_size
        if not block and (world > 1 or pending.future is None or not pending.future.done()):
            return {}
        started = time.perf_counter()
        outcome: Any = None
        if pending.future is not None:
            try:
                outcome = pending.future.result()
            except Exception as exc:  # noqa: BLE001 - re-raised on every process below
                outcome = exc
        waited_s = time.perf_counter() - started
        if world > 1:
            import torch.distributed as dist

            box = [outcome]
            dist.broadcast_object_list(box, src=0)
            outcome = box[0]
        self._pending = None
        if isinstance(outcome, BaseException):
            raise RuntimeError(f"scoring the execution-accuracy slice of step {pending.step} failed: "
                               f"{type(outcome).__name__}: {outcome}") from outcome
        result = EvaluationResult(step=pending.step, ex=outcome["ex"], count=outcome["count"],
                                  correct=outcome["correct"], generation_s=round(pending.generation_s, 3),
                                  scoring_s=outcome["scoring_s"], waited_s=round(waited_s, 3))
        self.history.append(result)
        key = self.metric_key
        metrics = {key: result.ex, f"{key}_step": result.step, f"{key}_count": result.count,
                   f"{key}_generation_s": result.generation_s, f"{key}_scoring_s": result.scoring_s,
                   f"{key}_waited_s": result.waited_s}
        # Trainer.log clears control.should_log (on_log): a score logged at the end of a step must not cancel
        # that step's loss log line.
        should_log = trainer.control.should_log
        trainer.log(dict(metrics))
        trainer.control.should_log = should_log
        if self.asynchronous:
            self._update_best(trainer, result.step, result.ex)
        return metrics

    def before_save(self, trainer) -> None:
        """Called before a checkpoint is saved: the pending score first, unless it is this step's and training
        goes on (the new checkpoint is the newest: rotation cannot remove it)."""
        pending = self._pending
        if pending is None:
            return
        state, control = trainer.state, trainer.control
        if pending.step < state.global_step or control.should_training_stop or state.global_step >= state.max_steps:
            self.settle(trainer)

    def _update_best(self, trainer, step: int, value: float) -> None:
        """The Trainer's best-metric bookkeeping (``_determine_best_metric``), for the step the score belongs to."""
        args, state = trainer.args, trainer.state
        if not self.selects_best(args):
            return
        greater = True if args.greater_is_better is None else bool(args.greater_is_better)
        best = state.best_metric
        if best is not None and not (value > best if greater else value < best):
            return
        state.best_metric = value
        if args.save_strategy in ("steps", "epoch", "best"):
            state.best_global_step = step
        checkpoint = Path(args.output_dir) / f"checkpoint-{step}"
        if checkpoint.is_dir():
            state.best_model_checkpoint = str(checkpoint)

    # ---- generation and scoring -----------------------------------------------------------------------------

    def _prompts(self, tokenizer) -> list[list[int]]:
        if self._prompt_ids is None:
            from .prompts import tokenize_prompt

            self._prompt_ids = [tokenize_prompt(tokenizer, r["prompt"], max_input_tokens=self.max_input_tokens,
                                                question=r.get("prompt_question") or None) for r in self.rows]
        return self._prompt_ids

    def _generate(self, trainer) -> list[str] | None:
        """Greedy SQL for the slice: this process's share (rows rank, rank + world, ...), gathered on rank 0
        (None on the other processes).  Every process makes the same number of ``generate`` calls."""
        import torch

        from .generation import clean_generated_sql
        from .rollout import generate_grouped

        args, tokenizer = trainer.args, trainer.processing_class
        ids = self._prompts(tokenizer)
        n, rank, world = len(ids), args.process_index, args.world_size
        mine = list(range(rank, n, world))
        batch = self.batch_size or args.per_device_eval_batch_size
        calls = math.ceil(math.ceil(n / world) / batch)
        rows = mine or [0]  # a process with no question of its own decodes one and discards it
        prompts = [torch.tensor(ids[i], dtype=torch.long, device=args.device) for i in rows]
        eos = trainer.eos_token_id
        with torch.no_grad(), trainer.compute_loss_context_manager():
            answers = generate_grouped(trainer.model_wrapped, prompts, batch_size=batch, num_calls=calls,
                                       pad_token_id=trainer.pad_token_id, max_new_tokens=self.max_new_tokens,
                                       eos_token_id=eos, do_sample=False, merge_lora=self.merge_lora)
        texts = [clean_generated_sql(t) for t in
                 tokenizer.batch_decode([a.tolist() for a in answers], skip_special_tokens=True)]
        if not mine:
            texts = []
        if world > 1:
            import torch.distributed as dist

            parts: list = [None] * world
            dist.all_gather_object(parts, (mine, texts))
            if rank != 0:
                return None
            predictions = [""] * n
            for indices, part in parts:
                for i, text in zip(indices, part):
                    predictions[i] = text
            return predictions
        return texts

    def _score(self, predictions: Sequence[str], step: int) -> dict:
        """In the scoring thread: the real evaluator on the predictions; the report file when asked."""
        from .evaluation.pool import default_num_workers
        from .evaluation.scoring import evaluate_predictions
        from .evaluation.sqlite_safe import DEFAULT_MAX_ROWS

        started = time.perf_counter()
        rows = self.rows
        hardness = None if self.bird else [r.get("hardness") or None for r in rows]
        difficulties = [r.get("difficulty") or None for r in rows] if self.bird else None
        workers = self.num_workers if self.num_workers is not None else min(4, default_num_workers())
        report = evaluate_predictions(
            list(predictions), [r["query"] for r in rows], [r["db_id"] for r in rows], self.db_dir, bird=self.bird,
            keep_distinct=self.keep_distinct, timeout_s=self.timeout_s,
            max_rows=self.max_rows if self.max_rows is not None else DEFAULT_MAX_ROWS, hardness=hardness,
            difficulties=difficulties, num_workers=workers, progress=False)
        scoring_s = round(time.perf_counter() - started, 3)
        if self.output_dir is not None:
            from .files import atomic_write_json

            payload = dict(report.to_dict(), step=step, scoring_s=scoring_s)
            atomic_write_json(self.output_dir / "evaluations" / f"step-{step}.json", payload)
        return {"ex": float(report.accuracy), "count": len(rows), "correct": int(report.totals["correct"]),
                "scoring_s": scoring_s}

    # ---- the Trainer's events ------------------------------------------------------------------------------

    def on_step_end(self, args, state, control, **kwargs):
        if self._pending is not None and self._trainer_ref is not None and args.world_size == 1:
            self.settle(block=False)  # a finished score is logged at once; nothing waits for it
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self._trainer_ref is not None:
            self.settle()
        self.close()
        return control

    def close(self) -> None:
        """Stop the scoring thread (a pending score is dropped: call :meth:`settle` first to keep it)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
