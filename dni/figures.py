"""Drawing: thin matplotlib functions that put figure data (:mod:`dni.figdata`) on axes.

Colours are consistent across figures: sigma_train maps to the sequential ``viridis``
colormap (dark = 0, yellow = 1), time steps to ``plasma``. Sizes fit a two-column paper
(7.0 in wide for full-width figures).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib import cm, colors, ticker  # noqa: E402

from dni.figdata import STATE_PAIRS, accuracy_curves, reference_accuracy, state_densities  # noqa: E402

FULL_WIDTH = 7.0
#: viridis without its last, pale-yellow tenth (hard to see on white)
SIGMA_CMAP = colors.ListedColormap(matplotlib.colormaps["viridis"](np.linspace(0.0, 0.9, 256)), name="dni_sigma")
STEP_CMAP = colors.ListedColormap(matplotlib.colormaps["plasma"](np.linspace(0.0, 0.85, 256)), name="dni_step")
plt.rcParams.update({
    "font.size": 8, "axes.titlesize": 8.5, "axes.labelsize": 8, "legend.fontsize": 6.5,
    "xtick.labelsize": 7, "ytick.labelsize": 7, "lines.linewidth": 1.0, "axes.grid": True,
    "grid.alpha": 0.25, "grid.linewidth": 0.5, "savefig.dpi": 200, "pdf.fonttype": 42,
})


def sigma_color(sigma_train: float):
    """The colour of a sigma_train value, the same in every figure (0 -> 1 along viridis)."""
    return SIGMA_CMAP(float(sigma_train))


def _plain_log_axis(ax) -> None:
    """Log-scale y axis labelled with plain numbers (0.5, 1, 2, 5, ...) instead of 10^x."""
    fmt = ticker.FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(fmt)
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())


def _sigma_colorbar(fig, axes) -> None:
    sm = cm.ScalarMappable(norm=colors.Normalize(0, 1), cmap=SIGMA_CMAP)
    cb = fig.colorbar(sm, ax=axes, fraction=0.04, pad=0.02, ticks=[0, 0.2, 0.4, 0.6, 0.8, 1.0])
    cb.set_label("σ_train")


def draw_accuracy(ax_acc, ax_err, curves: pd.DataFrame, title: str | None = None, x: str = "sigma_val") -> None:
    """Accuracy vs sigma_val (or the measured SNR, ``x="snr_db"``) and error rate (log
    scale), one curve per sigma_train, 95% CI bands, and the red reference line at
    (sigma_train = 0, sigma_val = 0)."""
    base = reference_accuracy(curves)
    if x == "snr_db":
        curves = curves[np.isfinite(curves["snr_db"])]  # sigma_val = 0 is at infinite SNR
    for st, c in curves.groupby("sigma_train"):
        col = sigma_color(st)
        ax_acc.plot(c[x], 100 * c["mean"], color=col, marker="o", ms=2)
        ax_acc.fill_between(c[x], 100 * c["ci_low"], 100 * c["ci_high"], color=col, alpha=0.25, lw=0)
        ax_err.plot(c[x], 100 * c["error"], color=col, marker="o", ms=2)
        ax_err.fill_between(c[x], 100 * c["error_low"].clip(lower=1e-3), 100 * c["error_high"], color=col, alpha=0.25, lw=0)
    if np.isfinite(base):
        ax_acc.axhline(100 * base, color="red", lw=0.8)
        ax_err.axhline(100 * (1 - base), color="red", lw=0.8)
    label = "σ_val" if x == "sigma_val" else "measured SNR of the pre-activations (dB)"
    ax_acc.set(xlabel=label, ylabel="accuracy (%)")
    ax_err.set(xlabel=label, ylabel="error rate (%)", yscale="log")
    if x == "snr_db":  # noise grows to the right, as on the σ axis
        ax_acc.invert_xaxis()
        ax_err.invert_xaxis()
    _plain_log_axis(ax_err)
    if title:
        ax_acc.set_title(title, loc="left")


def fig_accuracy(panels: list[tuple[str, pd.DataFrame]], x: str = "sigma_val"):
    """Figs. 2 and 10: a row (accuracy, error rate) per panel."""
    fig, axes = plt.subplots(len(panels), 2, figsize=(FULL_WIDTH, 2.4 * len(panels)), squeeze=False, layout="constrained")
    for (title, curves), (ax_acc, ax_err) in zip(panels, axes):
        draw_accuracy(ax_acc, ax_err, curves, title, x)
    _sigma_colorbar(fig, axes)
    return fig


def fig_states(states: pd.DataFrame, state: str, title: str, pairs=STATE_PAIRS):
    """Figs. 3, 4, 7, 8: per-step state distributions for three (sigma_train, sigma_val)
    pairs, with the N(0, 1) noise density (dashed blue; truncated to [-1, 1] for h)."""
    fig, axes = plt.subplots(1, len(pairs), figsize=(FULL_WIDTH, 2.5), sharey=True, layout="constrained")
    steps = int(states["step"].max())
    for ax, (st, sv) in zip(axes, pairs):
        dens = state_densities(states, state, st, sv)
        for t, d in dens.groupby("step"):
            ax.plot(d["x"], d["density"], color=STEP_CMAP((t - 1) / max(steps - 1, 1)), lw=0.7,
                    label=f"cell {t}" if t <= 3 else None)
        lo, hi = (-1.0, 1.0) if state == "h" else (float(dens["x"].min()), float(dens["x"].max()))
        x = np.linspace(lo, hi, 400)
        ax.plot(x, np.exp(-x**2 / 2) / np.sqrt(2 * np.pi), "--", color="tab:blue", lw=1.2, label="N(0, 1) noise")
        ax.set(title=f"σ_train = {st:g}, σ_val = {sv:g}", xlabel="h_t" if state == "h" else "c_t", yscale="log")
        ax.set_ylim(1e-3, None)
    axes[0].set_ylabel("density")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), frameon=False)
    sm = cm.ScalarMappable(norm=colors.Normalize(1, steps), cmap=STEP_CMAP)
    cb = fig.colorbar(sm, ax=axes, fraction=0.04, pad=0.02, ticks=[1, steps // 2, steps])
    cb.set_label("cell t")
    fig.suptitle(title, x=0.01, ha="left", fontsize=8.5)
    return fig


def fig_weights(hist: pd.DataFrame, power: pd.DataFrame, title: str, paper_power: tuple[float, float] | None = None):
    """Figs. 5, 9: weight histograms of the models and their expected weight power."""
    fig, (ax_h, ax_p) = plt.subplots(1, 2, figsize=(FULL_WIDTH, 2.5), gridspec_kw={"width_ratios": [1.6, 1]}, layout="constrained")
    for st, h in hist.groupby("sigma_train"):
        h = h.groupby(["bin_left", "bin_right"], as_index=False)["count"].sum()
        x = (h["bin_left"] + h["bin_right"]) / 2
        dens = h["count"] / (h["count"].sum() * (h["bin_right"] - h["bin_left"]))
        ax_h.plot(x, dens, color=sigma_color(st), lw=0.8)
    ax_h.set(xlabel="weight value", ylabel="density", yscale="log", title=title)
    used = hist.loc[hist["count"] > 0]
    reach = max(abs(float(used["bin_left"].min())), abs(float(used["bin_right"].max()))) if len(used) else 1.0
    ax_h.set_xlim(-1.05 * reach, 1.05 * reach)
    ax_h.set_ylim(1e-3, None)
    p = power.groupby("sigma_train")["power"].agg(["mean", "min", "max"]).reset_index()
    ax_p.plot(p["sigma_train"], p["mean"], color="0.3", lw=0.8, zorder=1)
    ax_p.scatter(p["sigma_train"], p["mean"], c=[sigma_color(s) for s in p["sigma_train"]], s=14, zorder=2, label="dni")
    if paper_power is not None:
        ax_p.scatter([0.0, 1.0], paper_power, marker="x", color="red", s=22, zorder=3, label="paper")
        ax_p.legend(frameon=False, loc="upper left")
    ax_p.set(xlabel="σ_train", ylabel="expected weight power E[w²]", title="weight power")
    _sigma_colorbar(fig, [ax_h, ax_p])
    return fig


def fig_lengths(lengths: pd.DataFrame, steps: int = 50):
    """Fig. 6: histogram of stroke-sequence lengths (training set)."""
    fig, ax = plt.subplots(figsize=(3.4, 2.3), layout="constrained")
    ax.bar(lengths["length"], lengths["count"], width=1.0, color=SIGMA_CMAP(0.35), lw=0)
    ax.axvline(steps + 0.5, color="red", lw=0.8, ls="--", label=f"{steps} steps used")
    ax.set(xlabel="length of stroke sequence (pen points)", ylabel="number of digits", title="MNIST training set")
    ax.legend(frameon=False)
    return fig


def save(fig, out: Path, name: str) -> list[Path]:
    """Write ``name``.png and ``name``.pdf into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for ext in ("png", "pdf"):
        path = out / f"{name}.{ext}"
        fig.savefig(path, metadata={"Creator": "dni"} if ext == "png" else {"Creator": "dni", "CreationDate": None})
        files.append(path)
    plt.close(fig)
    return files


