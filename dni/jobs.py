"""Units of work that any executor can run: train one model, evaluate one (model, sigma_val).

Each job takes only plain, picklable arguments, writes its result into the store itself
(atomically, under a lock) and is idempotent: a job whose work is already in the store
returns at once, so a rerun after a crash, a requeue or a lost driver never repeats or
corrupts finished work.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from dni.evaluate import evaluate_point
from dni.progress import Reporter
from dni.spec import EvalSpec, TrainSpec
from dni.store import Store
from dni.train import train


@dataclass(frozen=True)
class TrainOutcome:
    model_id: str
    trained: bool  # False: it was already in the store
    test_accuracy: float
    wall_time: float = 0.0


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
    """Train ``spec`` unless the store already has it; save it atomically."""
    set_threads(threads)
    store = Store(store_root)
    model_id = spec.model_id

    def stored() -> TrainOutcome:
        return TrainOutcome(model_id, False, store.read_meta(model_id).get("test_accuracy_clean", float("nan")))

    if store.has_model(model_id) and not force:
        return stored()
    with store.lock(model_id):
        if store.has_model(model_id) and not force:  # trained by another process meanwhile
            return stored()
        result = train(spec, data_dir, device, reporter)
        store.save_model(spec, result.model, result.meta, overwrite=force)
    return TrainOutcome(model_id, True, result.test_accuracy, result.wall_time)


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
