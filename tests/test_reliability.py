"""Reliability and security guarantees (README, "Guarantees"): crashes lose nothing,
corrupted inputs change nothing, untrusted files never execute code."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import random
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from dni.cli import app
from dni.errors import DataError, DivergenceError, StoreError
from dni.models import build_model
from dni.spec import TrainSpec
from dni.store import Store
from tests.helpers import CLI_SWEEP, leftovers, run_dni

runner = CliRunner()
TINY = ["--limit-train", "120", "--val-size", "20", "--epochs", "1", "--batch-size", "32", "--device", "cpu"]
ROOT = Path(__file__).resolve().parent.parent


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def snapshot(root: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.suffix != ".lock"}


def clean_error(res, needle: str) -> None:
    assert res.exit_code >= 1, res.output
    assert "Traceback" not in res.output and needle in res.output, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)


@pytest.fixture
def trained(tmp_path, fixture_data):
    store = tmp_path / "store"
    assert run("train", "--arch", "rnn", "--store", store, *TINY).exit_code == 0
    assert run("evaluate", "--store", store, "--sigma-val", "0,1", "--repeats", "2", "--limit-test", "40").exit_code == 0
    return store


# ------------------------------------------------------------------ crash safety


def _store_bytes(store) -> int:
    """Bytes of every file in the store but the locks: grows with each checkpoint and cell."""
    total = 0
    for path in store.rglob("*") if store.exists() else ():
        try:
            if path.is_file() and path.suffix != ".lock":
                total += path.stat().st_size
        except OSError:  # renamed or removed while we looked
            pass
    return total


def test_random_sigkills_of_the_process_pool_resume_to_identical_results(tmp_path, real_data):
    """SIGKILL the whole sweep (driver and workers) at random moments, then resume.

    Each run is killed a random time after it has written something new to the store (a
    checkpoint or an evaluation cell), the time drawn from the measured duration of an
    uninterrupted run: so the kills land mid-sweep, at different stages, on a fast or a
    busy machine alike, and however much the earlier runs had already done."""
    args = [*CLI_SWEEP, "--epochs", "2", "--limit-train", "1000", "--jobs", "2"]
    # Build the kernels and decode the data into this test's cache first, so that the timed
    # reference run costs what the killed runs cost (a cold first run took long enough that
    # the later runs finished before their kill time).
    warm = "from dni import data, kernels; kernels.library(); data.load_dataset('rows', 'train'); data.load_dataset('rows', 'test')"
    subprocess.run([sys.executable, "-c", warm], env={**os.environ, "DNI_DATA_DIR": str(real_data)}, check=True, timeout=300)
    t0 = time.perf_counter()
    ref = run_dni([*args, "--store", tmp_path / "ref", "--out", tmp_path / "ref.csv"], data=real_data)
    duration = time.perf_counter() - t0
    assert ref.returncode == 0, ref.stderr
    store, out = tmp_path / "store", tmp_path / "results.csv"
    rng = random.Random(1)
    env = {**os.environ, "DNI_DATA_DIR": str(real_data)}
    cmd = [sys.executable, "-m", "dni", *map(str, args), "--store", str(store), "--out", str(out)]
    kills = 0
    for _ in range(4):
        before = _store_bytes(store)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.perf_counter() + 5 * duration
        while proc.poll() is None and _store_bytes(store) <= before and time.perf_counter() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.15) * duration)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        assert run_dni(["status", "--store", store]).returncode == 0, "the store must stay readable after a kill"
    assert kills >= 2, "the sweep finished before it could be killed"
    final = run_dni([*args, "--store", store, "--out", out], data=real_data)
    assert final.returncode == 0, final.stderr
    assert out.read_bytes() == (tmp_path / "ref.csv").read_bytes()
    assert leftovers(store) == []
    assert len(list((store / "models").iterdir())) == 2  # no duplicate models


# ------------------------------------------------------------------ corrupted inputs


def test_bit_flipped_checkpoint_and_spec_mismatch_via_cli(trained):
    st = Store(trained)
    (mid,) = st.model_ids()
    weights = st.model_dir(mid) / "weights.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0x04
    weights.write_bytes(bytes(raw))
    before = snapshot(trained)
    clean_error(run("evaluate", "--store", trained, "--repeats", "3", "--limit-test", "40"), "corrupted")
    assert snapshot(trained) == before
    spec = json.loads((st.model_dir(mid) / "spec.json").read_text())
    spec["hidden_size"] = 64
    (st.model_dir(mid) / "spec.json").write_text(json.dumps(spec))
    before = snapshot(trained)
    clean_error(run("evaluate", "--store", trained, "--repeats", "3"), "different model")
    assert snapshot(trained) == before


def test_results_csv_with_a_missing_column(trained):
    st = Store(trained)
    (mid,) = st.model_ids()
    (csv,) = (st.model_dir(mid) / "evals").glob("*.csv")
    csv.write_text(csv.read_text().replace("accuracy", "acc"))
    before = snapshot(trained)
    clean_error(run("evaluate", "--store", trained, "--sigma-val", "0,1", "--repeats", "2", "--limit-test", "40"), "lacks column")
    assert snapshot(trained) == before


def test_tampered_and_missing_data(tmp_path, fixture_data):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(fixture_data, data)
    labels = data / "mnist-strokes" / "train-labels.tar.gz"
    labels.write_bytes(labels.read_bytes()[:-40] + bytes(40))
    store = tmp_path / "store"
    clean_error(run("train", "--data", "strokes", "--store", store, "--data-dir", data, *TINY), str(labels))
    empty = tmp_path / "empty"
    empty.mkdir()
    clean_error(run("train", "--store", store, "--data-dir", empty, *TINY), "missing data file")
    assert not (store / "models").exists() or not any((store / "models").iterdir())


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "1m"):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small file system")
    path.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs is not permitted here")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_read_only_store(trained, tmp_path):
    with tmpfs(tmp_path / "ro") as ro:
        subprocess.run(["cp", "-a", f"{trained}/.", str(ro)], check=True)
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        before = snapshot(ro)
        clean_error(run("evaluate", "--store", ro, "--sigma-val", "0.5", "--repeats", "1", "--limit-test", "40"), "Read-only file system")
        clean_error(run("train", "--arch", "rnn", "--sigma-train", "0.3", "--store", ro, *TINY), "Read-only file system")
        assert snapshot(ro) == before


def test_full_store(trained, tmp_path):
    with tmpfs(tmp_path / "full", size="2m") as full:
        subprocess.run(["cp", "-a", f"{trained}/.", str(full)], check=True)
        with contextlib.suppress(OSError):  # fill what is left
            with open(full / "filler", "wb") as fh:
                while True:
                    fh.write(b"\0" * 65536)
                    fh.flush()
        before = snapshot(full)
        res = run("train", "--arch", "rnn", "--sigma-train", "0.3", "--store", full, *TINY)
        clean_error(res, "No space left on device")
        assert snapshot(full) == before
        assert leftovers(full) == []


# ------------------------------------------------------------------ untrusted files


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['DNI_TEST_MARKER']}",))


def test_malicious_pickle_checkpoint_is_never_executed(trained, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("DNI_TEST_MARKER", str(marker))
    st = Store(trained)
    (mid,) = st.model_ids()
    evil = pickle.dumps(_Payload())
    for payload in (evil, _torch_save_bytes()):
        (st.model_dir(mid) / "weights.safetensors").write_bytes(payload)
        meta = st.read_meta(mid)
        meta["weights_sha256"] = hashlib.sha256(payload).hexdigest()  # even with a matching checksum
        (st.model_dir(mid) / "meta.json").write_text(json.dumps(meta))
        with pytest.raises(StoreError, match="corrupted"):
            st.load_model(mid)
        clean_error(run("evaluate", "--store", trained, "--repeats", "3", "--limit-test", "40"), "corrupted")
    assert not marker.exists(), "a pickled payload was executed"


def _torch_save_bytes() -> bytes:
    import io

    buf = io.BytesIO()
    torch.save({"weight": _Payload()}, buf)
    return buf.getvalue()


def test_no_code_path_unpickles():
    """dni's sources never call pickle/torch.load or allow pickles in numpy."""
    for path in (ROOT / "dni").rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"pickle\.loads?\(|torch\.load\(|allow_pickle=True", text), path


