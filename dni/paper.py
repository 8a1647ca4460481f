"""The paper's protocol: presets, the end-to-end reproduction, Figures 2-10, the comparison.

``reproduce(preset)`` runs one sweep per architecture (resumable), records the state
histograms, extracts the weight tables, writes every table into the results directory,
draws every figure from those tables, and writes ``comparison.md``.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

import dni
from dni import mkl_path
from dni.data import stroke_lengths
from dni.figdata import CASES, PAPER, STATE_PAIRS, comparison_rows, paths, stroke_length_table, weight_tables
from dni.progress import SilentReporter
from dni.sittings import Sitting, read_sittings, summary
from dni.spec import EvalSpec, TrainSpec, parse_grid
from dni.states import STATE_COLUMNS, record_states
from dni.store import Store, read_csv, write_csv
from dni.sweep import SweepSpec, run_sweep


@dataclass(frozen=True)
class Preset:
    """A reproduction protocol: the same sweep for each of the paper's three cases."""

    name: str
    sigma_train: tuple[float, ...]
    eval: EvalSpec
    limit_train: int | None = None
    val_size: int = 5000
    epochs: int | None = None  # None: the recipe's per-case default
    description: str = ""
    train_rng: str = "torch"  # training-noise generator (philox: the compiled training path)

    def sweeps(self, cases=CASES) -> list[SweepSpec]:
        out = []
        for arch, data in cases:
            base = TrainSpec(arch=arch, data=data, epochs=self.epochs, limit_train=self.limit_train, val_size=self.val_size,
                             rng=self.train_rng)
            out.append(SweepSpec(base, self.sigma_train, (0,), self.eval))
        return out


PRESETS = {
    "paper": Preset(
        "paper", parse_grid("0:1:0.1"), EvalSpec(sigma_val=parse_grid("0:1:0.1"), repeats=40),
        description="the full protocol: 3 cases x 11 sigma_train, 11 sigma_val x 40 repeats on all 10,000 test digits",
    ),
    "smoke": Preset(
        "smoke", (0.0, 0.5, 1.0), EvalSpec(sigma_val=parse_grid("0:1:0.25"), repeats=3, limit_test=500),
        limit_train=3000, val_size=500, epochs=2,
        description="end-to-end check in minutes: 3 sigma_train, 5 sigma_val x 3 repeats, 3,000 training and 500 test digits, 2 epochs",
    ),
}


# --------------------------------------------------------------------------- figures

FIGURES = {
    2: "accuracy and error rate of LSTMs (a) image rows, (b) pen strokes",
    3: "distributions of the LSTM output states, image rows",
    4: "distributions of the LSTM internal states, image rows",
    5: "weight histograms and weight power, LSTM image rows",
    6: "histogram of stroke-sequence lengths",
    7: "distributions of the LSTM output states, pen strokes",
    8: "distributions of the LSTM internal states, pen strokes",
    9: "weight histograms and weight power, LSTM pen strokes",
    10: "accuracy and error rate of vanilla RNNs",
}


def _need(path: Path) -> Path:
    from dni.errors import DniError

    if not path.is_file():
        raise DniError(f"{path} is missing: run `dni reproduce` (or the sweep that produces it) first")
    return path


def figure_inputs(n: int, results: Path) -> list[Path]:
    """The tables figure ``n`` is drawn from."""
    if n in (2, 10):
        cases = [("lstm", "rows"), ("lstm", "strokes")] if n == 2 else [("rnn", "rows")]
        return [paths(results, *c)["summary"] for c in cases]
    data = "rows" if n in (3, 4, 5) else "strokes"
    p = paths(results, "lstm", data)
    return {3: [p["states"]], 4: [p["states"]], 7: [p["states"]], 8: [p["states"]], 5: [p["weights"], p["power"]],
            9: [p["weights"], p["power"]], 6: [p["lengths"]]}[n]


def draw_figure(n: int, results: Path, out: Path) -> list[Path]:
    """Draw paper figure ``n`` from the tables in ``results`` into ``out`` (PNG + PDF).

    Figure 2 is drawn with the panels whose tables exist (the panel letters stay fixed).
    """
    from dni import figures
    from dni.errors import DniError

    if n not in FIGURES:
        raise DniError(f"no figure {n}; the paper's figures are {min(FIGURES)}-{max(FIGURES)}")
    summary = lambda a, d: pd.read_csv(_need(paths(results, a, d)["summary"]))  # noqa: E731
    if n in (2, 10):
        cases = [("lstm", "rows"), ("lstm", "strokes")] if n == 2 else [("rnn", "rows")]
        have = [c for c in cases if paths(results, *c)["summary"].is_file()] or cases
        fig = figures.fig_accuracy(figures.accuracy_panels({c: summary(*c) for c in have}, cases))
    elif n in (3, 4, 7, 8):
        data = "rows" if n in (3, 4) else "strokes"
        states = read_csv(_need(paths(results, "lstm", data)["states"]), STATE_COLUMNS)
        what = "output states h_t" if n in (3, 7) else "internal states c_t"
        fig = figures.fig_states(states, "h" if n in (3, 7) else "c", f"Fig. {n}: LSTM {what}, {data}")
    elif n in (5, 9):
        data = "rows" if n == 5 else "strokes"
        p = paths(results, "lstm", data)
        hist, power = pd.read_csv(_need(p["weights"])), pd.read_csv(_need(p["power"]))
        power = power[(power["arch"] == "lstm") & (power["data"] == data)]
        fig = figures.fig_weights(hist, power, f"Fig. {n}: LSTM weights, {data}", PAPER[("lstm", data)]["power"])
    else:
        fig = figures.fig_lengths(pd.read_csv(_need(paths(results, "lstm", "strokes")["lengths"])))
    return figures.save(fig, out, f"fig{n}")