def accuracy_panels(summary_by_case: dict[tuple[str, str], pd.DataFrame], cases) -> list[tuple[str, pd.DataFrame]]:
    labels = {("lstm", "rows"): "LSTM, image rows (Table I)", ("lstm", "strokes"): "LSTM, pen strokes (Table II)",
              ("rnn", "rows"): "vanilla RNN, image rows (Table III)", ("rnn", "strokes"): "vanilla RNN, pen strokes"}
    return [(f"({'abcdefgh'[i]}) {labels.get(c, ' '.join(c))}" if len(cases) > 1 else labels.get(c, " ".join(c)),
             accuracy_curves(summary_by_case[c], *c)) for i, c in enumerate(cases) if c in summary_by_case]


def fig_robustness(table: pd.DataFrame, title: str = ""):
    """Midpoint noise level and area under the accuracy curve against sigma_train."""
    fig, (ax_m, ax_a) = plt.subplots(1, 2, figsize=(FULL_WIDTH, 2.4), layout="constrained")
    for (arch, data), t in table.groupby(["arch", "data"]):
        t = t.groupby("sigma_train", as_index=False).mean(numeric_only=True)
        label = f"{arch} {data}"
        ax_m.errorbar(t["sigma_train"], t["midpoint_sigma"], yerr=[t["midpoint_sigma"] - t["midpoint_ci_low"], t["midpoint_ci_high"] - t["midpoint_sigma"]],
                      marker="o", ms=3, capsize=2, label=label)
        ax_a.errorbar(t["sigma_train"], t["auc"], yerr=[t["auc"] - t["auc_ci_low"], t["auc_ci_high"] - t["auc"]], marker="o", ms=3, capsize=2, label=label)
    ax_m.set(xlabel="σ_train", ylabel="midpoint σ_val", title="accuracy halfway between clean and chance")
    ax_a.set(xlabel="σ_train", ylabel="mean accuracy over σ_val (AUC)", title="area under the accuracy curve")
    ax_a.legend(frameon=False)
    if title:
        fig.suptitle(title, x=0.01, ha="left", fontsize=8.5)
    return fig


