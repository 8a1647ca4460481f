"""The compiled CPU kernels of dni (``dni/csrc/philox_normal.c``) and their fallbacks.

The kernels: the Philox/Box-Muller noise stream, the fused noisy LSTM/RNN steps of
inference (:func:`fused_recurrence`), and the forward and backward steps of the compiled
training path (:func:`fused_layer_train`). Where torch's own library exports the BLAS
``sgemm_`` that torch.mm calls (MKL in the x86 wheels; checked bit for bit at load), whole
recurrences run in C, the row blocks of the batch in parallel on OpenMP's thread team,
which is torch's (the library links the libgomp that torch has loaded). Otherwise the
steps are driven from Python with torch.mm, with the same results.

The C file is read when this module is imported and compiled with the machine's C
compiler on first use (``cc -O3 -march=native``) into ``<cache>/kernels/<hash>/``, keyed
by the source, the flags, the compiler and the CPU, and loaded with ctypes. Where no
compiler is available or the build fails, :func:`available` is False and dni uses the
pure-torch implementation below, which draws the *same* Philox stream (same uniform
bits; its normals agree with the compiled ones to float rounding), and autograd over the
torch ops for training. ``DNI_NO_KERNELS=1`` forces the fallback.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

_SRC = Path(__file__).parent / "csrc" / "philox_normal.c"
try:
    # Read once, when this module is imported: the library is always built from the source
    # that matches these ctypes signatures, even if the file changes under a running sweep
    # (an upgrade mid-run must not let old Python call a newly built C ABI).
    _SOURCE: bytes | None = _SRC.read_bytes()
except OSError:
    _SOURCE = None
# No -ffast-math: linked into a shared library it pulls in crtfastmath.o, which switches
# the whole process (torch and numpy too) to flush subnormals to zero when it is loaded.
_FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared"]
# -fopenmp: row blocks run on OpenMP's thread team, which is torch's own (libgomp is found
# by its soname, already loaded by torch). Where the compiler has no OpenMP, -fopenmp-simd
# keeps the vector loops and Python threads run the blocks.
_OPENMP_FLAGS = (["-fopenmp"], ["-fopenmp-simd"])
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_error: str | None = None


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            lines = [ln for ln in fh if ln.startswith(("model name", "flags"))][:2]
        return "".join(lines)
    except OSError:
        return platform.processor()


def _build_dir(flags: list[str]) -> Path:
    from dni.data import cache_dir

    cc = os.environ.get("CC", "cc")
    key = hashlib.sha256((_SOURCE or b"") + " ".join([cc, *flags, platform.machine(), _cpu_id()]).encode()).hexdigest()[:16]
    return cache_dir() / "kernels" / key


def _compile() -> ctypes.CDLL:
    errors = []
    for extra in _OPENMP_FLAGS:
        try:
            return _compile_with([*_FLAGS, *extra])
        except OSError as exc:
            errors.append(str(exc))
    raise OSError("; ".join(errors))


def _compile_with(flags: list[str]) -> ctypes.CDLL:
    if _SOURCE is None:
        raise OSError(f"cannot read {_SRC}")
    out_dir = _build_dir(flags)
    lib_path = out_dir / "libdni_kernels.so"
    if not lib_path.is_file():
        cc = os.environ.get("CC", "cc")
        if shutil.which(cc) is None:
            raise OSError(f"no C compiler ({cc}) found")
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".so.tmp")
        os.close(fd)
        fd, src = tempfile.mkstemp(dir=out_dir, suffix=".c")
        with os.fdopen(fd, "wb") as fh:
            fh.write(_SOURCE)
        try:
            res = subprocess.run([cc, *flags, "-o", tmp, src], capture_output=True, text=True, timeout=120)
            if res.returncode != 0:
                raise OSError(f"compiling {_SRC.name} failed: {res.stderr.strip()[:500]}")
            os.replace(tmp, lib_path)
        finally:
            for path in (tmp, src):
                if os.path.exists(path):
                    os.unlink(path)
    lib = ctypes.CDLL(str(lib_path))
    f32p, i64, u64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_float
    i32, u64p = ctypes.c_int, ctypes.c_void_p
    lib.dni_normal.argtypes = [f32p, i64, u64, i32, u64, f32, i32]
    lib.dni_lstm_step.argtypes = [f32p, f32p, f32p, f32p, i64, i64, u64, i32, u64, f32]
    lib.dni_rnn_step.argtypes = [f32p, f32p, f32p, i64, i64, u64, i32, u64, f32]
    lib.dni_philox4x32_10.argtypes = [ctypes.c_void_p] * 3
    lib.dni_ars4x32_7.argtypes = [ctypes.c_void_p] * 3
    lib.dni_lstm_train_fwd.argtypes = [f32p] * 6 + [i64, i64, u64, i32, u64, f32]
    lib.dni_lstm_train_bwd.argtypes = [f32p] * 6 + [i64, i64]
    lib.dni_set_sgemm.argtypes = [ctypes.c_void_p]
    lib.dni_set_gemm_bf16.argtypes = [ctypes.c_void_p]
    lib.dni_recurrence.argtypes = [i32] + [f32p] * 4 + [i32] + [f32p] * 3 + [i64] * 3 + [u64, i32, u64p, f32, i64, i32, i32, i32]
    lib.dni_train_forward.argtypes = [i32] + [f32p] * 7 + [i64] * 3 + [u64, i32, u64p, f32, i32, i32, i32]
    lib.dni_train_backward.argtypes = [i32] + [f32p] * 7 + [i64] * 3 + [i32, i32, i32]
    lib.dni_blas_mm.argtypes = [i32] + [f32p] * 3 + [i64] * 3
    lib.dni_blas_mm_bf16.argtypes = [f32p] * 3 + [i64] * 3
    lib.dni_blas_mm_packed.argtypes = [f32p] * 3 + [i64] * 3
    lib.dni_set_sgemm_packed.argtypes = [ctypes.c_void_p] * 3
    lib.dni_projection2_mismatches.argtypes = [f32p] * 3 + [i64] * 2
    lib.dni_projection2_mismatches.restype = ctypes.c_int64
    lib.dni_set_vs_sqrt.argtypes = [ctypes.c_void_p]
    lib.dni_adam_step.argtypes = [f32p] * 4 + [i64] + [f32] * 7
    for fn in (lib.dni_normal, lib.dni_lstm_step, lib.dni_rnn_step, lib.dni_philox4x32_10, lib.dni_ars4x32_7, lib.dni_lstm_train_fwd,
               lib.dni_lstm_train_bwd, lib.dni_set_sgemm, lib.dni_set_gemm_bf16, lib.dni_train_backward, lib.dni_blas_mm,
               lib.dni_set_sgemm_packed,
               lib.dni_set_vs_sqrt):
        fn.restype = None
    for fn in (lib.dni_recurrence, lib.dni_train_forward, lib.dni_openmp, lib.dni_blas_mm_bf16, lib.dni_blas_mm_packed, lib.dni_adam_step,
               lib.dni_has_ars):
        fn.restype = ctypes.c_int
    lib.ars = bool(lib.dni_has_ars())
    lib.blas = _attach_blas(lib)
    lib.packed = lib.blas and _attach_packed(lib)
    lib.bf16 = lib.blas and _attach_gemm_bf16(lib)
    lib.openmp = bool(lib.dni_openmp())
    # The square root torch.sqrt runs on float tensors here (MKL's vsSqrt, not correctly
    # rounded), for the compiled optimizer step; dni.optim checks that step against torch's.
    vs_sqrt = _torch_symbol("vsSqrt")
    lib.dni_set_vs_sqrt(vs_sqrt)
    lib.vs_sqrt = vs_sqrt is not None
    return lib


def _torch_symbol(name: str) -> int | None:
    """Address of a function exported by torch's CPU library, or None."""
    try:
        torch_lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        return ctypes.cast(getattr(torch_lib, name), ctypes.c_void_p).value
    except (OSError, AttributeError):
        return None


