"""Units of work that any executor can run: train one model (or one stack of models, see
dni.stacking), evaluate one (model, sigma_val).

Each job takes only plain, picklable arguments, writes its result into the store itself
(atomically, under a lock) and is idempotent: a job whose work is already in the store
returns at once, so a rerun after a crash, a requeue or a lost driver never repeats or
corrupts finished work.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from dni.errors import DivergenceError
from dni.evaluate import evaluate_point
from dni.progress import Reporter
from dni.spec import EvalSpec, TrainSpec
from dni.store import Store
from dni.train import train_stack


@dataclass(frozen=True)
class TrainOutcome:
    model_id: str
    trained: bool  # False: it was already in the store (or training failed: see error)
    test_accuracy: float
    wall_time: float = 0.0
    error: str | None = None  # why training this model stopped (its stack's other members train on)


def set_threads(threads: int | None) -> None:
    """Intra-op threads of this process (None: leave torch's default)."""
    if threads:
        torch.set_num_threads(threads)


def train_job(
    store_root: str | Path,
    spec: TrainSpec,
    data_dir: str | Path | None = None,
    device: str = "cpu",
    force: bool = False,
    reporter: Reporter | None = None,
    threads: int | None = None,
) -> TrainOutcome:
    """Train ``spec`` unless the store already has it; save it atomically.

    Raises:
        DivergenceError: training diverged (nothing is saved).
    """
    (outcome,) = train_stack_job(store_root, [spec], data_dir, device, force, reporter, threads)
    if outcome.error is not None:
        raise DivergenceError(outcome.error)
    return outcome


def train_stack_job(
    store_root: str | Path,
    specs: list[TrainSpec],
    data_dir: str | Path | None = None,
    device: str = "cpu",
    force: bool = False,
    reporter: Reporter | None = None,
    threads: int | None = None,
) -> list[TrainOutcome]:
    """Train those of ``specs`` the store does not have, together as one stack
    (:mod:`dni.stacking`; a single spec trains alone), and save each atomically.

    The members' locks are taken in one order, so jobs whose stacks overlap wait for each
    other instead of deadlocking, and a model trained meanwhile is not trained again.
    A member that diverges is reported in its outcome's ``error`` and not saved.
    """
    set_threads(threads)
    store = Store(store_root)

    def stored(spec: TrainSpec) -> TrainOutcome:
        return TrainOutcome(spec.model_id, False, store.read_meta(spec.model_id).get("test_accuracy_clean", float("nan")))

    if not force and all(store.has_model(s.model_id) for s in specs):
        return [stored(s) for s in specs]
    outcomes: dict[str, TrainOutcome] = {}
    with ExitStack() as locks:
        for model_id in sorted({s.model_id for s in specs}):
            locks.enter_context(store.lock(model_id))
        todo = [s for s in dict.fromkeys(specs) if force or not store.has_model(s.model_id)]
        for spec, result in zip(todo, train_stack(todo, data_dir, device, reporter) if todo else []):
            if isinstance(result, DivergenceError):
                outcomes[spec.model_id] = TrainOutcome(spec.model_id, False, float("nan"), error=str(result))
                continue
            store.save_model(spec, result.model, result.meta, overwrite=force)
            outcomes[spec.model_id] = TrainOutcome(spec.model_id, True, result.test_accuracy, result.wall_time)
    return [outcomes.get(s.model_id) or stored(s) for s in specs]


def eval_job(
    store_root: str | Path,
    model_id: str,
    ev: EvalSpec,
    sigma_val: float,
    data_dir: str | Path | None = None,
    device: str = "cpu",
    threads: int | None = None,
) -> int:
    """Compute the missing repeats of one (model, sigma_val) point; return how many."""
    set_threads(threads)
    return evaluate_point(Store(store_root), model_id, ev, sigma_val, data_dir, device)
