import os
import re
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import pandas as pd
import pytest

from dni.executors import LocalExecutor
from dni.jobs import train_job
from dni.spec import EvalSpec, TrainSpec
from dni.store import Store
from dni.sweep import SweepSpec, plan, run_sweep
from tests.helpers import CLI_SWEEP, leftovers, run_dni

BASE = TrainSpec(arch="rnn", data="rows", epochs=1, limit_train=120, val_size=20, batch_size=32)
EV = EvalSpec(sigma_val=(0.0, 0.5, 1.0), repeats=2, limit_test=60, batch_size=32)
SWEEP = SweepSpec(BASE, (0.0, 1.0), (0,), EV)


def test_plan_lists_only_missing_work(tmp_path, fixture_data):
    store = Store(tmp_path)
    p = plan(store, SWEEP)
    assert len(p.train) == 2 and p.cells_missing == p.cells_total == 12 and len(p.evaluate) == 6
    train_job(tmp_path, SWEEP.train_specs()[0])
    from dni.evaluate import evaluate_point

    evaluate_point(store, SWEEP.model_ids()[0], EV, 0.5)
    p = plan(store, SWEEP)
    assert [s.sigma_train for s in p.train] == [1.0] and p.cells_missing == 10 and len(p.evaluate) == 5


def test_sweep_is_idempotent_and_seeds_give_both_spreads(tmp_path, fixture_data):
    store = Store(tmp_path)
    sweep = SweepSpec(BASE, (0.0,), (0, 1), EV)
    first = run_sweep(store, sweep, LocalExecutor(jobs=1))
    assert first.trained == 2 and first.cells == 12 and not first.already_done
    second = run_sweep(store, sweep, LocalExecutor(jobs=1))
    assert second.already_done and second.trained == 0 and second.cells == 0
    seeds = pd.read_csv(tmp_path / "sweeps" / sweep.sweep_id / "summary-seeds.csv")
    assert {"std_seeds", "std_noise", "seeds"} <= set(seeds.columns) and (seeds["seeds"] == 2).all()


def test_process_pool_gives_the_same_results_as_in_process(tmp_path, real_data):
    # Worker processes see the published checksums, so this test needs the real files.
    a, b = Store(tmp_path / "a"), Store(tmp_path / "b")
    run_sweep(a, SWEEP, LocalExecutor(jobs=1))
    run_sweep(b, SWEEP, LocalExecutor(jobs=2, data_dir=str(real_data)))
    ra = pd.read_csv(a.root / "sweeps" / SWEEP.sweep_id / "results.csv")
    rb = pd.read_csv(b.root / "sweeps" / SWEEP.sweep_id / "results.csv")
    pd.testing.assert_frame_equal(ra, rb)


def _train_concurrently(root, data_dir):
    os.environ["DNI_DATA_DIR"] = str(data_dir)
    import dni.data
    import json
    import dataclasses

    md5 = json.loads((Path(data_dir) / "md5.json").read_text())
    dni.data.SOURCES = {k: {n: dataclasses.replace(s, md5=md5[s.relpath]) for n, s in v.items()} for k, v in dni.data.SOURCES.items()}
    return train_job(root, BASE).trained


def test_two_processes_never_train_the_same_model_twice(tmp_path, fixture_data):
    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as pool:
        trained = list(pool.map(_train_concurrently, [tmp_path] * 2, [fixture_data] * 2))
    assert sorted(trained) == [False, True]
    assert Store(tmp_path).model_ids() == [BASE.model_id]


# ------------------------------------------------------------------ crash and resume (subprocesses)


# The tiny sweep makes 17 atomic writes, in this order: sweep.json (1); weights, spec and
# meta of each model (2-4, 5-7: checkpoint writes); the evaluation CSV after each of the 6
# (model, sigma_val) points (8-13: CSV writes); the results and summary CSVs in the store
# and at --out (14-17). Each is killed half-written (mid-write) or complete but not yet
# renamed (before-rename).
KILL_POINTS = ["mid-write:1", "before-rename:2", "mid-write:3", "mid-write:4", "before-rename:6", "mid-write:7",
               "mid-write:8", "before-rename:10", "mid-write:13", "before-rename:14", "mid-write:16", "before-rename:17"]