def _attach_blas(lib: ctypes.CDLL) -> bool:
    """Hand the kernels the BLAS sgemm that torch.mm uses, so that whole recurrences run in C.

    It is the Fortran ``sgemm_`` exported by torch's own library (MKL in the x86 wheels).
    It is used only if, called as the kernels call it, it gives torch.mm's bits on both
    GEMM shapes of the loops; otherwise (another BLAS, another build) the recurrences step
    from Python with torch.mm, as before.
    """
    address = _torch_symbol("sgemm_")
    if address is None:
        return False
    lib.dni_set_sgemm(address)
    gen = torch.Generator().manual_seed(0)
    with torch_single_threaded():
        for m, n, k in ((37, 96, 24), (256, 512, 128), (64, 128, 512), (3, 16, 64)):
            a, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
            out_t, out = torch.empty(m, n), torch.empty(m, k)
            lib.dni_blas_mm(1, a.data_ptr(), w.data_ptr(), out_t.data_ptr(), m, n, k)
            b = torch.randn(m, n, generator=gen)
            lib.dni_blas_mm(0, b.data_ptr(), w.data_ptr(), out.data_ptr(), m, k, n)
            if not (torch.equal(out_t, torch.mm(a, w.t())) and torch.equal(out, torch.mm(b, w))):
                lib.dni_set_sgemm(None)
                return False
    return True


def _attach_packed(lib: ctypes.CDLL) -> bool:
    """Hand the kernels MKL's packed GEMM (``cblas_sgemm_pack_get_size``, ``cblas_sgemm_pack``,
    ``cblas_sgemm_compute``, exported by torch's library next to ``sgemm_``): the loops then
    pack W_h once per row block instead of once per step. Whether it gives sgemm's bits is
    checked per shape before use (:func:`packed_agrees`)."""
    addresses = [_torch_symbol(name) for name in ("cblas_sgemm_pack_get_size", "cblas_sgemm_pack", "cblas_sgemm_compute")]
    if None in addresses:
        return False
    lib.dni_set_sgemm_packed(*addresses)
    return True


@functools.cache
def _packed_agrees(lib: ctypes.CDLL, m: int, n: int, k: int) -> bool:
    """Whether ``lib``'s packed product (m, k) x (k, n) gives its sgemm's bits (cached per
    library and shape)."""
    gen = torch.Generator().manual_seed(m * 1_000_003 + n * 1_009 + k)
    a, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
    out, ref = torch.empty(m, n), torch.empty(m, n)
    with torch_single_threaded():
        if lib.dni_blas_mm_packed(a.data_ptr(), w.data_ptr(), out.data_ptr(), m, n, k):
            return False
        lib.dni_blas_mm(1, a.data_ptr(), w.data_ptr(), ref.data_ptr(), m, n, k)
    return torch.equal(out, ref)


