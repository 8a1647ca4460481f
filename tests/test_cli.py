import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from dni import mkl_path
from dni.cli import app
from dni.store import Store
from dni.train import cpu_name

runner = CliRunner()
TINY = ["--limit-train", "120", "--val-size", "20", "--epochs", "1", "--batch-size", "32", "--device", "cpu"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _snapshot(root):
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.suffix != ".lock"}


@pytest.fixture
def trained(tmp_path, fixture_data):
    store = tmp_path / "store"
    res = run("train", "--arch", "lstm", "--data", "rows", "--sigma-train", "0.5", "--store", store, *TINY)
    assert res.exit_code == 0, res.output
    return store


@pytest.mark.parametrize("arch,data,count", [("lstm", "rows", 81674), ("lstm", "strokes", 68362), ("rnn", "rows", 21386)])
def test_describe_prints_the_paper_tables(arch, data, count):
    res = run("describe", "--arch", arch, "--data", data)
    assert res.exit_code == 0 and str(count) in res.output


def test_results_record_the_cpu_they_were_computed_on(tmp_path):
    """Bits can depend on the CPU (the BLAS picks its kernels by it): meta.json, the
    reproduction's provenance and dni bench name it (the first processor of /proc/cpuinfo)."""
    amd = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\n\n"
    (tmp_path / "amd").write_text(amd + amd.replace(": 0", ": 1").replace("EPYC", "other"))
    assert cpu_name(tmp_path / "amd") == "AuthenticAMD AMD EPYC (family 25, model 17)"
    (tmp_path / "arm").write_text("processor\t: 0\nBogoMIPS\t: 50.00\nCPU implementer\t: 0x41\n")
    assert cpu_name(tmp_path / "arm") == cpu_name(tmp_path / "missing") != ""


def test_train_evaluate_list_export(trained, tmp_path):
    store = trained
    (mid,) = Store(store).model_ids()
    assert mid.startswith("lstm-rows-st0.5-s0-")
    meta = Store(store).read_meta(mid)
    for key in ("dni_version", "torch_version", "history", "wall_time_s", "test_accuracy_clean", "git_commit", "cpu"):
        assert key in meta
    assert meta["cpu"] == cpu_name() and meta["cpu"] and meta["mkl_path"] == mkl_path.describe()
    assert meta["cpu_capability"] == torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512", "DEFAULT", "SVE256", "VSX", "ZVECTOR")
    again = run("train", "--arch", "lstm", "--data", "rows", "--sigma-train", "0.5", "--store", store, *TINY)
    assert again.exit_code == 0 and "already trained" in again.output

    out = tmp_path / "results.csv"
    res = run("evaluate", "--store", store, "--sigma-val", "0,0.5,1", "--repeats", "3", "--limit-test", "50", "--out", out)
    assert res.exit_code == 0, res.output
    df = pd.read_csv(out)
    assert len(df) == 9
    for col in ("arch", "data", "sigma_train", "sigma_val", "repeat", "accuracy", "model_id", "seed"):
        assert col in df.columns
    summary = pd.read_csv(tmp_path / "results-summary.csv")
    assert {"mean", "std", "ci_low", "ci_high", "n"} <= set(summary.columns) and len(summary) == 3

    out2 = tmp_path / "again.csv"
    assert run("evaluate", "--store", store, "--sigma-val", "0:1:0.5", "--repeats", "3", "--limit-test", "50", "--out", out2).exit_code == 0
    assert out.read_bytes() == out2.read_bytes()

    assert mid in run("list", "--store", store).output
    npz = tmp_path / "w.npz"
    assert run("export", mid[:14], "--store", store, "--out", npz).exit_code == 0
    with np.load(npz) as z:
        assert z["weight_x"].shape == (512, 28) and z["weight_h"].shape == (512, 128)
        assert z["bias"].shape == (512,) and z["fc_weight"].shape == (10, 128) and z["fc_bias"].shape == (10,)
        assert list(z["gate_order"]) == ["i", "f", "g", "o"]
        assert json.loads(str(z["spec_json"]))["sigma_train"] == 0.5


