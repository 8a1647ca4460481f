"""MKL's Intel code path on AMD CPUs (dni.mkl_path): when it is taken, that the re-executed
process has the library loaded, and that the products then give the Intel bits."""

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dni import mkl_path

FLAGS = "fpu sse2 avx2 fma avx512f avx512dq avx512cd avx512bw avx512vl"


def _cpuinfo(tmp_path: Path, vendor: str, flags: str) -> Path:
    path = tmp_path / f"{vendor}-{len(flags)}"
    path.write_text(f"processor\t: 0\nvendor_id\t: {vendor}\nflags\t\t: {flags}\n\nprocessor\t: 1\nvendor_id\t: other\n")
    return path


def test_when_the_intel_path_is_wanted(tmp_path):
    zen4 = _cpuinfo(tmp_path, "AuthenticAMD", FLAGS + " avx512_bf16")
    zen3 = _cpuinfo(tmp_path, "AuthenticAMD", "fpu sse2 avx2 fma")
    almost = _cpuinfo(tmp_path, "AuthenticAMD", FLAGS.replace(" avx512vl", ""))
    intel = _cpuinfo(tmp_path, "GenuineIntel", FLAGS)
    arm = _cpuinfo(tmp_path, "", "fp asimd")
    assert mkl_path.cpu(zen4) == ("AuthenticAMD", set((FLAGS + " avx512_bf16").split()))
    assert mkl_path.cpu(tmp_path / "missing") == ("", set())
    table = {setting: [mkl_path.wanted(c, {"DNI_MKL_PATH": setting}) for c in (zen4, zen3, almost, intel, arm)]
             for setting in ("auto", "intel", "native", " Intel ", "")}
    assert table == {"auto": [True, False, False, False, False], "intel": [True, True, True, True, False],
                     "native": [False] * 5, " Intel ": [True, True, True, True, False], "": [True, False, False, False, False]}
    assert mkl_path.wanted(zen4, {}) and not mkl_path.wanted(intel, {})
    with pytest.raises(ValueError, match="DNI_MKL_PATH"):
        mkl_path.wanted(zen4, {"DNI_MKL_PATH": "amd"})


needs_cc = pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None or not sys.platform.startswith("linux"),
                              reason="needs a C compiler and Linux's LD_PRELOAD")


@needs_cc
def test_the_library_answers_mkls_vendor_check(tmp_path, monkeypatch):
    monkeypatch.setenv("DNI_CACHE_DIR", str(tmp_path))
    lib = mkl_path.library()
    assert lib is not None and lib.is_relative_to(tmp_path) and lib.name == mkl_path.LIBRARY
    assert ctypes.CDLL(str(lib)).mkl_serv_intel_cpu_true() == 1
    assert mkl_path.library() == lib  # cached
    # loaded after torch, it answers nothing: this process still runs MKL's own path
    assert not mkl_path.preloaded() and mkl_path.describe() == "native"


def _run(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True, timeout=120)


@needs_cc
def test_the_process_reexecutes_itself_with_the_library_once(tmp_path):
    code = ("import os; from dni import mkl_path; print('start', flush=True); mkl_path.reexec_if_wanted(); "
            "print(mkl_path.describe(), os.environ.get('LD_PRELOAD'), os.environ.get('DNI_MKL_PATH_DONE'))")
    env = {"DNI_CACHE_DIR": str(tmp_path), "LD_PRELOAD": "", "DNI_MKL_PATH_DONE": ""}
    forced = _run(code, {**env, "DNI_MKL_PATH": "intel"})  # taken on Intel CPUs too, where it changes nothing
    assert forced.returncode == 0, forced.stderr
    lines = forced.stdout.split("\n")
    assert lines[0] == lines[1] == "start"  # once before the exec, once after it; not again
    assert lines[2].startswith("intel (vendor check answered by dni) ") and lines[2].endswith(" 1")
    assert lines[2].split(" ")[-2].startswith(str(tmp_path)) and lines[2].split(" ")[-2].endswith(mkl_path.LIBRARY)
    assert lines[3:] == [""]
    native = _run(code, {**env, "DNI_MKL_PATH": "native"})
    assert native.returncode == 0 and native.stdout.split("\n")[:2] == ["start", "native  "]
    bad = _run(code, {**env, "DNI_MKL_PATH": "amd"})
    assert bad.returncode == 1 and "DNI_MKL_PATH='amd'" in bad.stderr


@needs_cc
@pytest.mark.skipif(not all(f in mkl_path.cpu()[1] for f in mkl_path.AVX512),
                    reason="MKL's Intel kernels for this CPU's instruction sets have no pinned bits (only AVX-512's)")
def test_with_the_intel_path_the_products_give_the_intel_bits(tmp_path):
    """The pinned logits and gradients of tests/test_training_kernels.py, in a process with the
    library preloaded: on an AMD CPU with AVX-512 they are Intel's (on an Intel CPU the library
    changes nothing). Without AVX-512, MKL's Intel kernels are its AVX2 ones, whose bits differ
    again and are not pinned (the path is not taken there unless DNI_MKL_PATH=intel asks)."""
    lib = mkl_path.library()
    here = Path(__file__).parent
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "pinned",
                          str(here / "test_training_kernels.py")],
                         env={**os.environ, "LD_PRELOAD": str(lib)}, capture_output=True, text=True, timeout=600,
                         cwd=here.parent)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert " passed" in res.stdout and "failed" not in res.stdout
