"""Evaluation under inference noise: repeated noisy passes over the test set.

A *cell* is one (model, sigma_val, repeat): one full noisy pass over the test digits,
whose noise comes from its own generator seeded by (eval seed, model id, sigma_val,
repeat). Cells are therefore independent of each other and of the order they are computed
in, so stored cells are reused and a partial evaluation resumes to identical numbers.

The input projection ``W_x·x_t + b`` does not depend on the noise; it is computed once per
test batch and shared by every cell of that batch. On a GPU the noisy passes of a batch
that share a noise model run together as batched passes (:func:`count_correct`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import stats

from dni.data import Dataset, load_dataset
from dni.errors import StoreError
from dni.models import NoisyRecurrent
from dni.noise import make_generator, make_noise, perturb_weights
from dni.precision import products_in
from dni.progress import Reporter, SilentReporter
from dni.seeding import derive_seed
from dni.spec import EvalSpec, TrainSpec
from dni.store import Store

#: Columns of the tidy results CSV, one row per (model, sigma_val, repeat).
RESULT_COLUMNS = [
    "model_id", "arch", "data", "noise_train", "sigma_train", "seed",
    "noise_val", "sigma_val", "repeat", "eval_seed", "n_test", "correct", "accuracy",
]
CELL_KEYS = ["sigma_val", "repeat"]
#: Columns that identify one curve point of the summary.
POINT_KEYS = ["model_id", "arch", "data", "noise_train", "sigma_train", "seed", "noise_val", "sigma_val"]


def cell_seed(eval_seed: int, model_id: str, sigma_val: float, repeat: int) -> int:
    """Seed of one cell's noise generator."""
    return derive_seed(eval_seed, "eval", model_id, float(sigma_val), int(repeat))


@torch.no_grad()
def run_cells(
    model: NoisyRecurrent,
    model_id: str,
    test: Dataset,
    cells: Sequence[tuple[float, int]],
    spec: EvalSpec,
    device: torch.device,
    on_batch=None,
) -> list[int]:
    """Number of correctly classified test digits for each (sigma_val, repeat) cell."""
    model.eval()
    model.parse_sites(spec.sites)  # fail early on an unknown site
    with products_in(model, spec.precision):
        return _run_cells(model, model_id, test, cells, spec, device, on_batch)


def _run_cells(model, model_id, test, cells, spec, device, on_batch) -> list[int]:
    noises = [make_noise(spec.noise, s) for s, _ in cells]
    gens = [make_generator(spec.rng, cell_seed(spec.seed, model_id, s, r), device) for s, r in cells]
    correct = torch.zeros(len(cells), dtype=torch.int64, device=device)
    every_site = model.parse_sites(spec.sites) is None  # else the per-site loop, which reads xp
    if spec.weight_noise:
        # Programming noise: one perturbed copy of the weights per cell (per repeat), so
        # the input projection cannot be shared; cells run one after another.
        for k, ((s, r), noise, gen) in enumerate(zip(cells, noises, gens)):
            wgen = make_generator(spec.rng, derive_seed(cell_seed(spec.seed, model_id, s, r), "weights"), device)
            original = perturb_weights(model, spec.weight_noise, spec.weight_noise_mode, wgen)
            try:
                for start in range(0, len(test), spec.batch_size):
                    x = test.x[start : start + spec.batch_size].to(device)
                    y = test.y[start : start + spec.batch_size].to(device)
                    correct[k] += (model(x, noise, gen, sites=spec.sites).argmax(1) == y).sum()
            finally:
                model.load_state_dict(original)
        return correct.tolist()
    for start in range(0, len(test), spec.batch_size):
        x = test.x[start : start + spec.batch_size].to(device)
        y = test.y[start : start + spec.batch_size].to(device)
        xp = model.project(x)  # shared by every cell: no noise enters W_x·x + b
        # strokes: recomputed in the loop, cheaper than read
        inline = model.inline_projection(x, xp) if every_site else None
        noiseless = None  # the noise-free pass: the same for every cell without noise (sigma_val = 0)
        noisy: dict = {}  # noise model -> its cells
        for k, (noise, gen) in enumerate(zip(noises, gens)):
            if noise.is_noiseless:
                if noiseless is None:
                    noiseless = (model.recur(xp, noise, gen, sites=spec.sites, inline=inline).argmax(1) == y).sum()
                correct[k] += noiseless
            else:
                noisy.setdefault(noise, []).append(k)
        for noise, ks in noisy.items():
            counts = count_correct(model, xp, y, noise, [gens[k] for k in ks], spec.sites, inline)
            correct[torch.tensor(ks, device=correct.device)] += counts
        if on_batch is not None:
            on_batch(len(cells) * len(y) / len(test))
    return correct.tolist()