def _error(res):
    assert res.exit_code != 0, res.output
    assert "Traceback" not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    return res.output


@pytest.mark.parametrize(
    "args,needle",
    [
        (["train", "--arch", "transformer"], "unknown architecture"),
        (["train", "--data", "cifar"], "unknown data set"),
        (["train", "--sigma-train", "-0.5"], "sigma_train"),
        (["train", "--sigma-train", "nan"], "sigma_train"),
        (["train", "--sigma-train", "inf"], "sigma_train"),
        (["train", "--epochs", "0"], "epochs"),
        (["evaluate", "--repeats", "0"], "repeats"),
        (["evaluate", "--sigma-val", "0,-1"], "sigma_val"),
        (["evaluate", "--sigma-val", "abc"], "sigma-val"),
        (["evaluate", "--model", "lstm-nothing"], "no model"),
        (["describe", "--arch", "cnn"], "unknown architecture"),
        (["train", "--device", "tpu"], "device"),
        (["train", "--train-rng", "mt19937"], "training-noise generator"),
    ],
)
def test_bad_input_gives_one_clear_error(args, needle, tmp_path, fixture_data):
    res = run(*args, "--store", tmp_path / "s") if args[0] != "describe" else run(*args)
    assert needle in _error(res)


def test_missing_data_is_a_clear_error(tmp_path, fixture_sources, monkeypatch):
    import dni.data

    monkeypatch.setattr(dni.data, "_download", lambda src, dest: (_ for _ in ()).throw(dni.errors.DataError("offline")))
    res = run("train", "--store", tmp_path / "s", "--data-dir", tmp_path / "nodata", *TINY)
    assert "missing data file" in _error(res)
    assert not (tmp_path / "s" / "models").exists() or not list((tmp_path / "s" / "models").iterdir())


def test_store_path_that_is_a_file(tmp_path, fixture_data):
    f = tmp_path / "store"
    f.write_text("not a store")
    assert "not a directory" in _error(run("train", "--store", f, *TINY))
    assert "not a directory" in _error(run("evaluate", "--store", f))
    assert f.read_text() == "not a store"


def test_corrupted_checkpoint_is_reported_and_nothing_changes(trained):
    st = Store(trained)
    (mid,) = st.model_ids()
    path = st.model_dir(mid) / "weights.safetensors"
    path.write_bytes(path.read_bytes()[:300])
    before = _snapshot(trained)
    assert "corrupted" in _error(run("evaluate", "--store", trained, "--repeats", "1", "--limit-test", "10"))
    assert _snapshot(trained) == before


def test_python_dash_m_entry_point():
    res = subprocess.run([sys.executable, "-m", "dni", "describe", "--arch", "rnn"], capture_output=True, text=True)
    assert res.returncode == 0 and "21386" in res.stdout


def test_train_rng_philox_is_its_own_model_and_sweeps_pass_it_on(tmp_path, fixture_data):
    store = tmp_path / "store"
    for extra in ([], ["--train-rng", "philox"]):
        res = run("train", "--arch", "rnn", "--data", "rows", "--sigma-train", "0.5", "--store", store, *TINY, *extra)
        assert res.exit_code == 0, res.output
    ids = Store(store).model_ids()
    assert len(ids) == 2
    specs = sorted(Store(store).read_spec(m).rng for m in ids)
    assert specs == ["philox", "torch"]
    res = run("sweep", "--arch", "rnn", "--data", "rows", "--sigma-train", "0.5", "--sigma-val", "0,1", "--repeats", "2",
              "--limit-test", "50", "--train-rng", "philox", "--store", store, "--jobs", "1", *TINY)
    assert res.exit_code == 0, res.output
    assert sorted(Store(store).model_ids()) == sorted(ids)  # the sweep found the philox-trained model


def test_reproduce_takes_the_evaluations_noise_stream(tmp_path):
    res = run("reproduce", "--preset", "smoke", "--rng", "mt19937", "--results", tmp_path / "r", "--figures", tmp_path / "f")
    assert res.exit_code != 0 and "mt19937" in res.output and not (tmp_path / "r").exists()