@pytest.mark.parametrize("kill", KILL_POINTS)
def test_sigkill_at_any_write_then_resume_gives_identical_results(kill, reference_csv, tmp_path, real_data):
    store, out = tmp_path / "store", tmp_path / "results.csv"
    crashed = run_dni([*CLI_SWEEP, "--store", store, "--out", out, "--jobs", "1"], {"DNI_FAULT_KILL": kill}, real_data)
    assert crashed.returncode == -9, f"the fault point {kill} was never reached: {crashed.stderr[-500:]}"
    for command in (["status", "--store", store], ["list", "--store", store]):
        assert run_dni(command).returncode == 0, f"store unreadable after a kill at {kill}"
    resumed = run_dni([*CLI_SWEEP, "--store", store, "--out", out, "--jobs", "1"], data=real_data)
    assert resumed.returncode == 0, resumed.stderr
    assert out.read_bytes() == reference_csv.read_bytes()
    assert leftovers(store) == []


def test_two_sweeps_at_once_on_one_store(reference_csv, tmp_path, real_data):
    """Started together, they share the work: every model is trained once, every result is
    the uninterrupted run's, and both finish."""
    store = tmp_path / "store"
    env = {**os.environ, "DNI_DATA_DIR": str(real_data)}
    procs = [subprocess.Popen([sys.executable, "-m", "dni", *map(str, CLI_SWEEP), "--store", str(store), "--out", str(tmp_path / f"{k}.csv"), "--jobs", "1"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in (1, 2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-500:] for o in outs]
    trained = sum(int(re.search(r"trained (\d+) model", o[0]).group(1)) if "trained" in o[0] else 0 for o in outs)
    assert trained == 2
    for k in (1, 2):
        assert (tmp_path / f"{k}.csv").read_bytes() == reference_csv.read_bytes()


def test_sweep_ids_are_stable_across_versions():
    from dni.paper import PRESETS

    assert [s.sweep_id for s in PRESETS["paper"].sweeps()] == ["lstm-rows-d379472a0f", "lstm-strokes-510efb7957", "rnn-rows-0e433739db"]


def test_a_preset_with_philox_training_noise_is_a_different_set_of_models():
    import dataclasses

    from dni.paper import PRESETS

    default, philox = PRESETS["paper"], dataclasses.replace(PRESETS["paper"], train_rng="philox")
    for a, b in zip(default.sweeps(), philox.sweeps()):
        assert b.base.rng == "philox" and a.base.rng == "torch"
        assert a.sweep_id != b.sweep_id and not set(a.model_ids()) & set(b.model_ids())


def test_a_sweep_registered_twice_is_listed_once(tmp_path):
    import json

    from dni.sweep import register, registered

    store = Store(tmp_path)
    register(store, SWEEP)
    d = SWEEP.to_dict()
    d["base"].pop("sites")  # as an older dni wrote it
    other = tmp_path / "sweeps" / "rnn-rows-older" / "sweep.json"
    other.parent.mkdir(parents=True)
    other.write_text(json.dumps(d))
    assert [s.sweep_id for s in registered(store)] == [SWEEP.sweep_id]


def test_settings_name_what_differs_from_the_defaults():
    plain = SweepSpec(TrainSpec(arch="rnn"), (0.0, 0.5), (0,), EvalSpec())
    assert plain.settings() == "defaults"
    other = SweepSpec(TrainSpec(arch="rnn", rng="philox", val_size=20), (0.0,), (0, 1), EvalSpec(repeats=3, precision="bf16", weight_noise=0.05))
    assert other.settings() == "train.val_size=20 train.rng=philox eval.repeats=3 eval.weight_noise=0.05 eval.precision=bf16"
