"""MKL's code path on AMD CPUs: its AVX-512 kernels, as on Intel CPUs.

torch's CPU build links Intel MKL, which chooses its kernels by CPU vendor before it looks at
the instruction sets: on an AMD CPU it runs its AVX2 kernels even where the CPU has AVX-512
(Zen 4, Zen 5). That costs speed (on Zen 5, whose vector units are 512 bits wide, MKL's
sgemm runs ~2.3x faster on its AVX-512 kernels) and gives other bits than on Intel CPUs, as
the kernels order their sums differently. A two-line library (``csrc/mkl_intel_path.c``),
preloaded, answers MKL's vendor check; MKL then dispatches by instruction set and runs the
kernels it runs on Intel CPUs, with their bits.

A library can be preloaded only when a process starts, so the ``dni`` command re-executes
itself once with it in ``LD_PRELOAD`` (before torch is imported); the processes it starts
(sweep workers, Slurm jobs it submits) inherit it. ``DNI_MKL_PATH`` chooses:

- ``auto`` (default): on AMD CPUs with AVX-512 (F, CD, BW, DQ, VL), else nothing;
- ``intel``: on any x86-64 CPU (on Intel ones it changes nothing);
- ``native``: never (MKL's own choice).

Python code that imports dni itself gets it with
``LD_PRELOAD=$(python -m dni.mkl_path) python ...``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from dni.cpuinfo import first_processor
from dni.paths import cache_dir

SETTINGS = ("auto", "intel", "native")
AVX512 = ("avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl")
LIBRARY = "libdni_mkl_intel_path.so"
_SRC = Path(__file__).parent / "csrc" / "mkl_intel_path.c"
_GUARD = "DNI_MKL_PATH_DONE"  # set in the re-executed process and inherited: exec once


def setting(env: dict | None = None) -> str:
    value = (os.environ if env is None else env).get("DNI_MKL_PATH", "auto").strip().lower() or "auto"
    if value not in SETTINGS:
        raise ValueError(f"DNI_MKL_PATH={value!r}: expected one of {', '.join(SETTINGS)}")
    return value


def cpu(cpuinfo: str | Path = "/proc/cpuinfo") -> tuple[str, set[str]]:
    """Vendor and flags of the first processor in /proc/cpuinfo ('', set() where unreadable)."""
    fields = first_processor(cpuinfo)
    return fields.get("vendor_id", ""), set(fields.get("flags", "").split())


def wanted(cpuinfo: str | Path = "/proc/cpuinfo", env: dict | None = None) -> bool:
    """Whether dni's processes should run with MKL's Intel path (see the module's doc)."""
    choice = setting(env)
    if choice == "native" or not sys.platform.startswith("linux"):
        return False
    vendor, flags = cpu(cpuinfo)
    if choice == "intel":
        return vendor in ("AuthenticAMD", "GenuineIntel", "HygonGenuine")
    return vendor == "AuthenticAMD" and all(f in flags for f in AVX512)


def library() -> Path | None:
    """The preloadable library, compiled with the machine's ``cc`` on first use and cached;
    None where it cannot be built."""
    try:
        source = _SRC.read_bytes()
    except OSError:
        return None
    cc = os.environ.get("CC", "cc")
    flags = ["-O2", "-fPIC", "-shared"]
    out_dir = cache_dir() / "kernels" / hashlib.sha256(source + " ".join([cc, *flags]).encode()).hexdigest()[:16]
    path = out_dir / LIBRARY
    if path.is_file():
        return path
    if shutil.which(cc) is None:
        return None
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".so.tmp")
        os.close(fd)
        try:
            res = subprocess.run([cc, *flags, "-o", tmp, str(_SRC)], capture_output=True, text=True, timeout=60)
            if res.returncode != 0:
                return None
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except (OSError, subprocess.SubprocessError):
        return None
    return path


def preloaded() -> bool:
    """Whether MKL's vendor check is answered by the library in this process: the process's
    global symbol lookup, which MKL's calls go through, finds the library's definition. (A
    library merely loaded with ``dlopen`` comes after torch's, and does not count.)"""
    import ctypes

    ranges = []
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                if line.rstrip().endswith(LIBRARY):
                    low, high = line.split()[0].split("-")
                    ranges.append((int(low, 16), int(high, 16)))
        if not ranges:
            return False
        address = ctypes.cast(ctypes.CDLL(None).mkl_serv_intel_cpu_true, ctypes.c_void_p).value or 0
    except (OSError, AttributeError, ValueError):
        return False
    return any(low <= address < high for low, high in ranges)


def describe() -> str:
    """For provenance: which of MKL's code paths this process runs."""
    return "intel (vendor check answered by dni)" if preloaded() else "native"


def reexec_if_wanted() -> None:
    """Re-execute this process with the library preloaded, where :func:`wanted` says so; the
    re-executed process (and every process it starts) does not do it again. Where the library
    cannot be built, carry on with MKL's own choice and say so."""
    if os.environ.get(_GUARD) or preloaded():
        return
    try:
        if not wanted():
            return
    except ValueError as exc:
        sys.exit(f"dni: {exc}")
    env = {**os.environ, _GUARD: "1"}
    lib = library()
    if lib is None:
        os.environ[_GUARD] = "1"
        print("dni: no C compiler to build the library that gives MKL its Intel code path; MKL keeps "
              "its AMD one (slower products, other bits than on Intel CPUs)", file=sys.stderr)
        return
    env["LD_PRELOAD"] = ":".join(p for p in (str(lib), os.environ.get("LD_PRELOAD", "")) if p)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, env)
    except OSError as exc:
        os.environ[_GUARD] = "1"
        print(f"dni: could not re-execute with {lib} preloaded ({exc}); MKL keeps its own code path", file=sys.stderr)


if __name__ == "__main__":  # the path to preload, for Python code that imports dni itself
    built = library()
    if built is None:
        sys.exit("dni: cannot build the library (no C compiler?)")
    print(built)
