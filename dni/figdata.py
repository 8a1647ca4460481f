"""Figure data: pure functions from results CSVs (or the store) to tidy tables.

Each paper figure is drawn (:mod:`dni.figures`) from one of these tables, so figures can
be redrawn without retraining and each table is unit-testable. File names inside a
results directory are fixed here (:func:`paths`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from dni.store import Store

#: What the paper reports, for the comparison table (Section III, Figs. 2, 5, 9, 10).
PAPER = {
    ("lstm", "rows"): {"clean": 0.987, "conv_at_1": 0.125, "robust_sigma": 1.0, "robust_min": 0.98, "power": (0.013, 0.037)},
    ("lstm", "strokes"): {"clean": 0.96, "conv_at_1": 0.105, "robust_sigma": 0.9, "robust_min": 0.92, "power": (0.018, 0.042)},
    ("rnn", "rows"): {"clean": 0.98, "conv_at_1": 0.15, "robust_sigma": 0.9, "robust_min": 0.94, "power": None},
}
CASES = tuple(PAPER)
#: The three (sigma_train, sigma_val) pairs of Figs. 3, 4, 7, 8.
STATE_PAIRS = ((0.0, 0.0), (0.0, 1.0), (1.0, 1.0))
WEIGHT_BINS = np.linspace(-3.0, 3.0, 241)


def paths(results: Path, arch: str, data: str) -> dict[str, Path]:
    """Where a reproduction keeps the tables of one (arch, data) case."""
    stem = f"{arch}-{data}"
    return {
        "results": results / f"{stem}.csv",
        "summary": results / f"{stem}-summary.csv",
        "states": results / f"states-{stem}.csv",
        "weights": results / f"weights-{stem}.csv",
        "power": results / "weight-power.csv",
        "lengths": results / "stroke-lengths.csv",
    }


def accuracy_curves(
    summary: pd.DataFrame, arch: str | None = None, data: str | None = None, powers: dict[str, float] | None = None
) -> pd.DataFrame:
    """Accuracy and error-rate curves (Figs. 2, 10): one row per (sigma_train, sigma_val).

    Multiple training seeds are averaged (their spread is in ``summary-seeds.csv``). With
    ``powers`` (signal power per model id) a column ``snr_db`` gives each point's measured
    signal-to-noise ratio (averaged over seeds).
    """
    df = summary
    if arch is not None:
        df = df[df["arch"] == arch]
    if data is not None:
        df = df[df["data"] == data]
    if df.empty:
        raise ValueError(f"no results for arch={arch} data={data}")
    if powers is not None:
        from dni.analysis import snr_db

        df = df.assign(snr_db=[snr_db(nv, sv, powers[m]) for nv, sv, m in zip(df["noise_val"], df["sigma_val"], df["model_id"])])
    g = df.groupby(["sigma_train", "sigma_val"], sort=True)
    aggs = {"mean": ("mean", "mean"), "ci_low": ("ci_low", "mean"), "ci_high": ("ci_high", "mean"), "n": ("n", "sum")}
    if powers is not None:
        aggs["snr_db"] = ("snr_db", "mean")
    out = g.agg(**aggs).reset_index()
    out["error"] = 1.0 - out["mean"]
    out["error_low"] = 1.0 - out["ci_high"]
    out["error_high"] = 1.0 - out["ci_low"]
    return out


def reference_accuracy(curves: pd.DataFrame) -> float:
    """The red line: accuracy of (sigma_train = 0, sigma_val = 0)."""
    row = curves[(curves["sigma_train"] == 0.0) & (curves["sigma_val"] == 0.0)]
    return float(row["mean"].iloc[0]) if len(row) else float("nan")


def state_densities(states: pd.DataFrame, state: str, sigma_train: float, sigma_val: float) -> pd.DataFrame:
    """Per-step densities of one state for one (sigma_train, sigma_val) pair (Figs. 3, 4, 7, 8)."""
    df = states[(states["state"] == state) & (states["sigma_train"] == sigma_train) & (states["sigma_val"] == sigma_val)].copy()
    if df.empty:
        raise ValueError(f"no recorded {state} states for sigma_train={sigma_train}, sigma_val={sigma_val}")
    width = df["bin_right"] - df["bin_left"]
    totals = df.groupby("step")["count"].transform("sum")
    df["density"] = df["count"] / (totals * width)
    df["x"] = (df["bin_left"] + df["bin_right"]) / 2
    return df[["step", "x", "density"]].sort_values(["step", "x"]).reset_index(drop=True)


def weight_tables(store: Store, model_ids: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Histograms of all weights (biases included, as in the paper) and the expected weight
    power, mean of the squared weights, per model (Figs. 5, 9)."""
    hist_rows, power_rows = [], []
    for mid in model_ids:
        spec = store.read_spec(mid)
        model = store.load_model(mid).model
        w = torch.cat([p.detach().flatten() for p in model.parameters()]).double().numpy()
        counts, _ = np.histogram(np.clip(w, WEIGHT_BINS[0], WEIGHT_BINS[-1]), bins=WEIGHT_BINS)
        hist_rows += [(mid, spec.arch, spec.data, spec.sigma_train, spec.seed, WEIGHT_BINS[k], WEIGHT_BINS[k + 1], int(c)) for k, c in enumerate(counts)]
        power_rows.append((mid, spec.arch, spec.data, spec.sigma_train, spec.seed, len(w), float(np.mean(w**2)), float(np.std(w)), float(np.abs(w).max())))
    hist = pd.DataFrame(hist_rows, columns=["model_id", "arch", "data", "sigma_train", "seed", "bin_left", "bin_right", "count"])
    power = pd.DataFrame(power_rows, columns=["model_id", "arch", "data", "sigma_train", "seed", "n_weights", "power", "std", "max_abs"])
    return hist, power.sort_values(["arch", "data", "sigma_train", "seed"]).reset_index(drop=True)