# --------------------------------------------------------------------------- comparison


def comparison_markdown(results: Path, preset_name: str = "") -> str:
    """``comparison.md``: the paper's numbers beside ours, from the results tables."""
    power_path = results / "weight-power.csv"
    power = pd.read_csv(power_path) if power_path.is_file() else None
    lines = [
        "# dni vs. the paper",
        "",
        "Generated by `dni compare` from the tables in this directory"
        + (f" (preset `{preset_name}`)" if preset_name else "") + ". Accuracies are means over the",
        "repeats with their 95% Student-t confidence interval in brackets; Δ is ours minus the paper's,",
        "in percentage points. Note that the paper reports single numbers without intervals.",
        "",
    ]
    for arch, data in CASES:
        p = paths(results, arch, data)["summary"]
        if not p.is_file():
            continue
        summary = pd.read_csv(p)
        n_test = ""
        res = paths(results, arch, data)["results"]
        if res.is_file():
            r = pd.read_csv(res, usecols=["n_test", "repeat"])
            n_test = f" — {int(r['n_test'].iloc[0]):,} test digits, {int(r['repeat'].max()) + 1} repeats per point"
        lines += [f"## {arch.upper() if arch == 'lstm' else 'Vanilla RNN'}, {data}{n_test}", "",
                  "| quantity | paper | dni | Δ (pp) |", "|---|---|---|---|"]
        rows = comparison_rows(summary, power, arch, data)
        for row in rows:
            delta = "" if row["delta_pp"] is None else f"{row['delta_pp']:+.2f}"
            lines.append(f"| {row['quantity']} | {row['paper']} | {row['ours']} | {delta} |")
        lines += ["", *[f"- {note}" for note in discussion(rows, summary)], ""]
    lines += [
        "## What the intervals do and do not cover",
        "",
        "The intervals are over the repeated noisy passes of one trained model per σ_train. They",
        "are zero-width at σ_val = 0, where inference is deterministic; the spread between",
        "training runs (initialisation, shuffling, training noise) is not in them. `dni sweep",
        "--seeds 3` measures it (`summary-seeds.csv`). The paper reports neither, and does not",
        "state its optimiser, learning rate, batch size, number of epochs or initialisation, so",
        "quantities that depend on training length, above all the weight power, are expected to",
        "differ; dni's recipe is in the README.",
        "",
    ]
    return "\n".join(lines) + "\n"


def discussion(rows: list[dict], summary: pd.DataFrame) -> list[str]:
    """Plain-language verdicts on the rows of a comparison table."""
    notes = []
    for row in rows:
        q, ours, d = row["quantity"], row["ours"], row["delta_pp"]
        if ours == "not run":
            notes.append(f"{q}: not run in this preset.")
        elif q.startswith("clean accuracy") and d is not None:
            verdict = "matches" if abs(d) < 0.3 else ("exceeds" if d > 0 else "falls short of")
            notes.append(f"Clean accuracy {verdict} the paper's ({d:+.2f} pp) with one training seed.")
        elif q.startswith("conventional model") and d is not None:
            how = "collapses as in the paper" if abs(d) < 5 else ("degrades less than in the paper" if d > 0 else "degrades more than in the paper")
            notes.append(f"At the largest σ_val the conventionally trained model {how} ({ours} vs {row['paper']}).")
        elif q.startswith("minimum over σ_val") and d is not None:
            met = d > 0
            notes.append(f"The paper's robustness claim ({row['paper']} at every σ_val) is {'met' if met else 'not met'}: "
                         f"our worst point is {ours} ({d:+.2f} pp from the bound).")
        elif q.startswith("weight power") and ours not in ("not run",):
            try:
                ratio = float(ours) / float(row["paper"])
                notes.append(f"{q}: ours is {ratio:.2f}x the paper's value.")
            except ValueError:
                pass
    conv = next((r for r in rows if r["quantity"].startswith("conventional model")), None)
    power0 = next((r for r in rows if r["quantity"].startswith("weight power E[w²] at σ_train = 0")), None)
    if conv and power0 and conv["delta_pp"] is not None and conv["delta_pp"] > 5 and power0["ours"] != "not run":
        ratio = float(power0["ours"]) / float(power0["paper"])
        if ratio > 1.2:
            notes.append(
                f"Likely cause of that gap: our conventionally trained model's weights carry {ratio:.1f}x the paper's power, so its "
                "pre-activations are larger and additive noise of a fixed σ perturbs them relatively less. How strongly a model "
                "trained without noise suffers therefore depends on the unreported training recipe; `dni plot-accuracy --x snr` "
                "compares models at equal signal-to-noise ratio instead.")
    return notes


