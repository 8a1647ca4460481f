import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch

from dni import mkl_path
from dni.evaluate import summarize
from dni.executors import LocalExecutor
from dni.figdata import accuracy_curves, comparison_rows, reference_accuracy, state_densities, stroke_length_table, weight_tables
from dni.paper import FIGURES, Preset, comparison_markdown, draw_figure, reproduce
from dni.spec import EvalSpec
from dni.store import Store
from dni.train import cpu_name


def _summary():
    rows = []
    rng = np.random.default_rng(0)
    for st in (0.0, 1.0):
        for sv in (0.0, 0.5, 1.0):
            base = 0.98 - (0.8 * sv if st == 0 else 0.01 * sv)
            for r in range(4):
                rows.append({"model_id": f"m{st}", "arch": "lstm", "data": "rows", "noise_train": "additive", "sigma_train": st,
                             "seed": 0, "noise_val": "additive", "sigma_val": sv, "repeat": r,
                             "accuracy": base + (0 if sv == 0 else rng.normal(0, 0.002))})
    return summarize(pd.DataFrame(rows))


def test_accuracy_curves_and_reference_line():
    curves = accuracy_curves(_summary(), "lstm", "rows")
    assert len(curves) == 6
    assert reference_accuracy(curves) == pytest.approx(0.98)
    np.testing.assert_allclose(curves["error"], 1 - curves["mean"])
    assert (curves["error_low"] <= curves["error"] + 1e-12).all()
    with pytest.raises(ValueError):
        accuracy_curves(_summary(), "rnn", "rows")


def test_comparison_rows_report_the_paper_quantities():
    rows = {r["quantity"]: r for r in comparison_rows(_summary(), None, "lstm", "rows")}
    clean = rows["clean accuracy (σ_train = 0, σ_val = 0)"]
    assert clean["paper"] == "98.7%" and clean["delta_pp"] == pytest.approx(-0.7)
    robust = next(r for q, r in rows.items() if q.startswith("minimum over σ_val of σ_train = 1"))
    assert robust["delta_pp"] == pytest.approx(100 * (0.97 - 0.98), abs=0.6)


def test_state_densities_integrate_to_one():
    edges = np.linspace(-1, 1, 11)
    rows = [("m", "lstm", "rows", 0.0, 0.0, "h", t, edges[k], edges[k + 1], k + t) for t in (1, 2) for k in range(10)]
    df = pd.DataFrame(rows, columns=["model_id", "arch", "data", "sigma_train", "sigma_val", "state", "step", "bin_left", "bin_right", "count"])
    dens = state_densities(df, "h", 0.0, 0.0)
    for _, d in dens.groupby("step"):
        assert (d["density"] * 0.2).sum() == pytest.approx(1.0)


def test_weight_power_is_the_mean_squared_weight(tmp_path):
    import torch

    from dni.models import build_model
    from dni.spec import TrainSpec

    store = Store(tmp_path)
    spec = TrainSpec(arch="rnn")
    model = build_model("rnn", 28)
    store.save_model(spec, model, {})
    hist, power = weight_tables(store, [spec.model_id])
    w = torch.cat([p.detach().flatten() for p in model.parameters()]).double()
    assert power["power"].iloc[0] == pytest.approx(float((w**2).mean()))
    assert power["n_weights"].iloc[0] == 21386 and hist["count"].sum() == 21386


def test_stroke_length_table():
    t = stroke_length_table(np.array([13, 13, 40, 117]))
    assert t.to_dict("list") == {"length": [13, 40, 117], "count": [2, 1, 1]}