def packed_agrees(lib: ctypes.CDLL, rows: Iterable[int], n: int, k: int) -> bool:
    """Whether the packed GEMM gives sgemm's bits for products (m, k) x (k, n) with every m
    in ``rows`` (checked once per shape, on random operands: the BLAS picks its kernels by
    shape, not by value)."""
    return bool(lib.packed) and all(_packed_agrees(lib, m, n, k) for m in set(rows))


def _sub_block_rows(batch: int, parts: int, cache_rows: int) -> set[int]:
    """The row counts of the sub-blocks that the compiled loops cut a batch into: the
    ``parts`` blocks of :func:`_row_bounds`, each in pieces of ``cache_rows``."""
    rows = set()
    bounds = _row_bounds(batch, parts)
    for r0, r1 in zip(bounds, bounds[1:]):
        size = r1 - r0
        if size >= cache_rows:
            rows.add(cache_rows)
        if size % cache_rows:
            rows.add(size % cache_rows)
    return rows


def _attach_gemm_bf16(lib: ctypes.CDLL) -> bool:
    """Hand the kernels the BLAS's bf16 GEMM (MKL's ``gemm_bf16bf16f32_``: bfloat16 operands,
    fp32 accumulation and output; AMX tiles where the CPU has them), for inference at
    ``--precision bf16``. Used only if, on the shape of the loops, it agrees with the fp32
    product of the rounded operands to within fp32 summation error (its summation order is
    its own, so not bit for bit)."""
    address = _torch_symbol("gemm_bf16bf16f32_")
    if address is None:
        return False
    lib.dni_set_gemm_bf16(address)
    gen = torch.Generator().manual_seed(0)
    a, w = torch.randn(256, 128, generator=gen), torch.randn(512, 128, generator=gen)
    a16, w16 = a.bfloat16().float(), w.bfloat16()
    out = torch.empty(256, 512)
    with torch_single_threaded():
        if lib.dni_blas_mm_bf16(a.data_ptr(), w16.data_ptr(), out.data_ptr(), 256, 512, 128):
            raise MemoryError("no scratch memory for the bf16 GEMM check")
    ref = torch.mm(a16.double(), w16.double().t())
    bound = 1e-5 * torch.mm(a16.abs().double(), w16.double().abs().t()) + 1e-30  # ~ K * 2^-24 relative, with margin
    if not bool(((out.double() - ref).abs() <= bound).all()):
        lib.dni_set_gemm_bf16(None)
        return False
    return True


def library() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot be built (see :func:`build_error`)."""
    global _lib, _tried, _error
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            if os.environ.get("DNI_NO_KERNELS") == "1":
                _error = "disabled by DNI_NO_KERNELS=1"
            else:
                try:
                    _lib = _compile()
                except (OSError, subprocess.SubprocessError) as exc:
                    _error = str(exc)
            _tried = True
    return _lib


def available() -> bool:
    return library() is not None


#: dni's counter-based streams by rng name, as the compiled kernels number them.
STREAMS = {"philox": 0, "ars": 1}


def draws(lib: ctypes.CDLL | None, stream: str) -> bool:
    """Whether the compiled library ``lib`` draws ``stream``: Philox always, ARS where the
    CPU has AES instructions."""
    return lib is not None and (stream != "ars" or lib.ars)


def build_error() -> str | None:
    library()
    return _error


_pool: ThreadPoolExecutor | None = None
_pool_size = 0


def _threads_pool(n: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    if _pool is None or _pool_size != n:
        if _pool is not None:
            _pool.shutdown(wait=False)
        _pool, _pool_size = ThreadPoolExecutor(max_workers=n, thread_name_prefix="dni-step"), n
    return _pool


#: Rows a thread carries through all steps at a time: its GEMM output, h and c stay in cache.
CACHE_ROWS = 256
#: Batch rows below which a block is not worth a thread of its own.
MIN_ROWS_PER_THREAD = 64


@contextlib.contextmanager
def torch_single_threaded():
    """Torch's intra-op threads set to 1 (restored on exit): dni's own threads do the work."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class InlineProjection:
    """The inputs of an LSTM layer with two inputs (pen strokes), for the compiled loop to
    compute ``W_x·x_t + b`` itself instead of reading the projections: those of a batch of
    1,000 sequences take 100 MB, streamed from memory at every pass, while the inputs take
    0.4 MB. Made by :func:`inline_projection`, which checks it gives the same bits."""

    x: torch.Tensor  # (steps, batch, 2)
    w: torch.Tensor  # (3, 4H): W_x[:, 0], W_x[:, 1], b


def inline_projection(lib: ctypes.CDLL, x: torch.Tensor, w_x: torch.Tensor, bias: torch.Tensor,
                      xp: torch.Tensor) -> InlineProjection | None:
    """An :class:`InlineProjection` of ``x`` (batch, steps, 2) when the kernels' formula
    reproduces ``xp`` (steps, batch, 4H), the projection torch computed, bit for bit, else
    None (another BLAS, another CPU: the loops then read ``xp``). The check reads ``xp``
    once; it pays off when many noisy passes share the batch, as evaluation's cells do."""
    steps, batch, rows = xp.shape
    if not lib.blas or x.shape[2] != 2 or not xp.is_contiguous():
        return None
    with torch.no_grad():
        xin = x.detach().transpose(0, 1).contiguous()
        w = _two_input_weights(w_x, bias)
    if lib.dni_projection2_mismatches(xin.data_ptr(), w.data_ptr(), xp.data_ptr(), steps * batch, rows):
        return None
    return InlineProjection(xin, w)