def count_correct(model: NoisyRecurrent, xp: torch.Tensor, y: torch.Tensor, noise, generators, sites=None, inline=None) -> torch.Tensor:
    """Correctly classified digits of one noisy pass per generator over the projected inputs
    ``xp`` (labels ``y``): the passes one by one, or on a GPU together, in batched passes of
    up to :attr:`~dni.models.NoisyRecurrent.REPEATS_SAMPLES` noise samples
    (:meth:`~dni.models.NoisyRecurrent.recur_repeats`; the same counts)."""
    if model.parse_sites(sites) is None and model.recurs_repeats(xp, noise, generators):
        at_once = max(1, model.REPEATS_SAMPLES // (xp.numel() + len(y) * model.fc.out_features))
        parts = [generators[i : i + at_once] for i in range(0, len(generators), at_once)]
        return torch.cat([(model.recur_repeats(xp, noise, part).argmax(2) == y).sum(1) for part in parts])
    return torch.stack([(model.recur(xp, noise, g, sites=sites, inline=inline).argmax(1) == y).sum() for g in generators])


def result_rows(spec: TrainSpec, model_id: str, cells, correct, ev: EvalSpec, n_test: int) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "model_id": model_id, "arch": spec.arch, "data": spec.data, "noise_train": spec.noise,
                "sigma_train": spec.sigma_train, "seed": spec.seed, "noise_val": ev.noise, "sigma_val": s,
                "repeat": r, "eval_seed": ev.seed, "n_test": n_test, "correct": c, "accuracy": c / n_test,
            }
            for (s, r), c in zip(cells, correct)
        ],
        columns=RESULT_COLUMNS,
    )


def missing_cells(store: Store, model_id: str, ev: EvalSpec) -> list[tuple[float, int]]:
    """Cells of ``ev`` not yet in the store for ``model_id``."""
    done = store.read_cells(model_id, ev.protocol_id, RESULT_COLUMNS)
    have = set(zip(done["sigma_val"].astype(float), done["repeat"].astype(int)))
    return [(s, r) for s in ev.sigma_val for r in range(ev.repeats) if (s, r) not in have]