def fig_vote(table: pd.DataFrame, title: str = ""):
    """Accuracy against the number K of voting noisy inferences, one curve per sigma_val."""
    fig, ax = plt.subplots(figsize=(3.4, 2.5), layout="constrained")
    g = table.groupby(["sigma_val", "k"], as_index=False)["accuracy"].agg(["mean", "std", "count"])
    smax = max(float(g["sigma_val"].max()), 1e-9)
    for sv, t in g.groupby("sigma_val"):
        half = 1.96 * t["std"].fillna(0) / np.sqrt(t["count"])
        ax.errorbar(t["k"], 100 * t["mean"], yerr=100 * half, marker="o", ms=3, capsize=2, color=STEP_CMAP(sv / smax), label=f"σ_val = {sv:g}")
    ax.set(xlabel="K (noisy inferences per input)", ylabel="accuracy (%)", xscale="log", title=title)
    ax.set_xticks(sorted(g["k"].unique()))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.legend(frameon=False, fontsize=6)
    return fig


def fig_walk(table: pd.DataFrame, title: str = ""):
    """Accuracy drop when noise is injected at one site at a time, per sigma_val."""
    sites = [s for s in dict.fromkeys(table["sites"]) if s != "none"]
    sigmas = sorted(table["sigma_val"].unique())
    fig, ax = plt.subplots(figsize=(3.4, 0.35 * len(sites) * max(len(sigmas), 1) + 0.9), layout="constrained")
    height = 0.8 / len(sigmas)
    smax = max(max(sigmas), 1e-9)
    for j, sv in enumerate(sigmas):
        t = table[(table["sigma_val"] == sv)].set_index("sites").loc[sites]
        y = np.arange(len(sites)) + j * height
        err = (t["ci_high"] - t["mean"]).fillna(0) * 100
        ax.barh(y, 100 * t["drop"], height=height, xerr=err, color=STEP_CMAP(sv / smax), label=f"σ_val = {sv:g}", capsize=2)
    ax.set_yticks(np.arange(len(sites)) + 0.4 - height / 2, sites)
    ax.invert_yaxis()
    ax.set(xlabel="accuracy drop (percentage points)", ylabel="noisy site", title=title)
    ax.legend(frameon=False, fontsize=6)
    return fig