def test_reproduce_end_to_end_on_the_fixture(tmp_path, fixture_data):
    preset = Preset("tiny", (0.0, 1.0), EvalSpec(sigma_val=(0.0, 1.0), repeats=2, limit_test=50, batch_size=25),
                    limit_train=100, val_size=20, epochs=1)
    results, figures = tmp_path / "results", tmp_path / "figures"
    out = reproduce(preset, Store(tmp_path / "store"), results, figures, LocalExecutor(jobs=1))
    assert sorted(p.name for p in figures.iterdir()) == sorted(f"fig{n}.{e}" for n in FIGURES for e in ("png", "pdf"))
    for f in figures.iterdir():
        assert f.stat().st_size > 5000
    text = (results / "comparison.md").read_text()
    assert "| clean accuracy (σ_train = 0, σ_val = 0) | 98.7% |" in text and "Vanilla RNN, rows" in text
    assert out["provenance"]["preset"] == "tiny"
    states = pd.read_csv(results / "states-lstm-rows.csv")
    assert set(states["step"]) == set(range(1, 29)) and set(states["state"]) == {"h", "c"}
    assert comparison_markdown(results) == text.replace(" (preset `tiny`)", "")
    # figures are redrawn from the tables alone, without the store
    (tmp_path / "store").rename(tmp_path / "gone")
    assert draw_figure(2, results, tmp_path / "again")[0].is_file()


def test_reproduce_some_cases_skips_the_figures_of_the_others(tmp_path, fixture_data):
    preset = Preset("tiny", (0.0, 1.0), EvalSpec(sigma_val=(0.0, 1.0), repeats=2, limit_test=50, batch_size=25),
                    limit_train=100, val_size=20, epochs=1)
    results, figures = tmp_path / "results", tmp_path / "figures"
    reproduce(preset, Store(tmp_path / "store"), results, figures, LocalExecutor(jobs=1), cases=(("rnn", "rows"),))
    assert sorted(p.stem for p in figures.glob("*.png")) == ["fig10", "fig6"]
    assert "Vanilla RNN, rows" in (results / "comparison.md").read_text()
    out = reproduce(preset, Store(tmp_path / "store"), results, figures, LocalExecutor(jobs=1), cases=(("lstm", "rows"),))
    assert sorted(p.stem for p in figures.glob("*.png")) == ["fig10", "fig2", "fig3", "fig4", "fig5", "fig6"]
    # the wall time of a reproduction run in sittings is their sum, each recorded
    prov = out["provenance"]
    assert prov["cpu"] == cpu_name() and prov["sittings_cpus"] == [cpu_name()]
    assert prov["mkl_path"] == mkl_path.describe() == prov["sittings_detail"][0]["mkl_path"]
    assert prov["cpu_capability"] == torch.backends.cpu.get_cpu_capability() == prov["sittings_detail"][0]["cpu_capability"]
    assert prov["sittings"] == 2 and [s["finished"] for s in prov["sittings_detail"]] == [True, True]
    assert list(prov["sittings_detail"][0]["stages_seconds"]) == ["sweep rnn rows", "figures"]
    assert prov["all_sittings_seconds"] == pytest.approx(sum(s["seconds"] for s in prov["sittings_detail"]))
    assert prov["all_sittings_seconds"] > prov["this_run_seconds"] > 0
    power = pd.read_csv(results / "weight-power.csv")
    assert set(power["arch"] + "-" + power["data"]) == {"rnn-rows", "lstm-rows"}
    # the same protocol evaluated with the ARS stream: the same models, other noise draws; its
    # provenance counts its own sitting only
    philox = pd.read_csv(results / "rnn-rows.csv")
    ars = dataclasses.replace(preset, eval=dataclasses.replace(preset.eval, rng="ars"))
    prov = reproduce(ars, Store(tmp_path / "store"), results, figures, LocalExecutor(jobs=1), cases=(("rnn", "rows"),))["provenance"]
    assert prov["rng"] == "ars" and prov["sittings"] == 1 and prov["all_sittings_seconds"] == pytest.approx(prov["this_run_seconds"], rel=0.1)
    other = pd.read_csv(results / "rnn-rows.csv")
    assert list(other["model_id"]) == list(philox["model_id"])
    noisy = other["sigma_val"] > 0
    assert (other.loc[~noisy, "correct"].values == philox.loc[~noisy, "correct"].values).all()
    assert (other.loc[noisy, "correct"].values != philox.loc[noisy, "correct"].values).any()