# --------------------------------------------------------------------------- reproduce


def reproduce(
    preset: Preset,
    store: Store,
    results: Path,
    figures_dir: Path,
    executor,
    data_dir=None,
    device: str = "cpu",
    reporter=None,
    cases=CASES,
) -> dict:
    """Run ``preset`` end to end; everything it finds done in the store is reused.

    ``cases`` restricts it to some of the (arch, data) cases (e.g. to finish them while
    another is still running); figures whose tables are missing are then skipped.
    """
    reporter = reporter or SilentReporter()
    from dni.train import cpu_name, git_commit

    results.mkdir(parents=True, exist_ok=True)
    info = {"preset": preset.name, "train_rng": preset.train_rng, "rng": preset.eval.rng, "cases": [f"{a}-{d}" for a, d in cases],
            "dni_version": dni.__version__, "git_commit": git_commit(), "cpu": cpu_name(),
            "mkl_path": mkl_path.describe(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "executor": executor.describe()}
    with Sitting(results, info) as sitting:
        figures = _reproduce_stages(preset, store, results, figures_dir, executor, data_dir, device, reporter, cases, sitting)
    provenance = {
        **{k: info[k] for k in ("preset", "train_rng", "rng", "cases")},
        "description": preset.description,
        **{k: info[k] for k in ("dni_version", "git_commit")},
        "torch_version": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu": info["cpu"],
        "mkl_path": info["mkl_path"],
        "cpu_capability": info["cpu_capability"],
        "executor": info["executor"],
        "this_run_seconds": sitting.seconds,
        "stages_seconds": sitting.record["stages_seconds"],
        "training_seconds_total": _training_seconds(store, preset),
        # Sittings of this protocol only (records from before the evaluation's stream was kept drew from philox).
        **summary([r for r in read_sittings(results, preset=preset.name, train_rng=preset.train_rng)
                   if r.get("rng", "philox") == preset.eval.rng]),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (results / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return {"figures": figures, "provenance": provenance}


def _reproduce_stages(preset, store, results, figures_dir, executor, data_dir, device, reporter, cases, sitting) -> list:
    """The stages of :func:`reproduce`, each recorded in ``sitting``; the figure files drawn."""
    power_frames = []
    for sweep in preset.sweeps(cases):
        arch, data = sweep.base.arch, sweep.base.data
        p = paths(results, arch, data)
        t = time.perf_counter()
        report = run_sweep(store, sweep, executor, reporter)
        folder = store.root / "sweeps" / report.sweep_id
        for key, name in (("results", "results.csv"), ("summary", "summary.csv")):
            write_csv(p[key], pd.read_csv(folder / name))
        sitting.stage(f"sweep {arch} {data}", time.perf_counter() - t)
        if arch == "lstm":
            t = time.perf_counter()
            frames = []
            for st, sv in STATE_PAIRS:
                mid = dataclasses.replace(sweep.base, sigma_train=st, seed=0).model_id
                frames.append(record_states(store, mid, sweep.eval, sv, data_dir, device))
            write_csv(p["states"], pd.concat(frames, ignore_index=True))
            sitting.stage(f"states {arch} {data}", time.perf_counter() - t)
        hist, power = weight_tables(store, sweep.model_ids())
        if arch == "lstm":
            write_csv(p["weights"], hist)
        power_frames.append(power)
    power_path = results / "weight-power.csv"
    if power_path.is_file():  # keep the powers of cases not rerun now
        done = {(s.base.arch, s.base.data) for s in preset.sweeps(cases)}
        old = pd.read_csv(power_path)
        power_frames.insert(0, old[[(a, d) not in done for a, d in zip(old["arch"], old["data"])]])
    write_csv(power_path, pd.concat(power_frames, ignore_index=True))
    write_csv(paths(results, "lstm", "strokes")["lengths"], stroke_length_table(stroke_lengths("train", data_dir)))
    t = time.perf_counter()
    figures, skipped = [], []
    for n in FIGURES:
        if all(p.is_file() for p in figure_inputs(n, results)) or (n == 2 and any(p.is_file() for p in figure_inputs(n, results))):
            figures += draw_figure(n, results, figures_dir)
        else:
            skipped.append(n)
    if skipped:
        reporter.log(f"figures {', '.join(map(str, skipped))} skipped: their cases have not been run yet")
    sitting.stage("figures", time.perf_counter() - t)
    (results / "comparison.md").write_text(comparison_markdown(results, preset.name))
    return figures


def _training_seconds(store: Store, preset: Preset) -> float:
    total = 0.0
    for sweep in preset.sweeps():
        for mid in sweep.model_ids():
            if store.has_model(mid):
                total += float(store.read_meta(mid).get("wall_time_s", 0.0))
    return total