@pytest.mark.parametrize("ref", ["../../etc", "..", "a/../../b", "/etc/passwd"])
def test_model_references_cannot_escape_the_store(trained, ref, tmp_path):
    clean_error(run("export", ref, "--store", trained, "--out", tmp_path / "w.npz"), "model")
    clean_error(run("evaluate", "--store", trained, "--model", ref), "model")


# ------------------------------------------------------------------ numerical faults


class _NaNNoise:
    is_noiseless = False

    def __call__(self, pre, generator):
        return pre * float("nan")


def test_divergence_is_detected_reported_and_not_saved(tmp_path, fixture_data, monkeypatch):
    import dni.train

    monkeypatch.setattr(dni.train, "make_noise", lambda kind, sigma: _NaNNoise())
    with pytest.raises(DivergenceError, match="epoch 1, batch 1"):
        dni.train.train(TrainSpec(arch="rnn", sigma_train=1.0, limit_train=120, val_size=20, epochs=1))
    store = tmp_path / "store"
    clean_error(run("train", "--arch", "rnn", "--sigma-train", "1", "--store", store, *TINY), "diverged in epoch 1")
    assert Store(store).model_ids() == []


def test_evaluation_refuses_non_finite_weights(tmp_path, fixture_data):
    st = Store(tmp_path)
    model = build_model("rnn", 28)
    with torch.no_grad():
        model.weight[0, 0] = float("inf")
    st.save_model(TrainSpec(arch="rnn"), model, {})
    clean_error(run("evaluate", "--store", tmp_path, "--repeats", "1", "--limit-test", "10"), "non-finite")


