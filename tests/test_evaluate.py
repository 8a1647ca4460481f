import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from dni.evaluate import RESULT_COLUMNS, collect, evaluate, run_cells, summarize
from dni.data import load_dataset
from dni.models import build_model
from dni.spec import EvalSpec, TrainSpec
from dni.store import Store


@pytest.fixture
def store_with_model(tmp_path, fixture_data):
    store = Store(tmp_path / "store")
    spec = TrainSpec(limit_train=100, val_size=10, epochs=1)
    torch.manual_seed(0)
    model = build_model("lstm", 28)
    store.save_model(spec, model, {})
    return store, spec.model_id


def test_results_are_tidy_and_deterministic(store_with_model, tmp_path):
    store, mid = store_with_model
    ev = EvalSpec(sigma_val=(0.0, 0.5, 1.0), repeats=3, batch_size=64)
    a = evaluate(store, [mid], ev)
    assert list(a.columns) == RESULT_COLUMNS and len(a) == 9
    assert (a.loc[a.sigma_val == 0.0, "accuracy"].nunique()) == 1  # no noise: repeats agree
    assert a.loc[a.sigma_val == 1.0, "accuracy"].nunique() > 1
    # a fresh store gives identical numbers
    fresh = Store(tmp_path / "fresh")
    fresh.save_model(store.read_spec(mid), store.load_model(mid).model, {})
    b = evaluate(fresh, [mid], ev)
    pd.testing.assert_frame_equal(a, b)


def test_cells_do_not_depend_on_what_was_computed_before(store_with_model):
    store, mid = store_with_model
    partial = evaluate(store, [mid], EvalSpec(sigma_val=(1.0,), repeats=2, batch_size=64))
    full = evaluate(store, [mid], EvalSpec(sigma_val=(0.5, 1.0), repeats=4, batch_size=64))
    again = run_cells(store.load_model(mid).model, mid, load_dataset("rows", "test"), [(1.0, 3), (1.0, 0)],
                      EvalSpec(batch_size=64), torch.device("cpu"))
    one = full[(full.sigma_val == 1.0)].set_index("repeat")["correct"]
    assert again == [one[3], one[0]]
    pd.testing.assert_frame_equal(partial, full[full.sigma_val == 1.0].head(2).reset_index(drop=True))