def _two_input_weights(w_x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``[W_x[:, 0] | W_x[:, 1] | b]``, (3, 4H): the weights of the loop's own projections."""
    return torch.stack([w_x[:, 0], w_x[:, 1], bias]).detach().contiguous()


def fused_recurrence(lib: ctypes.CDLL, arch: str, xp: torch.Tensor | None, w_h: torch.Tensor, h: torch.Tensor,
                     c: torch.Tensor | None, key: int, starts: list[int], sigma: float, threads: int | None = None,
                     inline: InlineProjection | None = None, w_h16: torch.Tensor | None = None, stream: int = 0) -> None:
    """Run the whole noisy recurrence with the compiled step, updating ``h`` (and ``c``) in place.

    Args:
        xp: input projections, (steps, batch, gates·H), or None with ``inline``;
            w_h: recurrent weights (gates·H, H).
        starts: the stream position (Philox block) of each step's (batch, gates·H) noise.
        threads: worker threads (default: torch's intra-op thread count).
        inline: for an LSTM with two inputs, their projections computed in the loop
            instead of read from ``xp`` (same bits; see :class:`InlineProjection`).
        w_h16: ``w_h`` in bfloat16, for bf16 products (``lib.bf16`` must be True): each step
            multiplies h rounded to bf16 by it, accumulating in fp32 (see dni.precision).
        stream: which of dni's streams the noise comes from (:data:`STREAMS`).

    The batch is cut into contiguous row blocks, one per thread, and each thread runs every
    step of its block: the recurrent GEMM of its rows (single-threaded BLAS) and the fused
    noise + gate kernel, in sub-blocks of :data:`CACHE_ROWS` rows whose GEMM output, h and
    c stay in cache. With the BLAS attached a block is one C call (see
    :func:`_c_row_blocks`); otherwise a Python loop per block (ctypes and torch release the
    GIL). Each row draws its noise from its own position of the stream, so the noise is
    the same for any split (a test pins the logits for 1 and 2 threads and each way of
    running the blocks).
    """
    if xp is None and (inline is None or arch != "lstm" or not lib.blas):
        raise ValueError("without xp the compiled loop needs an inline projection (an LSTM, the BLAS attached)")
    steps, batch = (xp if xp is not None else inline.x).shape[:2]
    hidden = h.shape[1]
    per_row = hidden if arch == "lstm" else hidden // 4  # stream blocks per row and step (4 normals each)
    xp = xp.contiguous() if xp is not None else None
    w_h = w_h.contiguous()
    w_t = w_h.t()
    if w_h16 is not None and not lib.bf16:
        raise ValueError("bf16 products need the BLAS's bf16 GEMM, which this library does not have")
    if lib.blas:  # every step of each row block in one call
        starts_c = (ctypes.c_uint64 * steps)(*starts)
        c_ptr = c.data_ptr() if c is not None else 0
        x_ptr, w_ptr = 0, 0
        if inline is not None and arch == "lstm":
            if inline.x.shape != (steps, batch, 2) or inline.w.shape != (3, w_h.shape[0]):
                raise ValueError(f"inline projection of shape {tuple(inline.x.shape)}, {tuple(inline.w.shape)} does not "
                                 f"match {steps} steps, batch {batch} and W_h {tuple(w_h.shape)}")
            x_ptr, w_ptr = inline.x.data_ptr(), inline.w.data_ptr()
        w16_ptr = 0
        if w_h16 is not None:
            w_h16 = w_h16.contiguous()
            if w_h16.dtype != torch.bfloat16 or w_h16.shape != w_h.shape:
                raise ValueError(f"w_h16 must be w_h {tuple(w_h.shape)} in bfloat16, got {w_h16.dtype} {tuple(w_h16.shape)}")
            w16_ptr = w_h16.data_ptr()
        # MKL's packed GEMM for the LSTM's (rows, H) x (H, 4H) products: the products 4-7%
        # faster here, whole passes ~2%; the RNN's (rows, H) x (H, H) products were ~4%
        # slower packed, so the RNN keeps sgemm.
        packed = arch == "lstm" and w_h16 is None and packed_agrees(
            lib, _sub_block_rows(batch, _row_parts(batch, threads), CACHE_ROWS), w_h.shape[0], hidden)
        _c_row_blocks(lib, lambda k0, k1, parts: lib.dni_recurrence(
            int(arch == "lstm"), xp.data_ptr() if xp is not None else 0, x_ptr, w_ptr, w_h.data_ptr(), int(packed), w16_ptr,
            h.data_ptr(), c_ptr, steps, batch, hidden, key, stream, starts_c, sigma, CACHE_ROWS, k0, k1, parts), batch, threads)
        return

    def run(r0: int, r1: int) -> None:
        mm = xp.new_empty(min(CACHE_ROWS, r1 - r0), xp.shape[2])  # reused by every step
        for b0 in range(r0, r1, CACHE_ROWS):  # cache-sized sub-blocks, each through every step
            b1 = min(b0 + CACHE_ROWS, r1)
            hb, cb, mb = h[b0:b1], (c[b0:b1] if c is not None else None), mm[: b1 - b0]
            h_ptr, c_ptr, m_ptr = hb.data_ptr(), (cb.data_ptr() if cb is not None else 0), mb.data_ptr()
            for t in range(steps):
                # The kernel adds xp[t] to the product: mm + xp rounds as addmm(xp, h, W_h^T)
                # does, and a plain mm into a reused buffer is ~20% faster than addmm here.
                torch.mm(hb, w_t, out=mb)
                start = starts[t] + b0 * per_row
                x = xp[t, b0:b1].data_ptr()
                if arch == "lstm":
                    lib.dni_lstm_step(m_ptr, x, c_ptr, h_ptr, b1 - b0, hidden, key, stream, start, sigma)
                else:
                    lib.dni_rnn_step(m_ptr, x, h_ptr, b1 - b0, hidden, key, stream, start, sigma)

    _in_row_blocks(run, batch, threads)


def _row_parts(batch: int, threads: int | None) -> int:
    threads = torch.get_num_threads() if threads is None else threads
    return max(1, min(threads, batch // MIN_ROWS_PER_THREAD))


def _row_bounds(batch: int, parts: int) -> list[int]:
    """The first rows of ``parts`` near-equal contiguous blocks of the batch, and the batch
    size last (as the C ``block_start``)."""
    return [batch * k // parts for k in range(parts + 1)]


def _c_row_blocks(lib: ctypes.CDLL, call: Callable[[int, int, int], int | None], batch: int, threads: int | None) -> None:
    """Run a compiled loop over the row blocks 0..parts-1 of the batch, ``call(k0, k1, parts)``
    running blocks k0..k1-1: in one call on OpenMP's thread team (torch's), or without
    OpenMP one block per Python thread (ctypes releases the GIL). The BLAS is
    single-threaded meanwhile, so its bits do not depend on the split."""
    parts = _row_parts(batch, threads)
    with torch_single_threaded():
        if lib.openmp:
            codes = [call(0, parts, parts)]
        else:
            codes = _on_threads(parts, lambda k: call(k, k + 1, parts))
    if any(code for code in codes):
        raise MemoryError("the compiled recurrence could not allocate its scratch memory")


def _in_row_blocks(run: Callable[[int, int], None], batch: int, threads: int | None = None) -> None:
    """Call ``run(r0, r1)`` on contiguous row blocks of the batch, one per thread, with
    torch single-threaded meanwhile (each block's GEMMs run on its own thread)."""
    parts = _row_parts(batch, threads)
    if parts == 1:
        run(0, batch)
        return
    bounds = _row_bounds(batch, parts)
    with torch_single_threaded():
        _on_threads(parts, lambda k: run(bounds[k], bounds[k + 1]))


def _on_threads(parts: int, fn: Callable[[int], object]) -> list:
    """``fn(k)`` for k = 0..parts-1, k = 0 on this thread and the others on the pool's
    threads at the same time; their results, in order."""
    if parts == 1:
        return [fn(0)]

    def in_pool(k: int) -> object:
        # Grad mode and OpenMP's thread count are per thread: a pool thread starts with grad
        # on and with as many OpenMP threads as cores, so its GEMMs would start a team of
        # their own, which oversubscribes the cores and keeps spinning afterwards.
        if torch.get_num_threads() != 1:
            torch.set_num_threads(1)
        with torch.no_grad():
            return fn(k)

    pool = _threads_pool(parts - 1)
    futures = [pool.submit(in_pool, k) for k in range(1, parts)]
    return [fn(0), *(f.result() for f in futures)]


def _train_forward(lib: ctypes.CDLL, lstm: bool, xp: torch.Tensor | None, w_h: torch.Tensor, key: int, starts: list[int],
                   sigma: float, inline: InlineProjection | None = None, stream: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The noisy recurrence over ``xp`` (steps, batch, R) with contiguous ``w_h`` (R, H),
    keeping what the backward needs: the states hs, cs (steps + 1, batch, H; row 0 zeros)
    and the activated LSTM gates acts (steps, batch, 4H). With ``inline`` (an LSTM with two
    inputs, and the BLAS attached) the loop computes the projections itself and ``xp`` may
    be None."""
    ref = inline.x if inline is not None else xp
    steps, batch = ref.shape[:2]
    rows, hidden = w_h.shape
    hs = ref.new_empty(steps + 1, batch, hidden)  # every row but the first is written below
    cs = ref.new_empty(steps + 1, batch, hidden) if lstm else ref.new_empty(0)
    hs[0].zero_()
    if lstm:
        cs[0].zero_()
    acts = ref.new_empty(steps, batch, rows) if lstm else ref.new_empty(0)
    if lib.blas:  # the rows split over threads, each block through every step in one call
        starts_c = (ctypes.c_uint64 * steps)(*starts)
        x_ptr, w2_ptr = (inline.x.data_ptr(), inline.w.data_ptr()) if inline is not None else (0, 0)
        xp_ptr = xp.data_ptr() if xp is not None else 0
        _c_row_blocks(lib, lambda k0, k1, parts: lib.dni_train_forward(
            int(lstm), xp_ptr, x_ptr, w2_ptr, w_h.data_ptr(), hs.data_ptr(), cs.data_ptr(), acts.data_ptr(), steps, batch,
            hidden, key, stream, starts_c, sigma, k0, k1, parts), batch, None)
        return hs, cs, acts
    w_t = w_h.t()
    mm = xp.new_empty(batch, rows)  # reused by every step; the kernels add xp[t]
    for t in range(steps):
        torch.mm(hs[t], w_t, out=mm)
        if lstm:
            lib.dni_lstm_train_fwd(mm.data_ptr(), xp[t].data_ptr(), cs[t].data_ptr(), cs[t + 1].data_ptr(),
                                   hs[t + 1].data_ptr(), acts[t].data_ptr(), batch, hidden, key, stream, starts[t], sigma)
        else:
            lib.dni_rnn_step(mm.data_ptr(), xp[t].data_ptr(), hs[t + 1].data_ptr(), batch, hidden, key, stream, starts[t], sigma)
    return hs, cs, acts


#: Whether passes over batches used once (training steps, training's accuracy passes)
#: compute the projections of a two-input LSTM in the loop, checked once per shape (see
#: :func:`projection_or_inline`); False: they read torch's projections.
SHAPE_CHECKED_INLINE = True
#: (rows, columns) of a projection -> whether the loop's formula gave torch.addmm's bits for
#: the first batch of that shape in this process.
_inline_checked: dict[tuple[int, int], bool] = {}


def projection_or_inline(lib: ctypes.CDLL, xt: torch.Tensor, w_x: torch.Tensor, bias: torch.Tensor, steps: int,
                         batch: int) -> tuple[torch.Tensor | None, InlineProjection | None]:
    """The input projections of a batch that is used once, for the compiled loops of an
    LSTM layer with two inputs (pen strokes): ``(None, inline)``, the loop then computes them,
    or ``(xp, None)``, torch's ``addmm(bias, xt, w_x^T)`` as (steps, batch, 4H).

    ``xt``: the inputs, (steps * batch, 2), contiguous. The projections of a training batch
    of 128 take 13 MB, and those of a batch of 1,000 100 MB, which addmm writes twice and
    the loop reads back, against 50 KB and 0.4 MB of inputs. The loop's formula is used
    only where it reproduces torch.addmm bit for bit: checked as :func:`inline_projection`
    checks it, but once per shape and process, not at every batch (a batch used once would
    pay for the check what it saves; the BLAS computes one shape the same way every time).
    """
    shape = (steps * batch, w_x.shape[0])
    applies = SHAPE_CHECKED_INLINE and lib.blas and xt.shape[1] == 2 and xt.is_contiguous()
    if applies and _inline_checked.get(shape):
        return None, InlineProjection(xt.detach().view(steps, batch, 2), _two_input_weights(w_x, bias))
    xp = torch.addmm(bias, xt, w_x.t())
    if applies and shape not in _inline_checked:  # the first batch of this shape: check the formula on it
        w2 = _two_input_weights(w_x, bias)  # held while the kernel reads it
        _inline_checked[shape] = not lib.dni_projection2_mismatches(xt.data_ptr(), w2.data_ptr(), xp.data_ptr(), *shape)
    return xp.view(steps, batch, -1), None


def _train_backward(lib: ctypes.CDLL, lstm: bool, w_h: torch.Tensor, hs: torch.Tensor, cs: torch.Tensor,
                    acts: torch.Tensor, grad_h: torch.Tensor, threads: int) -> torch.Tensor:
    """The gradients of the pre-activations, (steps, batch, R), from that of h_T."""
    steps, batch, hidden = hs.shape[0] - 1, hs.shape[1], hs.shape[2]
    dpre = hs.new_empty(steps, batch, w_h.shape[0])
    dh = grad_h.contiguous().clone()
    dc = torch.zeros_like(dh)
    if lib.blas:
        _c_row_blocks(lib, lambda k0, k1, parts: lib.dni_train_backward(
            int(lstm), w_h.data_ptr(), hs.data_ptr(), cs.data_ptr(), acts.data_ptr(), dh.data_ptr(), dc.data_ptr(),
            dpre.data_ptr(), steps, batch, hidden, k0, k1, parts), batch, threads)
        return dpre
    for t in range(steps - 1, -1, -1):
        if lstm:
            lib.dni_lstm_train_bwd(acts[t].data_ptr(), cs[t].data_ptr(), cs[t + 1].data_ptr(), dh.data_ptr(),
                                   dc.data_ptr(), dpre[t].data_ptr(), batch, hidden)
        else:
            torch.mul(dh, 1.0 - hs[t + 1] * hs[t + 1], out=dpre[t])
        if t:
            torch.mm(dpre[t], w_h, out=dh)
    return dpre


class _NoisyLayerTrain(torch.autograd.Function):
    """The noisy recurrent layer (input projection and recurrence) with a hand-written
    backward, for training on CPU.

    Forward: the input projection ``W_x·x_t + b`` for all steps (as
    :meth:`dni.models.NoisyRecurrent.project` computes it), then per step one GEMM and one
    compiled kernel that adds the noise and applies the gates, saving the activated gates.
    Backward: per step one compiled kernel for the gate derivatives and one GEMM for the
    gradient of h_{t-1}; then one GEMM over all steps for the gradient of the whole weight
    ``[W_x | W_h]`` and the bias (inputs, previous states and ones side by side).
    Against autograd over the per-step torch ops this saves ~40 small operator calls per
    step, every tanh/sigmoid backward, and the separate, zero-padded gradients of the two
    weight slices. With the BLAS attached, forward and backward split the batch into row
    blocks as :func:`fused_recurrence` does, each block through every step in C (from
    Python, the per-step calls and their thread hand-offs cost more than the split gained);
    otherwise torch's threads run the GEMMs and the kernels run on the calling thread.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lib, arch, key, starts, sigma, stream):
        batch, steps, inputs = x.shape
        xt = x.transpose(0, 1).reshape(steps * batch, inputs).contiguous()
        w_h = weight[:, inputs:].contiguous()  # a column slice of W: copied once, not at every GEMM
        lstm = arch == "lstm"
        if lstm and inputs == 2:
            xp, inline = projection_or_inline(lib, xt, weight[:, :inputs], bias, steps, batch)
        else:
            xp, inline = torch.addmm(bias, xt, weight[:, :inputs].t()).view(steps, batch, -1), None
        hs, cs, acts = _train_forward(lib, lstm, xp, w_h, key, starts, sigma, inline, stream)
        ctx.lib, ctx.lstm, ctx.threads = lib, lstm, torch.get_num_threads()
        ctx.save_for_backward(xt, weight, w_h, hs, cs, acts)
        return hs[-1].clone()

    @staticmethod
    def backward(ctx, grad_h):
        xt, weight, w_h, hs, cs, acts = ctx.saved_tensors
        dpre = _train_backward(ctx.lib, ctx.lstm, w_h, hs, cs, acts, grad_h, ctx.threads)
        steps, batch, rows = dpre.shape
        inputs = xt.shape[1]
        d2 = dpre.view(steps * batch, rows)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (d2 @ weight[:, :inputs]).view(steps, batch, inputs).transpose(0, 1)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            # Inputs, previous states and a column of ones side by side: one GEMM gives the
            # gradients of W_x, W_h and b (computed transposed: faster for this long K).
            operands = torch.cat([xt, hs[:-1].reshape(steps * batch, -1), xt.new_ones(steps * batch, 1)], dim=1)
            grads = operands.t() @ d2  # (inputs + H + 1, R)
            grad_w, grad_b = grads[:-1].t().contiguous(), grads[-1].clone()
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


def fused_layer_train(lib: ctypes.CDLL, arch: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                      key: int, starts: list[int], sigma: float, stream: int = 0) -> torch.Tensor:
    """The last output state h_T of the noisy layer on inputs ``x`` (batch, steps, inputs),
    differentiable in ``x``, ``weight`` = [W_x | W_h] and ``bias``.

    Same noise (stream positions ``starts``) and maths as the inference path
    (:meth:`~dni.models.NoisyRecurrent.project`, then :func:`fused_recurrence`); the
    gradients are those of the per-step torch ops, to float rounding.
    """
    return _NoisyLayerTrain.apply(x, weight, bias, lib, arch, key, starts, sigma, stream)


# --------------------------------------------------------------------------- pure torch


_M0, _M1, _W0, _W1 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85
_MASK = 0xFFFFFFFF


def philox_blocks_torch(key: int, counter: int, nblocks: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Philox4x32-10 blocks ``counter .. counter + nblocks - 1`` of ``key``: int64 (nblocks, 4)."""
    cnt = torch.arange(nblocks, dtype=torch.int64, device=device) + counter
    c0, c1 = cnt & _MASK, (cnt >> 32) & _MASK
    c2, c3 = torch.zeros_like(c0), torch.zeros_like(c0)
    k0, k1 = key & _MASK, (key >> 32) & _MASK
    for _ in range(10):
        p0, p1 = c0 * _M0, c2 * _M1  # < 2^64: exact in int64 two's complement, bits kept by masking
        hi0, lo0 = (p0 >> 32) & _MASK, p0 & _MASK
        hi1, lo1 = (p1 >> 32) & _MASK, p1 & _MASK
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _W0) & _MASK, (k1 + _W1) & _MASK
    return torch.stack([c0, c1, c2, c3], dim=1)


def normal_on(n: int, key: int, counter: int, device: torch.device | str = "cpu", out: torch.Tensor | None = None,
              stream: str = "philox") -> torch.Tensor:
    """The samples of :func:`normal_torch`, drawn the fastest way ``device`` has without the
    compiled CPU kernel: for Philox on a GPU one Triton kernel (:mod:`dni.gpu_philox`) where
    Triton is installed, which it is with torch's CUDA builds; else the torch ops. Written
    into ``out`` (contiguous, ``n`` float32) where given."""
    device = torch.device(device)
    if device.type != "cpu" and stream == "philox":  # (not imported on a CPU: importing Triton takes a while)
        from dni import gpu_philox

        if gpu_philox.available(device):
            return gpu_philox.normal(n, key, counter, device, out)
    z = normal_torch(n, key, counter, device, stream)
    return z if out is None else out.copy_(z)


def normal_torch(n: int, key: int, counter: int, device: torch.device | str = "cpu", stream: str = "philox") -> torch.Tensor:
    """The first ``n`` samples from block ``counter`` of stream ``key``, computed with torch
    ops: Philox/Box-Muller, or with ``stream="ars"`` :func:`ars_normal_torch`."""
    if stream == "ars":
        return ars_normal_torch(n, key, counter, device)
    blocks = philox_blocks_torch(key, counter, (n + 3) // 4, device).to(torch.float64)
    inv32 = 2.0**-32
    u1a, va, u1b, vb = (blocks[:, 0] + 0.5) * inv32, blocks[:, 1] * inv32, (blocks[:, 2] + 0.5) * inv32, blocks[:, 3] * inv32
    ra, rb = torch.sqrt(-2 * torch.log(u1a)), torch.sqrt(-2 * torch.log(u1b))
    z = torch.stack([ra * torch.cos(2 * math.pi * va), ra * torch.sin(2 * math.pi * va),
                     rb * torch.cos(2 * math.pi * vb), rb * torch.sin(2 * math.pi * vb)], dim=1)
    return z.reshape(-1)[:n].to(torch.float32)


# ARS-7 (Salmon et al. 2011; Random123's ars1xm128i_R(7, ctr, key)) in torch ops: AES rounds
# on (N, 16) byte states, byte i of a block being byte i of the 128-bit little-endian value.


@functools.cache
def _aes_sbox() -> list[int]:
    """The AES S-box: the inverse in GF(2^8) (modulus x^8 + x^4 + x^3 + x + 1), then the
    affine map with constant 0x63."""

    def mul(a: int, b: int) -> int:
        p = 0
        for _ in range(8):
            if b & 1:
                p ^= a
            a = ((a << 1) ^ (0x11B if a & 0x80 else 0)) & 0xFF
            b >>= 1
        return p

    inverse = [0] + [next(b for b in range(1, 256) if mul(a, b) == 1) for a in range(1, 256)]
    rot = lambda x, k: ((x << k) | (x >> (8 - k))) & 0xFF  # noqa: E731
    return [b ^ rot(b, 1) ^ rot(b, 2) ^ rot(b, 3) ^ rot(b, 4) ^ 0x63 for b in inverse]


_SHIFT_ROWS = [(r + 4 * ((c + r) % 4)) for c in range(4) for r in range(4)]  # out[r + 4c] = in[r + 4((c + r) % 4)]
_WEYL = (0x9E3779B97F4A7C15, 0xBB67AE8584CAA73B)  # low, high 64 bits


def _bytes_of(value: int, device) -> torch.Tensor:
    """A 128-bit value as its 16 bytes, least significant first: int64 (16,)."""
    return torch.tensor([(value >> (8 * i)) & 0xFF for i in range(16)], dtype=torch.int64, device=device)


def ars_blocks_torch(key: int, counter: int, nblocks: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """ARS-7 blocks ``counter .. counter + nblocks - 1`` of ``key`` (128-bit counter and key
    (p, 0) and (key, 0)): int64 (nblocks, 4) of 32-bit words, as ``dni_ars4x32_7`` gives."""
    sbox, shift = torch.tensor(_aes_sbox(), dtype=torch.int64, device=device), torch.tensor(_SHIFT_ROWS, device=device)
    cnt = torch.arange(nblocks, dtype=torch.int64, device=device) + counter
    state = torch.zeros(nblocks, 16, dtype=torch.int64, device=device)
    for i in range(8):
        state[:, i] = (cnt >> (8 * i)) & 0xFF
    lo, hi = key & (2**64 - 1), 0
    round_keys = []
    for _ in range(8):
        round_keys.append(_bytes_of(lo | (hi << 64), device))
        lo, hi = (lo + _WEYL[0]) & (2**64 - 1), (hi + _WEYL[1]) & (2**64 - 1)
    state = state ^ round_keys[0]
    for r in range(1, 8):
        state = sbox[state][:, shift]  # SubBytes, ShiftRows
        if r < 7:  # MixColumns (not in the last round)
            a = state.view(nblocks, 4, 4)  # (block, column, row)
            b = ((a << 1) ^ torch.where(a & 0x80 != 0, 0x1B, 0)) & 0xFF  # 2a in GF(2^8)
            a0, a1, a2, a3 = a.unbind(2)
            b0, b1, b2, b3 = b.unbind(2)
            state = torch.stack([b0 ^ a1 ^ b1 ^ a2 ^ a3, a0 ^ b1 ^ a2 ^ b2 ^ a3,
                                 a0 ^ a1 ^ b2 ^ a3 ^ b3, a0 ^ b0 ^ a1 ^ a2 ^ b3], dim=2).view(nblocks, 16)
        state = state ^ round_keys[r]
    b = state.view(nblocks, 4, 4)
    return b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16) | (b[..., 3] << 24)


def ars_normal_torch(n: int, key: int, counter: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The first ``n`` samples from block ``counter`` of the ARS stream ``key`` (see
    ``dni/csrc``): in chunk q of 8 blocks, the 16 words of its first 4 blocks are u_j,
    those of the last 4 v_j, and samples 32q + j and 32q + 16 + j are
    sqrt(-2 ln u1_j) (cos, sin)(2 pi v_j)."""
    first = counter // 8
    chunks = (4 * (counter - 8 * first) + n + 31) // 32
    words = ars_blocks_torch(key, 8 * first, 8 * chunks, device).view(chunks, 2, 16).to(torch.float64)
    inv32 = 2.0**-32
    r = torch.sqrt(-2 * torch.log((words[:, 0] + 0.5) * inv32))
    angle = 2 * math.pi * words[:, 1] * inv32
    z = torch.cat([r * torch.cos(angle), r * torch.sin(angle)], dim=1).reshape(-1)
    skip = 4 * (counter - 8 * first)
    return z[skip : skip + n].to(torch.float32)
