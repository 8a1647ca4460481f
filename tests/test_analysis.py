import numpy as np
import pandas as pd
import pytest
import torch

from dni.analysis import area_under_curve, midpoint_sigma, robustness, vote
from dni.data import load_dataset
from dni.errors import SpecError
from dni.models import build_model
from dni.spec import EvalSpec


def test_midpoint_and_auc():
    s = np.array([0.0, 0.5, 1.0])
    # clean 0.9, chance 0.1 -> level 0.5, crossed halfway between 0.5 (0.7) and 1.0 (0.3)
    assert midpoint_sigma(s, np.array([0.9, 0.7, 0.3])) == pytest.approx(0.75)
    assert np.isnan(midpoint_sigma(s, np.array([0.9, 0.9, 0.8])))
    assert area_under_curve(s, np.array([1.0, 1.0, 1.0])) == pytest.approx(1.0)
    assert area_under_curve(s, np.array([1.0, 0.0, 0.0])) == pytest.approx(0.25)


def test_robustness_table_with_bootstrap_intervals():
    rows = []
    rng = np.random.default_rng(0)
    for st, drop in ((0.0, 0.8), (1.0, 0.1)):
        for sv in (0.0, 0.5, 1.0):
            for r in range(10):
                rows.append({"model_id": f"m{st}", "arch": "lstm", "data": "rows", "noise_train": "additive", "sigma_train": st,
                             "seed": 0, "noise_val": "additive", "sigma_val": sv, "repeat": r,
                             "accuracy": 0.95 - drop * sv + rng.normal(0, 0.005) * (sv > 0)})
    t = robustness(pd.DataFrame(rows), n_boot=200).set_index("sigma_train")
    assert t.loc[0.0, "midpoint_sigma"] == pytest.approx(0.5 * (0.95 - 0.525) / 0.4, abs=0.02)
    assert np.isnan(t.loc[1.0, "midpoint_sigma"])
    assert t.loc[0.0, "auc_ci_low"] <= t.loc[0.0, "auc"] <= t.loc[0.0, "auc_ci_high"]
    assert t.loc[1.0, "auc"] > t.loc[0.0, "auc"]


def test_vote(fixture_data):
    torch.manual_seed(0)
    model = build_model("lstm", 28)
    test = load_dataset("rows", "test", limit=60)
    clean = vote(model, "m", test, EvalSpec(sigma_val=(0.0,), repeats=1), [1, 3], "majority")
    assert clean["accuracy"].nunique() == 1  # no noise: every pass agrees
    noisy = vote(model, "m", test, EvalSpec(sigma_val=(2.0,), repeats=2), [1, 5], "mean")
    assert set(noisy["k"]) == {1, 5} and len(noisy) == 4
    again = vote(model, "m", test, EvalSpec(sigma_val=(2.0,), repeats=2), [1, 5], "mean")
    pd.testing.assert_frame_equal(noisy, again)
    with pytest.raises(SpecError):
        vote(model, "m", test, EvalSpec(sigma_val=(0.0,), repeats=1), [1], "median")


def test_robustness_and_vote_cli(tmp_path, fixture_data):
    from typer.testing import CliRunner

    from dni.cli import app

    r = CliRunner()
    store = tmp_path / "store"
    assert r.invoke(app, ["train", "--arch", "rnn", "--store", str(store), "--limit-train", "120", "--val-size", "20", "--epochs", "1"]).exit_code == 0
    res = r.invoke(app, ["evaluate", "--store", str(store), "--sigma-val", "0,0.5,1", "--repeats", "3", "--limit-test", "50", "--out", str(tmp_path / "r.csv")])
    assert res.exit_code == 0, res.output
    res = r.invoke(app, ["robustness", "--results", str(tmp_path / "r.csv"), "--out", str(tmp_path / "rob.csv"), "--plot", str(tmp_path / "rob.png"), "--n-boot", "50"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "rob.png").stat().st_size > 5000 and len(pd.read_csv(tmp_path / "rob.csv")) == 1
    res = r.invoke(app, ["vote", "--store", str(store), "--model", "rnn", "--k", "1,3", "--repeats", "2", "--limit-test", "40",
                         "--out", str(tmp_path / "v.csv"), "--plot", str(tmp_path / "v.png")])
    assert res.exit_code == 0, res.output
    assert len(pd.read_csv(tmp_path / "v.csv")) == 2 * 2 * 2
    bad = r.invoke(app, ["vote", "--store", str(store), "--model", "rnn", "--k", "0"])
    assert bad.exit_code == 1 and "between 1 and 999" in bad.output


def test_walk_reports_every_site(tmp_path, fixture_data):
    from dni.analysis import walk
    from dni.spec import TrainSpec
    from dni.store import Store

    store = Store(tmp_path)
    torch.manual_seed(0)
    store.save_model(TrainSpec(arch="gru"), build_model("gru", 28), {})
    table = walk(store, TrainSpec(arch="gru").model_id, EvalSpec(sigma_val=(1.0,), repeats=2, limit_test=40, batch_size=20))
    assert list(table["sites"]) == ["none", "r", "u", "nx", "nh", "out", "all"]
    assert table.loc[table["sites"] == "none", "drop"].item() == 0.0
    again = walk(store, TrainSpec(arch="gru").model_id, EvalSpec(sigma_val=(1.0,), repeats=2, limit_test=40, batch_size=20))
    pd.testing.assert_frame_equal(table, again)  # stored cells, same numbers


def test_snr_formulas_and_power_meter(fixture_data):
    import math

    from dni.analysis import PowerMeter, signal_power, snr_db

    assert snr_db("additive", 0.5, 1.0) == pytest.approx(10 * math.log10(4))
    assert snr_db("relative", 0.1, 123.0) == pytest.approx(20.0)
    assert snr_db("multiplicative", 1.0, 5.0) == pytest.approx(0.0)
    assert snr_db("mixed:0.5", 1.0, 1.0) == pytest.approx(10 * math.log10(1 / 0.5))
    assert snr_db("additive", 0.0, 1.0) == math.inf
    meter = PowerMeter()
    meter(torch.full((2, 3), 2.0), None)
    assert meter.power == pytest.approx(4.0)
    torch.manual_seed(0)
    model = build_model("lstm", 28)
    test = load_dataset("rows", "test", limit=30)
    assert signal_power(model, test) > 0


def test_accuracy_plot_against_snr(tmp_path, fixture_data):
    from typer.testing import CliRunner

    from dni.cli import app

    r = CliRunner()
    store = tmp_path / "store"
    for s in ("0", "1"):
        assert r.invoke(app, ["train", "--arch", "rnn", "--sigma-train", s, "--store", str(store), "--limit-train", "120", "--val-size", "20", "--epochs", "1"]).exit_code == 0
    assert r.invoke(app, ["evaluate", "--store", str(store), "--sigma-val", "0,0.5,1", "--repeats", "2", "--limit-test", "40", "--out", str(tmp_path / "r.csv")]).exit_code == 0
    res = r.invoke(app, ["plot-accuracy", "--arch", "rnn", "--summary", str(tmp_path / "r-summary.csv"), "--store", str(store), "--x", "snr", "--out", str(tmp_path / "snr.png")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "snr.png").stat().st_size > 5000
    assert len(list(store.rglob("signal-power-*.json"))) == 2  # cached per model
