"""Sweeps: the paper's grids of (sigma_train, seed) models x (sigma_val, repeat) cells.

A sweep is planned from the store: only models that are not trained and cells that are
not evaluated become jobs (:mod:`dni.jobs`). Jobs write into the store themselves, so a
sweep can be killed at any moment and rerun: it picks up where it stopped, and because
every cell has its own noise seed the final results equal those of an uninterrupted run.

Executors run the jobs; dni never schedules them itself:

* ``local`` — :class:`concurrent.futures.ProcessPoolExecutor` on this machine.
* ``slurm`` — submitit, one Slurm job-array task per job (:mod:`dni.executors`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from dni.errors import SpecError
from dni.evaluate import collect, missing_cells, summarize, summarize_seeds
from dni.spec import LATER_EVAL_FIELDS, LATER_FIELDS, MAX_CELLS, EvalSpec, TrainSpec, canonical_json
from dni.stacking import why_not
from dni.store import Store, atomic_write, write_csv


MAX_MODELS = 10_000  # per sweep, with at most MAX_CELLS cells in all (see dni.spec)


@dataclass(frozen=True)
class SweepSpec:
    """A grid of models (sigma_train x seeds, other fields from ``base``) and their evaluation."""

    base: TrainSpec
    sigma_train: tuple[float, ...]
    seeds: tuple[int, ...]
    eval: EvalSpec

    def __post_init__(self) -> None:
        object.__setattr__(self, "sigma_train", tuple(dict.fromkeys(dataclasses.replace(self.base, sigma_train=s).sigma_train for s in self.sigma_train)))
        object.__setattr__(self, "seeds", tuple(dict.fromkeys(int(s) for s in self.seeds)))
        models = len(self.sigma_train) * len(self.seeds)
        cells = models * len(self.eval.sigma_val) * self.eval.repeats
        if models > MAX_MODELS or cells > MAX_CELLS:
            raise SpecError(f"a sweep of {models:,} models and {cells:,} (sigma_val, repeat) cells is larger than dni plans "
                            f"at once ({MAX_MODELS:,} models, {MAX_CELLS:,} cells); split it into several sweeps")

    def train_specs(self) -> list[TrainSpec]:
        return [dataclasses.replace(self.base, sigma_train=s, seed=k) for s in self.sigma_train for k in self.seeds]

    def model_ids(self) -> list[str]:
        return [s.model_id for s in self.train_specs()]

    def settings(self) -> str:
        """The spec fields that differ from their defaults, which tell apart sweeps of one
        architecture and data set: e.g. ``train.rng=philox eval.precision=bf16``."""
        same_grid = {"arch", "data", "sigma_train", "seed", "sigma_val"}
        parts = []
        for name, spec, default in (("train", self.base, TrainSpec(arch=self.base.arch, data=self.base.data)), ("eval", self.eval, EvalSpec())):
            for f in dataclasses.fields(spec):
                value = getattr(spec, f.name)
                if f.name not in same_grid and value != getattr(default, f.name):
                    parts.append(f"{name}.{f.name}={value:g}" if isinstance(value, float) else f"{name}.{f.name}={value}")
        return " ".join(parts) or "defaults"

    def to_dict(self) -> dict[str, Any]:
        return {"base": self.base.to_dict(), "sigma_train": list(self.sigma_train), "seeds": list(self.seeds),
                "eval": {**dataclasses.asdict(self.eval), "sigma_val": list(self.eval.sigma_val)}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SweepSpec:
        ev = dict(d["eval"])
        ev["sigma_val"] = tuple(ev["sigma_val"])
        return cls(TrainSpec.from_dict(d["base"]), tuple(d["sigma_train"]), tuple(d["seeds"]), EvalSpec(**ev))

    @property
    def sweep_id(self) -> str:
        """Id derived from the sweep; fields added to the specs later are left out while
        they hold their defaults, so existing stores keep their sweep ids."""
        d = self.to_dict()
        for part, later in (("base", LATER_FIELDS), ("eval", LATER_EVAL_FIELDS)):
            for name, default in later.items():
                if d[part].get(name) == default:
                    del d[part][name]
        digest = hashlib.sha256(canonical_json(d).encode()).hexdigest()[:10]
        return f"{self.base.arch}-{self.base.data}-{digest}"


@dataclass(frozen=True)
class Plan:
    """What a sweep still has to do."""

    train: list[TrainSpec]  # models to train
    evaluate: list[tuple[str, float]]  # (model id, sigma_val) points with missing repeats
    cells_missing: int
    cells_total: int
    models_total: int

    @property
    def done(self) -> bool:
        return not self.train and not self.evaluate


def plan(store: Store, sweep: SweepSpec, evaluate: bool = True) -> Plan:
    """Missing models and (if ``evaluate``) evaluation points of ``sweep``, read from the store."""
    train, points, missing = [], [], 0
    for spec in sweep.train_specs():
        mid = spec.model_id
        if not store.has_model(mid):
            train.append(spec)
            cells = [(s, r) for s in sweep.eval.sigma_val for r in range(sweep.eval.repeats)]
        else:
            cells = missing_cells(store, mid, sweep.eval)
        if not evaluate:
            continue
        missing += len(cells)
        points.extend((mid, s) for s in dict.fromkeys(s for s, _ in cells))
    total = len(sweep.train_specs()) * len(sweep.eval.sigma_val) * sweep.eval.repeats if evaluate else 0
    return Plan(train, points, missing, total, len(sweep.train_specs()))


def register(store: Store, sweep: SweepSpec) -> Path:
    """Record the sweep in the store (``sweeps/<id>/sweep.json``) so ``dni status`` knows it."""
    path = store.root / "sweeps" / sweep.sweep_id / "sweep.json"
    if not path.is_file():
        store.writable_dir(path.parent)
        atomic_write(path, json.dumps(sweep.to_dict(), indent=2, sort_keys=True).encode())
    return path


def registered(store: Store) -> list[SweepSpec]:
    """Sweeps recorded in the store."""
    root = store.root / "sweeps"
    if not root.is_dir():
        return []
    sweeps = [SweepSpec.from_dict(json.loads(p.read_text())) for p in sorted(root.glob("*/sweep.json"))]
    return list({s.sweep_id: s for s in sweeps}.values())  # one entry per sweep, however often registered


def finish(store: Store, sweep: SweepSpec, out: Path | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Collect the sweep's results, write them to the store (and ``out``), return (results, summary)."""
    results = collect(store, sweep.model_ids(), sweep.eval)
    summary = summarize(results)
    folder = store.root / "sweeps" / sweep.sweep_id
    write_csv(folder / "results.csv", results)
    write_csv(folder / "summary.csv", summary)
    if len(sweep.seeds) > 1:
        write_csv(folder / "summary-seeds.csv", summarize_seeds(summary))
    if out is not None:
        write_csv(out, results)
        write_csv(out.with_name(out.stem + "-summary.csv"), summary)
        if len(sweep.seeds) > 1:
            write_csv(out.with_name(out.stem + "-summary-seeds.csv"), summarize_seeds(summary))
    return results, summary


