"""Analyses beyond the paper: robustness summaries and voting over repeated noisy inference.

* :func:`robustness` — per model, the midpoint noise level (where accuracy falls halfway
  from clean to chance, Walking Noise's summary) and the normalised area under the
  accuracy-sigma_val curve, with bootstrap confidence intervals over the repeats.
* :func:`vote` — classify each input by a majority vote (or the mean of the logits) of K
  independent noisy inferences (Harmful-or-Helpful's voting, Walking Noise's
  multi-execution) and report accuracy against K and sigma_val.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from dni.data import Dataset
from dni.evaluate import cell_seed
from dni.models import NoisyRecurrent
from dni.noise import make_generator, make_noise
from dni.seeding import derive_seed
from dni.spec import EvalSpec

MODEL_KEYS = ["model_id", "arch", "data", "noise_train", "sigma_train", "seed", "noise_val"]


def midpoint_sigma(sigmas: np.ndarray, acc: np.ndarray, chance: float = 0.1) -> float:
    """The sigma_val where accuracy first falls to (clean + chance) / 2, by linear
    interpolation; NaN when it stays above that level on the whole grid."""
    order = np.argsort(sigmas)
    s, a = np.asarray(sigmas, float)[order], np.asarray(acc, float)[order]
    level = (a[0] + chance) / 2
    below = np.nonzero(a <= level)[0]
    if len(below) == 0:
        return float("nan")
    k = below[0]
    if k == 0:
        return float(s[0])
    return float(s[k - 1] + (a[k - 1] - level) / (a[k - 1] - a[k]) * (s[k] - s[k - 1]))


def area_under_curve(sigmas: np.ndarray, acc: np.ndarray) -> float:
    """Trapezoidal area under accuracy vs sigma_val, divided by the sigma range (so it is
    the mean accuracy over the range; 1.0 = perfect everywhere)."""
    order = np.argsort(sigmas)
    s, a = np.asarray(sigmas, float)[order], np.asarray(acc, float)[order]
    if len(s) < 2 or s[-1] == s[0]:
        return float(a.mean())
    return float(np.sum((a[1:] + a[:-1]) / 2 * np.diff(s)) / (s[-1] - s[0]))


def robustness(results: pd.DataFrame, chance: float = 0.1, n_boot: int = 1000, seed: int = 0, confidence: float = 0.95) -> pd.DataFrame:
    """Per model: clean accuracy, midpoint sigma and AUC, with bootstrap CIs over repeats.

    Args:
        results: tidy results (one row per model, sigma_val, repeat).
        chance: accuracy of guessing (0.1 for ten digits).
        n_boot: bootstrap resamples of the repeats at each sigma_val.
    """
    rng = np.random.default_rng(seed)
    lo_q, hi_q = 50 * (1 - confidence), 50 * (1 + confidence)
    rows = []
    for key, df in results.groupby(MODEL_KEYS, sort=True):
        pivot = df.pivot_table(index="repeat", columns="sigma_val", values="accuracy")
        sig = pivot.columns.to_numpy(float)
        acc = pivot.to_numpy(float)  # (repeats, sigmas)
        mean = np.nanmean(acc, axis=0)
        idx = rng.integers(0, acc.shape[0], size=(n_boot, acc.shape[0]))
        boot = np.nanmean(acc[idx], axis=1)  # (n_boot, sigmas)
        mids = np.array([midpoint_sigma(sig, b, chance) for b in boot])
        aucs = np.array([area_under_curve(sig, b) for b in boot])
        finite = mids[np.isfinite(mids)]
        rows.append({
            **dict(zip(MODEL_KEYS, key)),
            "clean_accuracy": float(mean[np.argmin(sig)]),
            "midpoint_sigma": midpoint_sigma(sig, mean, chance),
            "midpoint_ci_low": float(np.percentile(finite, lo_q)) if len(finite) > n_boot // 2 else float("nan"),
            "midpoint_ci_high": float(np.percentile(finite, hi_q)) if len(finite) > n_boot // 2 else float("nan"),
            "auc": area_under_curve(sig, mean),
            "auc_ci_low": float(np.percentile(aucs, lo_q)),
            "auc_ci_high": float(np.percentile(aucs, hi_q)),
            "sigma_max": float(sig.max()),
            "repeats": int(acc.shape[0]),
        })
    return pd.DataFrame(rows)


VOTE_METHODS = ("majority", "mean")


@torch.no_grad()
def vote(
    model: NoisyRecurrent,
    model_id: str,
    test: Dataset,
    ev: EvalSpec,
    ks: Sequence[int],
    method: str = "majority",
    device: torch.device | str = "cpu",
) -> pd.DataFrame:
    """Accuracy of K-fold noisy inference for every K in ``ks``, sigma_val and repeat.

    The K passes of a cell are nested: the first K of max(ks) passes, so accuracy against
    K is measured on the same draws. Pass j of cell (sigma_val, repeat) uses the noise
    stream derived from that cell's seed and j.
    """
    if method not in VOTE_METHODS:
        from dni.errors import SpecError

        raise SpecError(f"unknown voting method {method!r}; choose one of {', '.join(VOTE_METHODS)}")
    ks = sorted(set(int(k) for k in ks))
    kmax = ks[-1]
    device = torch.device(device)
    model.eval()
    cells = [(sigma, r) for sigma in ev.sigma_val for r in range(ev.repeats)]
    noises = {sigma: make_noise(ev.noise, sigma) for sigma in ev.sigma_val}
    # Each pass keeps its own generator across the batches, so the batches can come first
    # and their projections be computed once for every cell.
    gens = {(sigma, r): [make_generator(ev.rng, derive_seed(cell_seed(ev.seed, model_id, sigma, r), "vote", j), device)
                         for j in range(kmax)] for sigma, r in cells}
    correct = {cell: {k: 0 for k in ks} for cell in cells}
    for start in range(0, len(test), ev.batch_size):
        x = test.x[start : start + ev.batch_size].to(device)
        y = test.y[start : start + ev.batch_size].to(device)
        xp = model.project(x)
        inline = model.inline_projection(x, xp)
        for sigma, r in cells:
            score = torch.zeros(len(y), model.num_classes, device=device)
            for j, gen in enumerate(gens[sigma, r], start=1):
                logits = model.recur(xp, noises[sigma], gen, inline=inline)
                if method == "majority":
                    # one vote per pass; the summed softmax breaks ties
                    score += torch.nn.functional.one_hot(logits.argmax(1), model.num_classes) + 1e-3 * logits.softmax(1)
                else:
                    score += logits
                if j in correct[sigma, r]:
                    correct[sigma, r][j] += int((score.argmax(1) == y).sum())
    rows = [{"model_id": model_id, "sigma_val": sigma, "repeat": r, "k": k, "method": method,
             "n_test": len(test), "accuracy": correct[sigma, r][k] / len(test)} for sigma, r in cells for k in ks]
    return pd.DataFrame(rows)


def walk(store, model_id: str, ev: EvalSpec, data_dir=None, device="cpu") -> pd.DataFrame:
    """Layer-sensitivity analysis in the spirit of Walking Noise: inject noise at one site
    at a time (each gate product of the cell, then the output layer) and report the
    accuracy and its drop from the noise-free accuracy, per site and sigma_val.

    The cells are ordinary evaluation cells (protocol with ``sites``), so they are stored
    and reused like any other.
    """
    import dataclasses

    from dni.evaluate import evaluate, summarize

    model = store.load_model(model_id).model
    sites = ["none", *model.site_names(), "all"]
    frames = []
    for site in sites:
        spec = dataclasses.replace(ev, sites=site)
        res = evaluate(store, [model_id], spec, data_dir, device)
        res["sites"] = site
        frames.append(res)
    summary = summarize(pd.concat(frames, ignore_index=True), by=["model_id", "arch", "data", "sigma_train", "sigma_val", "sites"])
    clean = float(summary.loc[summary["sites"] == "none", "mean"].mean())
    summary["drop"] = clean - summary["mean"]
    order = {s: i for i, s in enumerate(sites)}
    return summary.sort_values(["sigma_val", "sites"], key=lambda c: c.map(order) if c.name == "sites" else c).reset_index(drop=True)


class PowerMeter:
    """A 'noise model' that changes nothing and measures the mean power E[y²] of every
    pre-activation it is applied to (all noisy matrix-vector products of a pass)."""

    is_noiseless = True

    def __init__(self):
        self.sum_sq = 0.0
        self.count = 0

    def __call__(self, pre: torch.Tensor, generator) -> torch.Tensor:
        self.sum_sq += float(pre.detach().double().pow(2).sum())
        self.count += pre.numel()
        return pre

    @property
    def power(self) -> float:
        return self.sum_sq / max(self.count, 1)


@torch.no_grad()
def signal_power(model: NoisyRecurrent, test: Dataset, batch_size: int = 1000) -> float:
    """Mean power of the pre-activations at the noise sites in a noise-free pass."""
    meter = PowerMeter()
    model.eval()
    for start in range(0, len(test), batch_size):
        model(test.x[start : start + batch_size], meter, None)
    return meter.power


def snr_db(noise: str, sigma: float, power: float) -> float:
    """Signal-to-noise ratio (dB) that noise ``noise`` of strength ``sigma`` gives on
    pre-activations of mean power ``power`` (inf when sigma = 0)."""
    import math

    if sigma == 0:
        return math.inf
    name, _, arg = noise.partition(":")
    if name == "additive":
        noise_power = sigma**2
    elif name in ("multiplicative", "relative"):
        noise_power = sigma**2 * power
    elif name == "mixed":
        r = float(arg) if arg else 0.5
        noise_power = (r * sigma) ** 2 * power + ((1 - r) * sigma) ** 2
    else:
        from dni.errors import SpecError

        raise SpecError(f"no SNR formula for noise model {noise!r}")
    return 10 * math.log10(power / noise_power)


def model_powers(store, model_ids, data_dir=None, limit_test: int | None = 2000) -> dict[str, float]:
    """Signal power per model, measured on the first test digits and cached in the store."""
    import json

    from dni.data import load_dataset

    out = {}
    for mid in model_ids:
        path = store.model_dir(mid) / f"signal-power-{limit_test}.json"
        if path.is_file():
            out[mid] = json.loads(path.read_text())["power"]
            continue
        stored = store.load_model(mid)
        test = load_dataset(stored.spec.data, "test", data_dir, stroke_repr=stored.spec.stroke_repr, limit=limit_test)
        out[mid] = signal_power(stored.model, test)
        from dni.store import atomic_write

        atomic_write(path, json.dumps({"power": out[mid], "limit_test": limit_test}).encode())
    return out