# ------------------------------------------------------------------ determinism


def test_same_spec_seed_and_threads_give_bit_identical_weights_in_process_and_in_the_pool(tmp_path, real_data):
    from dni.executors import LocalExecutor
    from dni.jobs import train_job
    from dni.spec import EvalSpec
    from dni.sweep import SweepSpec, run_sweep

    spec = TrainSpec(arch="rnn", epochs=1, limit_train=300, val_size=50)
    for name in ("a", "b"):
        train_job(tmp_path / name, spec, threads=1)  # the pool's workers run 1 thread each
    sweep = SweepSpec(spec, (0.0,), (0,), EvalSpec(sigma_val=(0.5,), repeats=1, limit_test=50))
    run_sweep(Store(tmp_path / "c"), sweep, LocalExecutor(jobs=2, data_dir=str(real_data)))
    digests = {(tmp_path / n / "models" / spec.model_id / "weights.safetensors").read_bytes() for n in "abc"}
    assert len(digests) == 1


# ------------------------------------------------------------------ downloads


def test_interrupted_download_leaves_nothing(fixture_sources, tmp_path, monkeypatch):
    import io
    import urllib.error

    import dni.data

    class Broken(io.BytesIO):
        def read(self, *a):
            data = super().read(*a)
            if self.tell() > 200:
                raise urllib.error.URLError("connection reset")
            return data

        def __enter__(self):
            return self

        def __exit__(self, *e):
            return False

    good = {p.name: p.read_bytes() for p in (fixture_sources / "mnist").iterdir()}
    monkeypatch.setattr(dni.data.urllib.request, "urlopen", lambda url, timeout=None: Broken(good[url.rsplit("/", 1)[1]]))
    root = tmp_path / "dl"
    with pytest.raises(DataError, match="connection reset"):
        dni.data.load_dataset("rows", "test", root)
    # The interrupted file is absent; only complete, verified files (the small labels
    # file came through whole) and no partial download remain.
    assert not (root / "mnist" / "t10k-images-idx3-ubyte.gz").exists()
    assert [p.name for p in root.rglob("*") if p.is_file()] in ([], ["t10k-labels-idx1-ubyte.gz"])
    assert leftovers(root) == []


# ------------------------------------------------------------------ CLI fuzzing

_values = st.one_of(
    st.integers(-3, 3).map(str), st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["", "abc", "0:1:0.5", "1:0:0.1", "0,,1", "lstm", "rnn", "gru", "rows", "strokes", "-1", "nan", "1e309", "../x", "bf16", "fp32"]),
)
_OPTIONS = {
    "train": ["--arch", "--data", "--sigma-train", "--epochs", "--lr", "--lr-decay", "--grad-clip", "--val-size", "--stroke-repr", "--seed"],
    "evaluate": ["--sigma-val", "--repeats", "--limit-test", "--seed", "--batch-size", "--rng", "--model", "--precision"],
    "sweep": ["--arch", "--data", "--sigma-train", "--sigma-val", "--repeats", "--seeds", "--epochs", "--limit-test", "--rng", "--precision"],
    "describe": ["--arch", "--data", "--hidden-size"],
    "plot": [],
}