@dataclass
class SweepReport:
    sweep_id: str
    trained: int
    cells: int
    seconds: float
    already_done: bool


def run_sweep(
    store: Store,
    sweep: SweepSpec,
    executor,
    reporter=None,
    out: Path | None = None,
    evaluate: bool = True,
) -> SweepReport:
    """Plan the sweep, run its missing jobs on ``executor``, and write its results.

    ``executor`` (:mod:`dni.executors`) receives the plan and calls back as jobs finish.
    With ``evaluate=False`` only the models are trained (no results are written).
    """
    from dni.progress import SilentReporter

    reporter = reporter or SilentReporter()
    t0 = time.perf_counter()
    store.clean()
    register(store, sweep)
    todo = plan(store, sweep, evaluate)
    if todo.done:
        if evaluate:
            finish(store, sweep, out)
        return SweepReport(sweep.sweep_id, 0, 0, time.perf_counter() - t0, True)
    reporter.log(
        f"sweep {sweep.sweep_id}: {len(todo.train)} of {todo.models_total} models to train, "
        f"{todo.cells_missing} of {todo.cells_total} cells to evaluate ({executor.describe()})"
    )
    asked = getattr(executor, "stack", None)
    why = why_not(todo.train[0], executor.device) if asked and asked > 1 and todo.train else None
    if why:
        reporter.log(f"--stack {asked}: these models train one at a time: {why}")
    trained = cells = 0
    with reporter.task("models", len(todo.train)) as models_task, reporter.task("cells", todo.cells_missing) as cells_task:
        def on_trained(outcome):
            nonlocal trained
            trained += outcome.trained  # False: another process trained it meanwhile
            models_task.advance(1, last=outcome.model_id[:28])

        def on_evaluated(n):
            nonlocal cells
            cells += n
            cells_task.advance(n)

        executor.run(store, sweep, todo, on_trained, on_evaluated)
    remaining = plan(store, sweep, evaluate)
    if not remaining.done:
        from dni.errors import DniError

        raise DniError(
            f"sweep {sweep.sweep_id} is incomplete: {len(remaining.train)} model(s) and "
            f"{remaining.cells_missing} cell(s) still missing; rerun the same command to continue"
        )
    if evaluate:
        finish(store, sweep, out)
    return SweepReport(sweep.sweep_id, trained, cells, time.perf_counter() - t0, False)