def stroke_length_table(lengths: np.ndarray) -> pd.DataFrame:
    """Histogram of stroke-sequence lengths (Fig. 6)."""
    values, counts = np.unique(lengths, return_counts=True)
    return pd.DataFrame({"length": values.astype(int), "count": counts.astype(int)})


def comparison_rows(summary: pd.DataFrame, power: pd.DataFrame | None, arch: str, data: str) -> list[dict]:
    """The paper's numbers beside ours, for one (arch, data) case."""
    ref = PAPER[(arch, data)]
    df = summary[(summary["arch"] == arch) & (summary["data"] == data)]
    curves = accuracy_curves(df)
    grid = sorted(curves["sigma_val"].unique())
    rows = []

    def point(st: float, sv: float) -> pd.Series | None:
        r = curves[(np.isclose(curves["sigma_train"], st)) & (np.isclose(curves["sigma_val"], sv))]
        return r.iloc[0] if len(r) else None

    def fmt(r: pd.Series | None) -> str:
        if r is None:
            return "not run"
        ci = "" if np.isnan(r["ci_low"]) else f" [{100 * r['ci_low']:.2f}, {100 * r['ci_high']:.2f}]"
        return f"{100 * r['mean']:.2f}%{ci}"

    clean = point(0.0, 0.0)
    rows.append({"quantity": "clean accuracy (σ_train = 0, σ_val = 0)", "paper": f"{100 * ref['clean']:.1f}%", "ours": fmt(clean),
                 "delta_pp": None if clean is None else 100 * (clean["mean"] - ref["clean"])})
    top = max(grid)
    conv = point(0.0, top)
    rows.append({"quantity": f"conventional model at σ_val = {top:g}", "paper": f"{100 * ref['conv_at_1']:.1f}%", "ours": fmt(conv),
                 "delta_pp": None if conv is None else 100 * (conv["mean"] - ref["conv_at_1"])})
    st = ref["robust_sigma"]
    robust = curves[np.isclose(curves["sigma_train"], st)]
    if len(robust):
        worst = robust.loc[robust["mean"].idxmin()]
        rows.append({"quantity": f"minimum over σ_val of σ_train = {st:g} (at σ_val = {worst['sigma_val']:g})",
                     "paper": f"> {100 * ref['robust_min']:.0f}%", "ours": fmt(worst),
                     "delta_pp": 100 * (worst["mean"] - ref["robust_min"])})
    else:
        rows.append({"quantity": f"minimum over σ_val of σ_train = {st:g}", "paper": f"> {100 * ref['robust_min']:.0f}%", "ours": "not run", "delta_pp": None})
    base = reference_accuracy(curves)
    noisy = curves[(curves["sigma_train"] > 0)]
    above = noisy[noisy["mean"] > base]
    beats = above[above["ci_low"] > base]
    rows.append({"quantity": "(σ_train > 0, σ_val) points above the clean model's accuracy (the red line)",
                 "paper": "some", "ours": f"{len(above)} of {len(noisy)} ({len(beats)} with the whole 95% CI above)", "delta_pp": None})
    clean_beaters = noisy[np.isclose(noisy["sigma_val"], 0.0) & (noisy["mean"] > base)]
    rows.append({"quantity": "noise-trained models above it at σ_val = 0", "paper": "some",
                 "ours": f"{len(clean_beaters)} of {int(np.isclose(noisy['sigma_val'], 0.0).sum())}", "delta_pp": None})
    if ref["power"] is not None and power is not None:
        p = power[(power["arch"] == arch) & (power["data"] == data)].groupby("sigma_train")["power"].mean()
        for s, paper_value in zip((0.0, 1.0), ref["power"]):
            ours = f"{p.loc[s]:.4f}" if s in p.index else "not run"
            rows.append({"quantity": f"weight power E[w²] at σ_train = {s:g}", "paper": f"{paper_value:.3f}", "ours": ours, "delta_pp": None})
    return rows