def evaluate_point(
    store: Store,
    model_id: str,
    ev: EvalSpec,
    sigma_val: float,
    data_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> int:
    """Compute and store the missing repeats of one (model, sigma_val) point; return how many.

    Holds a lock on the point while it works, so a concurrent evaluation of the same point
    waits and then finds the cells done instead of computing them twice.
    """
    point = ev.for_sigmas((sigma_val,))
    with store.lock(f"{model_id}.{ev.protocol_id}.{sigma_val!r}".lower()):
        cells = missing_cells(store, model_id, point)
        if not cells:
            return 0
        device = torch.device(device)
        stored = store.load_model(model_id, device)
        spec = stored.spec
        test = load_dataset(spec.data, "test", data_dir, stroke_repr=spec.stroke_repr, limit=ev.limit_test)
        correct = run_cells(stored.model, model_id, test, cells, ev, device)
        store.add_cells(model_id, ev.protocol_id, result_rows(spec, model_id, cells, correct, ev, len(test)), CELL_KEYS)
    return len(cells)


def evaluate(
    store: Store,
    model_ids: Sequence[str],
    ev: EvalSpec,
    data_dir: str | Path | None = None,
    device: str | torch.device = "cpu",
    reporter: Reporter | None = None,
) -> pd.DataFrame:
    """Evaluate models under inference noise and return the tidy results of ``ev``'s cells.

    Cells already in the store are reused; new cells are saved after each sigma_val, so an
    interrupted evaluation loses at most one sigma_val's repeats of one model.
    """
    reporter = reporter or SilentReporter()
    todo = {m: missing_cells(store, m, ev) for m in model_ids}
    total = sum(len(c) for c in todo.values())
    if total:
        reporter.log(f"evaluating {total} cell(s) of {len(model_ids)} model(s); {len(model_ids) * len(ev.sigma_val) * ev.repeats - total} already stored")
    with reporter.task("evaluate", total) as task:
        for model_id, cells in todo.items():
            for sigma in dict.fromkeys(s for s, _ in cells):
                done = evaluate_point(store, model_id, ev, sigma, data_dir, device)
                task.advance(done, model=model_id[:24], sigma_val=sigma)
    return collect(store, model_ids, ev)


def collect(store: Store, model_ids: Sequence[str], ev: EvalSpec) -> pd.DataFrame:
    """The stored results of ``ev``'s cells for ``model_ids`` (tidy, sorted)."""
    frames = []
    for m in model_ids:
        df = store.read_cells(m, ev.protocol_id, RESULT_COLUMNS)
        wanted = df["sigma_val"].astype(float).isin(ev.sigma_val) & (df["repeat"].astype(int) < ev.repeats)
        frames.append(df.loc[wanted, RESULT_COLUMNS])
    if not frames:
        return pd.DataFrame(columns=RESULT_COLUMNS)
    out = pd.concat(frames, ignore_index=True)
    missing = len(model_ids) * len(ev.sigma_val) * ev.repeats - len(out)
    if missing:
        raise StoreError(f"{missing} evaluation cell(s) are missing from the store")
    if ev.weight_noise:  # programming noise, when used, is part of what identifies a cell
        out["weight_noise"], out["weight_noise_mode"] = ev.weight_noise, ev.weight_noise_mode
    if ev.sites != "all":
        out["sites"] = ev.sites
    if ev.precision != "fp32":
        out["precision"] = ev.precision
    return out.sort_values(["arch", "data", "sigma_train", "seed", "model_id", "sigma_val", "repeat"], kind="stable").reset_index(drop=True)


def summarize(results: pd.DataFrame, by: Sequence[str] = POINT_KEYS, confidence: float = 0.95) -> pd.DataFrame:
    """Mean, standard deviation and Student-t confidence interval of accuracy per point.

    Args:
        results: tidy results (one row per repeat).
        by: columns identifying a point; the rows within a point are the repeats.
        confidence: level of the interval (0.95 gives the columns ci_low / ci_high).
    """
    g = results.groupby(list(by), sort=True)["accuracy"]
    out = g.agg(n="count", mean="mean", std="std").reset_index()
    out["std"] = out["std"].fillna(0.0)
    sem = out["std"] / np.sqrt(out["n"])
    tq = stats.t.ppf(0.5 + confidence / 2, np.maximum(out["n"] - 1, 1))
    half = np.where(out["n"] > 1, tq * sem, np.nan)
    out["sem"] = sem
    out["ci_low"] = out["mean"] - half
    out["ci_high"] = out["mean"] + half
    return out


def summarize_seeds(summary: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """Aggregate per-model points over training seeds.

    Reports both sources of spread: ``std_seeds`` (between the model means of different
    training seeds) and ``std_noise`` (root mean square of each model's spread over noise
    draws), with a Student-t interval over seeds.
    """
    keys = ["arch", "data", "noise_train", "sigma_train", "noise_val", "sigma_val"]
    g = summary.groupby(keys, sort=True)
    out = g.agg(seeds=("mean", "count"), mean=("mean", "mean"), std_seeds=("mean", "std")).reset_index()
    out["std_noise"] = g["std"].apply(lambda s: float(np.sqrt(np.mean(np.square(s))))).to_numpy()
    out["std_seeds"] = out["std_seeds"].fillna(0.0)
    tq = stats.t.ppf(0.5 + confidence / 2, np.maximum(out["seeds"] - 1, 1))
    half = np.where(out["seeds"] > 1, tq * out["std_seeds"] / np.sqrt(out["seeds"]), np.nan)
    out["ci_low"] = out["mean"] - half
    out["ci_high"] = out["mean"] + half
    return out
