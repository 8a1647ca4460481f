"""Shared fixtures. Every cache and temporary file of the tests stays inside the workspace."""

from __future__ import annotations

import dataclasses
import json
import os
import resource
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURE_DATA = Path(__file__).parent / "fixtures" / "data"
_WORK = ROOT / ".cache" / "tests"
_WORK.mkdir(parents=True, exist_ok=True)
os.environ["MPLCONFIGDIR"] = str(_WORK / "matplotlib")
os.environ["XDG_CACHE_HOME"] = str(_WORK / "xdg")
os.environ["TMPDIR"] = str(_WORK / "tmp")
os.environ["TRITON_HOME"] = str(_WORK / "triton")  # Triton's compiled kernels
os.environ["TRITON_CACHE_DIR"] = str(_WORK / "triton" / "cache")
(_WORK / "tmp").mkdir(exist_ok=True)
# A test that allocates without bound fails with MemoryError (and names itself) at 16 GiB
# of address space, instead of taking the machine's memory until the kernel kills the run.
_CAP = 16 << 30
_soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
if (_soft == resource.RLIM_INFINITY or _soft > _CAP) and (_hard == resource.RLIM_INFINITY or _hard >= _CAP):
    resource.setrlimit(resource.RLIMIT_AS, (_CAP, _hard))
# Real data for the tests that need the full files: $DNI_DATA_DIR, else ../shared/data.
REAL_DATA = Path(os.environ.get("DNI_DATA_DIR") or ROOT.parent / "shared" / "data")
os.environ.pop("DNI_DATA_DIR", None)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Each test gets its own decoded-data cache, and no default data directory."""
    monkeypatch.setenv("DNI_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("DNI_DATA_DIR", raising=False)
    monkeypatch.delenv("DNI_STORE", raising=False)


@pytest.fixture
def fixture_sources(monkeypatch) -> Path:
    """Make the checksums of the committed fixture files the expected ones."""
    import dni.data

    md5 = json.loads((FIXTURE_DATA / "md5.json").read_text())
    sources = {
        key: {name: dataclasses.replace(src, md5=md5[src.relpath]) for name, src in files.items()}
        for key, files in dni.data.SOURCES.items()
    }
    monkeypatch.setattr(dni.data, "SOURCES", sources)
    return FIXTURE_DATA


@pytest.fixture
def fixture_data(fixture_sources, monkeypatch) -> Path:
    """The tiny committed subset of the real data, with its own checksums, as DNI_DATA_DIR."""
    import dni.data

    monkeypatch.setattr(dni.data, "_download", _no_network)
    monkeypatch.setenv("DNI_DATA_DIR", str(FIXTURE_DATA))
    return FIXTURE_DATA


@pytest.fixture
def real_data(monkeypatch) -> Path:
    """The full published data files (skipped where they are not available)."""
    if not (REAL_DATA / "mnist").is_dir():
        pytest.skip(f"full data set not found at {REAL_DATA}")
    import dni.data

    monkeypatch.setattr(dni.data, "_download", _no_network)
    monkeypatch.setenv("DNI_DATA_DIR", str(REAL_DATA))
    return REAL_DATA


def _no_network(src, dest):
    from dni.errors import DataError

    raise DataError(f"no network in tests (wanted {src.urls[0]})")


@pytest.fixture(scope="session")
def reference_csv(tmp_path_factory):
    """Results of the helpers' tiny sweep, run uninterrupted with the local executor."""
    from tests.helpers import CLI_SWEEP, run_dni

    if not (REAL_DATA / "mnist").is_dir():
        pytest.skip("full data set not available")
    root = tmp_path_factory.mktemp("reference")
    env = {"DNI_CACHE_DIR": str(root / "cache")}
    res = run_dni([*CLI_SWEEP, "--store", root / "store", "--out", root / "results.csv", "--jobs", "1"], env, REAL_DATA)
    assert res.returncode == 0, res.stderr
    return root / "results.csv"


@pytest.fixture(scope="module")
def lib():
    """dni's compiled kernels; a test that needs them fails (not skips) when they do not build."""
    from dni import kernels

    lib = kernels.library()
    if lib is None:
        pytest.fail(f"the C kernels did not build: {kernels.build_error()}")
    return lib


@pytest.fixture(params=["openmp", "threads", "python"])
def loop_mode(request, lib, monkeypatch):
    """The three ways the compiled recurrences run: whole row blocks in C on OpenMP's thread
    team; whole row blocks in C, one per Python thread (a build without OpenMP); per-step
    Python loops with torch.mm (no usable BLAS in torch's library)."""
    if request.param == "openmp" and not lib.openmp:
        pytest.skip("the kernels were built without OpenMP")
    if request.param != "python" and not lib.blas:
        pytest.skip("torch's library has no usable sgemm")
    if request.param == "threads":
        monkeypatch.setattr(lib, "openmp", False)
    if request.param == "python":
        monkeypatch.setattr(lib, "blas", False)
    return request.param


@pytest.fixture
def two_threads():
    """Torch at two intra-op threads during the test (the recurrences then split the batch)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)