def test_the_noise_free_pass_runs_once_per_batch(store_with_model, monkeypatch):
    """Every sigma_val = 0 cell is the same noise-free pass: it is computed once per test
    batch and counted for each of them, with the counts of computing each cell alone."""
    store, mid = store_with_model
    model, test = store.load_model(mid).model, load_dataset("rows", "test")
    ev = EvalSpec(batch_size=250)
    cells = [(0.0, 0), (0.5, 0), (0.0, 1), (0.0, 2), (0.5, 1)]
    alone = [run_cells(model, mid, test, [cell], ev, torch.device("cpu"))[0] for cell in cells]
    passes = []
    real = type(model).recur
    monkeypatch.setattr(type(model), "recur", lambda self, *a, **k: passes.append(a[1].sigma) or real(self, *a, **k))
    together = run_cells(model, mid, test, cells, ev, torch.device("cpu"))
    assert together == alone
    batches = -(-len(test) // 250)
    assert sorted(passes) == [0.0] * batches + [0.5] * (2 * batches)


def test_stored_cells_are_reused(store_with_model, monkeypatch):
    store, mid = store_with_model
    ev = EvalSpec(sigma_val=(0.2,), repeats=2, batch_size=64)
    first = evaluate(store, [mid], ev)
    import dni.evaluate

    monkeypatch.setattr(dni.evaluate, "run_cells", lambda *a, **k: pytest.fail("recomputed a stored cell"))
    pd.testing.assert_frame_equal(first, evaluate(store, [mid], ev))


def test_summary_confidence_interval():
    acc = [0.90, 0.92, 0.91, 0.95]
    df = pd.DataFrame({k: ["m"] * 4 for k in ("model_id", "arch", "data", "noise_train", "noise_val")})
    df["sigma_train"], df["seed"], df["sigma_val"], df["accuracy"] = 0.0, 0, 0.5, acc
    s = summarize(df).iloc[0]
    half = stats.t.ppf(0.975, 3) * np.std(acc, ddof=1) / 2
    assert s["n"] == 4 and s["mean"] == pytest.approx(np.mean(acc))
    assert s["ci_low"] == pytest.approx(np.mean(acc) - half) and s["ci_high"] == pytest.approx(np.mean(acc) + half)


def test_collect_reports_missing_cells(store_with_model):
    store, mid = store_with_model
    from dni.errors import StoreError

    with pytest.raises(StoreError, match="missing"):
        collect(store, [mid], EvalSpec(sigma_val=(0.0,), repeats=1))


def test_weight_noise_is_redrawn_per_repeat_and_reproducible(store_with_model):
    store, mid = store_with_model
    ev = EvalSpec(sigma_val=(0.0,), repeats=3, batch_size=64, weight_noise=0.3, weight_noise_mode="relative")
    a = evaluate(store, [mid], ev)
    assert a["accuracy"].nunique() > 1  # no activation noise, yet repeats differ
    assert (a["weight_noise"] == 0.3).all() and (a["weight_noise_mode"] == "relative").all()
    clean = evaluate(store, [mid], EvalSpec(sigma_val=(0.0,), repeats=1, batch_size=64))
    assert "weight_noise" not in clean.columns
    b = run_cells(store.load_model(mid).model, mid, load_dataset("rows", "test"), [(0.0, 1)], ev, torch.device("cpu"))
    assert b == [a.loc[a.repeat == 1, "correct"].item()]
    # the model in the store is untouched
    assert evaluate(store, [mid], EvalSpec(sigma_val=(0.0,), repeats=1, batch_size=64)).equals(clean)


@pytest.mark.parametrize("kind", ["multiplicative", "mixed:0.5", "relative"])
def test_other_inference_noise_models(store_with_model, kind):
    store, mid = store_with_model
    df = evaluate(store, [mid], EvalSpec(sigma_val=(0.0, 1.0), repeats=2, batch_size=64, noise=kind))
    assert (df["noise_val"] == kind).all() and len(df) == 4


@pytest.mark.parametrize("arch,data", [("lstm", "rows"), ("lstm", "strokes"), ("rnn", "rows")])
def test_on_a_gpu_the_repeats_of_a_point_run_as_one_pass_with_each_cells_counts(monkeypatch, fixture_data, arch, data):
    """On a GPU the noisy passes of a batch with one noise model run together (one batched
    pass per up to REPEATS_SAMPLES samples) and give each cell the counts of its own pass.
    Here: the CPU's torch implementation with the GPU's way switched on; groups of two."""
    from dni import kernels
    from dni.models import NoisyRecurrent
    from dni.noise import PhiloxGenerator

    monkeypatch.setattr(kernels, "library", lambda: None)
    torch.manual_seed(0)
    test = load_dataset(data, "test", limit=300)
    model = build_model(arch, test.inputs)
    ev = EvalSpec(batch_size=100)
    cells = [(0.5, 0), (1.0, 0), (0.0, 0), (0.5, 1), (0.5, 2), (1.0, 1)]
    one_by_one = run_cells(model, "m", test, cells, ev, torch.device("cpu"))
    monkeypatch.setattr(PhiloxGenerator, "draws_ahead_on", staticmethod(lambda device: True))
    per_sample = test.x.shape[1] * 100 * model.weight.shape[0] + 100 * 10
    monkeypatch.setattr(NoisyRecurrent, "REPEATS_SAMPLES", 2 * per_sample)
    batched = []
    real = NoisyRecurrent.recur_repeats
    monkeypatch.setattr(NoisyRecurrent, "recur_repeats", lambda self, xp, noise, gens: (batched.append((noise.sigma, len(gens))), real(self, xp, noise, gens))[1])
    assert run_cells(model, "m", test, cells, ev, torch.device("cpu")) == one_by_one
    batches = -(-len(test) // 100)
    assert batches >= 2 and batched == [(0.5, 2), (0.5, 1), (1.0, 2)] * batches  # per test batch: sigma 0.5 in two parts, 1.0 in one