@contextlib.contextmanager
def _address_space_cap(extra: int):
    """Let the process map at most ``extra`` more bytes than now: an input that makes dni
    allocate without bound then fails this test with its arguments, instead of taking the
    machine's memory until the kernel kills the whole test run."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    mapped = int(Path("/proc/self/statm").read_text().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (mapped + extra, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


class _Hung(BaseException):
    """Raised in a fuzzed command that runs too long: a BaseException, so that neither the
    CLI's error handling nor the test runner's catches it, and the test fails with it."""


@contextlib.contextmanager
def _time_limit(seconds: float, what):
    """Fail with ``what`` if the block takes longer than ``seconds``: a fuzzed input that
    makes dni hang then fails this test with its arguments instead of stalling the run."""

    def expire(signum, frame):
        raise _Hung(f"still running after {seconds:.0f} s: {what}")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_the_fuzz_time_limit_stops_a_hang():
    with pytest.raises(_Hung, match="sleeping"), _time_limit(0.2, "sleeping"):
        time.sleep(5)


def _ran_out_of_memory(res) -> bool:
    return isinstance(res.exception, MemoryError) or "allocate" in res.output.lower()


def test_the_fuzz_memory_cap_stops_a_runaway_allocation():
    with _address_space_cap(1 << 30), pytest.raises(RuntimeError, match="allocate"):
        torch.ones(2 << 30, dtype=torch.uint8)  # 2 GiB, touched
    torch.ones(2 << 30, dtype=torch.uint8)  # the cap is lifted again


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(command=st.sampled_from(sorted(_OPTIONS)), data=st.data())
def test_cli_fuzz_never_crashes(command, data, fixture_data, tmp_path_factory):
    store = tmp_path_factory.mktemp("fuzz")
    args = [command]
    if command == "plot":
        args += [data.draw(st.sampled_from(["fig2", "fig11", "all", "x"])), "--results", str(store)]
    # Small defaults first: a later occurrence of an option overrides them.
    if command in ("train", "sweep"):
        args += ["--limit-train", "60", "--val-size", "10", "--epochs", "1", "--device", "cpu", "--store", str(store)]
    if command == "sweep":
        args += ["--jobs", "1", "--sigma-train", "0", "--repeats", "1", "--limit-test", "20", "--sigma-val", "0,1"]
    if command == "evaluate":
        args += ["--store", str(store), "--limit-test", "20"]
    if _OPTIONS[command]:
        for opt in data.draw(st.lists(st.sampled_from(_OPTIONS[command]), max_size=4, unique=True)):
            args += [opt, data.draw(_values)]
    with _address_space_cap(4 << 30), _time_limit(120, args):
        res = runner.invoke(app, args)
    assert not _ran_out_of_memory(res), (args, "needed more than 4 GiB", res.output[-500:])
    if res.exit_code != 0:
        assert res.exception is None or isinstance(res.exception, SystemExit), (args, res.exception)
        assert res.output.strip(), args
        assert "Traceback" not in res.output, args


def test_killing_the_driver_stops_its_workers(tmp_path, real_data):
    """A sweep driver killed by SIGKILL takes its pool workers with it (no orphans)."""
    env = {**os.environ, "DNI_DATA_DIR": str(real_data)}
    cmd = [sys.executable, "-m", "dni", *CLI_SWEEP, "--store", str(tmp_path / "s"), "--jobs", "2", "--epochs", "3", "--limit-train", "3000"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    workers: list[int] = []
    while time.time() < deadline and len(workers) < 2:
        time.sleep(0.5)
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(proc.pid)], capture_output=True, text=True).stdout
        workers = [int(p) for p in out.split()]
    assert len(workers) >= 2, "the pool did not start"
    while time.time() < deadline and not (tmp_path / "s" / "locks").is_dir():  # a job has started
        time.sleep(0.5)
    proc.kill()
    proc.wait()
    time.sleep(5)
    alive = [p for p in workers if Path(f"/proc/{p}").exists() and "zombie" not in Path(f"/proc/{p}/status").read_text().lower()]
    assert alive == [], f"workers {alive} outlived their driver"


def test_grids_too_large_to_plan_are_refused_before_anything_runs(tmp_path):
    """A sweep or evaluation grid beyond what dni plans in memory is a clean error."""
    store = tmp_path / "store"
    for args, needle in (
        (["sweep", "--seeds", "13161240", "--store", str(store)], "--seeds must be between 1 and 10,000"),
        (["sweep", "--sigma-train", "0:1:0.001", "--seeds", "20", "--store", str(store)], "20,020 models"),
        (["sweep", "--repeats", "300000", "--sigma-val", "0,1", "--sigma-train", "0,1", "--store", str(store)], "1,200,000"),
        (["evaluate", "--model", "x", "--repeats", "200000", "--store", str(store)], "split the grid"),
    ):
        clean_error(runner.invoke(app, args), needle)
    assert not store.exists() or not any(store.rglob("sweep.json"))
