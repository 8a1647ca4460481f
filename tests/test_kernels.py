"""Validation of dni's noise streams (Philox/Box-Muller and ARS/Box-Muller) and the fused
step kernels."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import stats

from dni import kernels, mkl_path
from dni.models import build_model
from dni.noise import AdditiveGaussian, ArsGenerator, PhiloxGenerator

N = 2_000_000


@pytest.fixture(params=[PhiloxGenerator, ArsGenerator], ids=["philox", "ars"])
def gen_cls(request, lib):
    """Each of dni's streams, drawn by the compiled kernels (ARS needs AES instructions)."""
    if not kernels.draws(lib, request.param.stream):
        pytest.skip("this CPU has no AES instructions: the library does not draw ARS")
    return request.param


def _stream(seed, n=N, start=0, cls=PhiloxGenerator):
    g = cls(seed)
    g.counter = start
    return g.normal((n,), torch.device("cpu"), torch.float32).numpy().astype(np.float64)


def test_philox_known_answers(lib):
    # Random123's known-answer vectors for philox4x32_10.
    cases = [
        ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
        ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
        ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0], [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
    ]
    for ctr, key, expected in cases:
        c, k, out = (np.array(v, dtype=np.uint32) for v in (ctr, key, [0, 0, 0, 0]))
        lib.dni_philox4x32_10(c.ctypes.data, k.ctypes.data, out.ctypes.data)
        assert out.tolist() == expected


def test_ars_known_answers(lib):
    """Random123's known answers for ars1xm128i_R(7, ctr, key), as bytes in memory order,
    from the compiled kernel (where the CPU has AES instructions) and the torch ops."""
    cases = [(1, 1, "2b1623350cd214dc7740187993411872"), (256, 1, "2de6b66fa461b668f380126f32b9cd22")]
    for ctr, key, expected in cases:
        words = kernels.ars_blocks_torch(key, ctr, 1)[0]
        assert np.array(words.tolist(), dtype="<u4").tobytes().hex() == expected
        if lib.ars:
            c, k, out = (np.array(v, dtype=np.uint32) for v in ([ctr, 0, 0, 0], [key, 0, 0, 0], [0, 0, 0, 0]))
            lib.dni_ars4x32_7(c.ctypes.data, k.ctypes.data, out.ctypes.data)
            assert out.astype("<u4").tobytes().hex() == expected


def test_aes_sbox():
    sbox = kernels._aes_sbox()
    assert sorted(sbox) == list(range(256))
    assert (sbox[0x00], sbox[0x01], sbox[0x53], sbox[0xFF]) == (0x63, 0x7C, 0xED, 0x16)


def test_torch_implementation_draws_the_same_ars_stream(lib):
    """The compiled ARS words and samples against the torch ops, at aligned and unaligned
    positions (a chunk of the stream is 8 blocks) and across the 32-bit counter word."""
    if not lib.ars:
        pytest.skip("this CPU has no AES instructions")
    key = 0x123456789ABCDEF
    for start, n in ((2**33 - 5, 4001), (0, 1024), (13, 77), (8, 3), (6, 1)):
        blocks = kernels.ars_blocks_torch(key, start, 3)
        for j in range(3):
            c = np.array([(start + j) & 0xFFFFFFFF, (start + j) >> 32, 0, 0], dtype=np.uint32)
            k = np.array([key & 0xFFFFFFFF, key >> 32, 0, 0], dtype=np.uint32)
            out = np.zeros(4, dtype=np.uint32)
            lib.dni_ars4x32_7(c.ctypes.data, k.ctypes.data, out.ctypes.data)
            assert out.tolist() == blocks[j].tolist()
        compiled = _stream(key, n, start, ArsGenerator)
        np.testing.assert_allclose(kernels.ars_normal_torch(n, key, start).numpy(), compiled, rtol=1e-5, atol=2e-6)


def test_the_two_streams_differ(lib):
    assert abs(_corr(_stream(5, 100_000), _stream(5, 100_000, cls=ArsGenerator))) < 5 / math.sqrt(100_000)


def test_torch_implementation_draws_the_same_stream(lib):
    key, start = 0x123456789ABCDEF, 2**33 - 5  # counter crossing 32 bits
    blocks = kernels.philox_blocks_torch(key, start, 64)
    for j in (0, 5, 63):
        c = np.array([(start + j) & 0xFFFFFFFF, (start + j) >> 32, 0, 0], dtype=np.uint32)
        k = np.array([key & 0xFFFFFFFF, key >> 32], dtype=np.uint32)
        out = np.zeros(4, dtype=np.uint32)
        lib.dni_philox4x32_10(c.ctypes.data, k.ctypes.data, out.ctypes.data)
        assert out.tolist() == blocks[j].tolist()
    compiled = _stream(key, 4001, start)
    np.testing.assert_allclose(kernels.normal_torch(4001, key, start).numpy(), compiled, rtol=1e-5, atol=2e-6)


def test_moments_and_distribution(gen_cls):
    z = _stream(1, cls=gen_cls)
    se = 1 / math.sqrt(N)
    assert abs(z.mean()) < 5 * se
    assert abs(z.var() - 1) < 5 * math.sqrt(2) * se
    assert abs(stats.skew(z)) < 5 * math.sqrt(6) * se
    assert abs(stats.kurtosis(z)) < 5 * math.sqrt(24) * se
    assert stats.kstest(z, "norm").pvalue > 1e-3
    # tail probabilities against the exact normal ones (binomial standard errors)
    for t in (1.0, 2.0, 3.0, 4.0):
        p = 2 * stats.norm.sf(t)
        assert abs((np.abs(z) > t).mean() - p) < 5 * math.sqrt(p * (1 - p) / N), t
    # chi-square over 100 equiprobable bins
    edges = stats.norm.ppf(np.linspace(0, 1, 101)[1:-1])
    counts = np.bincount(np.searchsorted(edges, z), minlength=100)
    assert stats.chisquare(counts).pvalue > 1e-3


def _corr(a, b):
    return float(np.corrcoef(a, b)[0, 1])


def test_independence_across_steps_samples_and_repeats(gen_cls):
    z = _stream(2, 4 * 512 * 1000, cls=gen_cls).reshape(4, 1000, 512)  # (step, sample, unit)
    bound = 5 / math.sqrt(1000 * 512)
    assert abs(_corr(z[0].ravel(), z[1].ravel())) < bound  # consecutive steps
    assert abs(_corr(z[0, :-1].ravel(), z[0, 1:].ravel())) < bound  # neighbouring samples
    assert abs(_corr(z[0, :, :-1].ravel(), z[0, :, 1:].ravel())) < bound  # neighbouring units, incl. Box-Muller pairs
    assert abs(_corr(z[0, :, 0::2].ravel() ** 2, z[0, :, 1::2].ravel() ** 2)) < bound  # Philox's pairs share a radius
    pairs = z[0].reshape(-1, 2, 16)  # ARS's pairs: samples j and 16 + j of each chunk of 32
    assert abs(_corr(pairs[:, 0].ravel() ** 2, pairs[:, 1].ravel() ** 2)) < bound
    assert abs(_corr(pairs[:, 0].ravel(), pairs[:, 1].ravel())) < bound
    from dni.evaluate import cell_seed

    r0 = _stream(cell_seed(0, "m", 0.5, 0), 500_000, cls=gen_cls)
    r1 = _stream(cell_seed(0, "m", 0.5, 1), 500_000, cls=gen_cls)
    assert abs(_corr(r0, r1)) < 5 / math.sqrt(500_000)  # repeats
    assert not np.array_equal(r0[:100], r1[:100])


def test_lag_autocorrelation(gen_cls):
    z = _stream(3, 1_000_000, cls=gen_cls)
    for lag in (1, 2, 3, 4, 5, 8, 16, 32, 128, 512):
        assert abs(_corr(z[:-lag], z[lag:])) < 5 / math.sqrt(len(z)), lag


def test_same_seed_same_samples_however_the_stream_is_cut(gen_cls):
    whole = _stream(7, 10_000, cls=gen_cls)
    g = gen_cls(7)
    parts = [g.normal((n,), torch.device("cpu"), torch.float32).numpy() for n in (4, 1000, 12, 3984, 5000)]
    np.testing.assert_array_equal(np.concatenate(parts), whole.astype(np.float32))


# Code paths of the kernels by instruction set, each compiled here with the machine's others
# switched off (FMA kept: the Box-Muller and gate maths contract a * b + c where the CPU has
# it). AVX-512 machines take their own paths; these are the ones AVX2 CPUs take.
_ISA_VARIANTS = {
    "avx2": ["-mno-avx512f"],  # Philox in AVX2 vectors; ARS with VAES on 256-bit vectors where the CPU has VAES
    "aes-ni": ["-mno-avx512f", "-mno-vaes"],  # ARS one block an AES-NI instruction
    "portable": ["-mno-avx512f", "-mno-avx2"],  # Philox as gcc vectorises the portable loop
}


@pytest.mark.skipif(not {"avx2", "fma"} <= mkl_path.cpu()[1], reason="the variants switch instruction sets off an x86 CPU with AVX2 and FMA")
@pytest.mark.parametrize("variant", list(_ISA_VARIANTS))
def test_every_instruction_set_path_draws_the_same_bits(lib, variant):
    """The vector paths (AVX-512, AVX2, VAES, AES-NI, the portable loop) draw the same
    streams and take the same fused steps, bit for bit: the CPU a result was computed on
    does not change its noise."""
    try:
        other = kernels._compile_with([*kernels._FLAGS, "-fopenmp-simd", *_ISA_VARIANTS[variant]])
    except OSError as exc:
        pytest.skip(f"cannot build the {variant} variant here: {exc}")
    assert other.ars == lib.ars
    for stream in [kernels.STREAMS["philox"]] + ([kernels.STREAMS["ars"]] if lib.ars else []):
        for n, counter in ((100_003, 2**32 - 7), (4 * 256 * 3 + 28, 5), (9, 2**40 + 3)):  # tails of chunks and vectors
            a, b = torch.empty(n), torch.full((n,), 0.25)
            lib.dni_normal(a.data_ptr(), n, 99, stream, counter, 0.7, 0)
            other.dni_normal(b.data_ptr(), n, 99, stream, counter, 0.7, 1)  # add to 0.25
            assert torch.equal(a + 0.25, b), (stream, n)
            other.dni_normal(b.data_ptr(), n, 99, stream, counter, 0.7, 0)
            assert torch.equal(a, b), (stream, n)
        gen = torch.Generator().manual_seed(3)
        batch, hidden = 37, 130
        pre = (torch.rand(batch, 4 * hidden, generator=gen) - 0.5) * 8
        c0 = torch.rand(batch, hidden, generator=gen) - 0.5
        outs = []
        for library in (lib, other):
            c, h, h_rnn = c0.clone(), torch.empty(batch, hidden), torch.empty(batch, 4 * hidden)
            library.dni_lstm_step(pre.data_ptr(), None, c.data_ptr(), h.data_ptr(), batch, hidden, 5, stream, 2**32 - 3, 0.7)
            library.dni_rnn_step(pre.data_ptr(), None, h_rnn.data_ptr(), batch, 4 * hidden, 5, stream, 2**32 - 3, 0.7)
            outs.append((c, h, h_rnn))
        assert all(torch.equal(x, y) for x, y in zip(*outs))


def _worker_stream(args):
    seed, cls = args
    return _stream(seed, 1000, cls=cls).tolist()


def test_same_samples_in_worker_processes(gen_cls):
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as pool:
        a, b = pool.map(_worker_stream, [(11, gen_cls), (12, gen_cls)])
    assert a == _stream(11, 1000, cls=gen_cls).tolist()
    assert abs(_corr(np.array(a), np.array(b))) < 0.2 and a != b


@pytest.mark.parametrize("hidden", [6, 128, 256, 300, 520])
def test_lstm_step_adds_exactly_the_stream_of_its_rows(lib, gen_cls, hidden):
    """Row b of a step adds samples b·4H .. (b + 1)·4H - 1 of the stream (drawn in pieces
    when 4H exceeds the kernel's chunk): the noisy step equals the noise-free step on
    pre-activations to which dni_normal's samples were added, bit for bit."""
    gen = torch.Generator().manual_seed(hidden)
    batch, counter = 37, 2**32 - 5 * hidden  # the low counter word wraps inside the step
    pre = (torch.rand(batch, 4 * hidden, generator=gen) - 0.5) * 8
    xp = (torch.rand(batch, 4 * hidden, generator=gen) - 0.5) * 8
    c0 = torch.rand(batch, hidden, generator=gen) - 0.5
    z = torch.empty(batch * 4 * hidden)
    stream = kernels.STREAMS[gen_cls.stream]
    lib.dni_normal(z.data_ptr(), z.numel(), 21, stream, counter, 0.7, 0)
    noisy_in = (pre + xp) + z.view(batch, 4 * hidden)
    c, h = c0.clone(), torch.empty(batch, hidden)
    lib.dni_lstm_step(pre.data_ptr(), xp.data_ptr(), c.data_ptr(), h.data_ptr(), batch, hidden, 21, stream, counter, 0.7)
    c_ref, h_ref = c0.clone(), torch.empty(batch, hidden)
    lib.dni_lstm_step(noisy_in.data_ptr(), None, c_ref.data_ptr(), h_ref.data_ptr(), batch, hidden, 21, stream, 0, 0.0)
    assert torch.equal(c, c_ref) and torch.equal(h, h_ref)


@pytest.mark.parametrize("arch,inputs", [("lstm", 28), ("lstm", 2), ("rnn", 28)])
def test_fused_step_equals_the_generic_path(gen_cls, arch, inputs, monkeypatch):
    torch.manual_seed(0)
    model = build_model(arch, inputs)
    x = torch.rand(64, 28 if inputs == 28 else 50, inputs)
    noise = AdditiveGaussian(0.8)
    with torch.no_grad():
        fused = model(x, noise, gen_cls(5))
        monkeypatch.setattr("dni.models._fused_kernel", lambda *a: None)
        generic = model(x, noise, gen_cls(5))
    torch.testing.assert_close(fused, generic, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["lstm", "rnn"])
def test_row_blocks_across_threads_draw_the_same_noise(lib, loop_mode, gen_cls, arch, monkeypatch):
    """The fused recurrence splits the batch into one row block per thread: the noise must
    not depend on the split. With zero recurrent weights the GEMM adds exact zeros, so
    every split must give the same bits; with real weights it matches the generic path."""
    torch.manual_seed(0)
    model = build_model(arch, 28).eval()
    x = torch.rand(300, 28, 28)
    noise = AdditiveGaussian(0.7)
    with torch.no_grad():
        xp = model.project(x)
        for w_h in (torch.zeros_like(model.weight[:, 28:]), model.weight[:, 28:]):
            results = []
            for threads in (1, 2, 3):
                h = torch.zeros(300, 128)
                c = torch.zeros(300, 128) if arch == "lstm" else None
                gen = gen_cls(9)
                starts = [gen.take(300 * w_h.shape[0]) for _ in range(28)]
                kernels.fused_recurrence(lib, arch, xp, w_h, h, c, gen.key, starts, 0.7, threads=threads,
                                         stream=kernels.STREAMS[gen.stream])
                results.append(h)
            if not w_h.any():
                assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
            else:
                torch.testing.assert_close(results[1], results[0], rtol=1e-4, atol=1e-4)
        threads_before = torch.get_num_threads()
        torch.set_num_threads(2)
        try:
            fused = model(x, noise, gen_cls(5))
            assert torch.get_num_threads() == 2  # restored after the single-threaded blocks
        finally:
            torch.set_num_threads(threads_before)
        monkeypatch.setattr("dni.models._fused_kernel", lambda *a: None)
        generic = model(x, noise, gen_cls(5))
    torch.testing.assert_close(fused, generic, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["lstm", "rnn"])
@pytest.mark.parametrize("nonzero_row", [None, 0, 299])
def test_first_step_product_is_skipped_only_for_a_zero_state(lib, arch, nonzero_row, monkeypatch):
    """The C loop skips the first step's GEMM where a sub-block's initial h is all zeros.
    The result must be the bits of the per-step loop that always multiplies, and a single
    nonzero row (first or last sub-block of 256 rows) must still be multiplied."""
    if not lib.blas:
        pytest.skip("torch's library has no usable sgemm")
    torch.manual_seed(3)
    model = build_model(arch, 28).eval()
    with torch.no_grad():
        xp = model.project(torch.rand(300, 28, 28))
        w_h = model.weight[:, 28:]
        h0 = torch.zeros(300, 128)
        h0[:, :5] = -0.0  # negative zeros count as zeros
        if nonzero_row is not None:
            h0[nonzero_row, 7] = 0.25
        c0 = torch.zeros(300, 128) if arch == "lstm" else None
        results = []
        for blas in (True, False):
            monkeypatch.setattr(lib, "blas", blas)
            h, c = h0.clone(), (c0.clone() if c0 is not None else None)
            kernels.fused_recurrence(lib, arch, xp, w_h, h, c, 11, [k * 300 * 128 for k in range(28)], 0.7, threads=1)
            results.append(h)
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("batch, threads", [(1000, 2), (300, 1), (259, 1), (40, 2)])
def test_packed_products_give_the_bits_of_sgemm(lib, batch, threads, monkeypatch):
    """The LSTM's compiled loop multiplies by W_h packed once per sub-block (MKL's packed
    GEMM) where that gives sgemm's bits on every sub-block's shape; the result must be the
    same bits as with sgemm on every step. Batch 259 in one block leaves a 3-row sub-block,
    whose shape MKL computes differently packed: that pass must fall back to sgemm."""
    if not lib.blas:
        pytest.skip("torch's library has no usable sgemm")
    torch.manual_seed(4)
    model = build_model("lstm", 28).eval()
    with torch.no_grad():
        xp = model.project(torch.rand(batch, 28, 28))
        w_h = model.weight[:, 28:]
        results = []
        for packed in (False, True):
            monkeypatch.setattr(lib, "packed", packed)
            h, c = torch.zeros(batch, 128), torch.zeros(batch, 128)
            kernels.fused_recurrence(lib, "lstm", xp, w_h, h, c, 11, [k * batch * 128 for k in range(28)], 0.7,
                                     threads=threads)
            results.append(torch.cat([h, c]))
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("batch, parts", [(1000, 2), (1000, 1), (259, 1), (300, 3), (40, 2), (513, 2)])
def test_sub_block_rows_are_the_sizes_the_loops_multiply(batch, parts):
    """The shapes the packed GEMM is checked on must be those the C loops cut the batch into:
    ``parts`` blocks starting at batch * k // parts, each in pieces of CACHE_ROWS rows."""
    sizes = set()
    for k in range(parts):
        r0, r1 = batch * k // parts, batch * (k + 1) // parts
        for b0 in range(r0, r1, kernels.CACHE_ROWS):
            sizes.add(min(kernels.CACHE_ROWS, r1 - b0))
    assert kernels._sub_block_rows(batch, parts, kernels.CACHE_ROWS) == sizes


def test_packed_gemm_is_used_on_the_shapes_of_a_pass(lib):
    """With MKL (torch's x86 wheels) the packed GEMM agrees with sgemm on the sub-blocks of
    the passes that evaluation runs (batch 1000 on 1 or 2 threads), so they do use it."""
    if not lib.packed:
        pytest.skip("torch's library has no packed GEMM")
    for parts in (1, 2):
        assert kernels.packed_agrees(lib, kernels._sub_block_rows(1000, parts, kernels.CACHE_ROWS), 512, 128)


@pytest.mark.parametrize("sigma", [0.0, 0.6])
def test_stroke_projections_computed_in_the_loop_give_the_same_bits(lib, loop_mode, two_threads, sigma, fixture_data):
    """An LSTM with two inputs computes W_x·x_t + b in the loop instead of reading it: the
    logits must not change by a bit, for real stroke inputs and for random ones."""
    from dni.data import load_dataset

    torch.manual_seed(3)
    model = build_model("lstm", 2).eval()
    for x in (load_dataset("strokes", "test").x, torch.randn(257, 50, 2)):
        with torch.no_grad():
            xp = model.project(x)
            inline = model.inline_projection(x, xp)
            if loop_mode != "python":
                assert inline is not None, "the formula must reproduce torch's projection on this CPU"
            read = model.recur(xp, AdditiveGaussian(sigma), PhiloxGenerator(11))
            computed = model.recur(xp, AdditiveGaussian(sigma), PhiloxGenerator(11), inline=inline)
        assert torch.equal(read, computed)


def test_projections_that_the_formula_misses_by_one_bit_are_read_instead(lib):
    if not lib.blas:
        pytest.skip("torch's library has no usable sgemm")
    torch.manual_seed(3)
    model = build_model("lstm", 2).eval()
    x = torch.rand(40, 50, 2)
    with torch.no_grad():
        xp = model.project(x)
        assert model.inline_projection(x, xp) is not None
        off = xp.clone()
        off[17, 3, 100] = torch.nextafter(off[17, 3, 100], torch.tensor(1.0))
        assert model.inline_projection(x, off) is None
        assert build_model("lstm", 28).inline_projection(torch.rand(4, 28, 28), torch.zeros(28, 4, 512)) is None
        assert build_model("rnn", 2).inline_projection(x, torch.zeros(50, 40, 128)) is None
        other = model.inline_projection(x[:20], model.project(x[:20]))  # another batch's inputs
        with pytest.raises(ValueError, match="does not match"):
            model.recur(xp, AdditiveGaussian(0.5), PhiloxGenerator(1), inline=other)


@pytest.mark.parametrize("rng", ["philox", "ars"])
def test_fallback_without_a_compiler_gives_the_same_results(tmp_path, rng):
    code = (
        "import torch; from dni.models import build_model; from dni.noise import AdditiveGaussian, make_generator; "
        "from dni import kernels; torch.manual_seed(0); m = build_model('lstm', 28); x = torch.rand(32, 28, 28); "
        f"y = m(x, AdditiveGaussian(0.5), make_generator({rng!r}, 9)).detach(); print(kernels.available(), *y.flatten().tolist())"
    )
    outs = []
    for env in ({"DNI_NO_KERNELS": "1"}, {}):
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**__import__("os").environ, **env})
        assert res.returncode == 0, res.stderr
        outs.append(res.stdout.split())
    assert outs[0][0] == "False" and outs[1][0] == "True"
    np.testing.assert_allclose(np.array(outs[0][1:], float), np.array(outs[1][1:], float), rtol=1e-4, atol=1e-4)


def test_the_library_is_built_from_the_source_read_at_import(tmp_path):
    """A sweep that runs while dni is upgraded must not build the new C file and call it
    with the old ctypes signatures: the source is read when dni.kernels is imported."""
    import os
    import shutil

    from dni import kernels

    pkg = tmp_path / "copy" / "dni"
    shutil.copytree(kernels._SRC.parent.parent, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    code = (
        f"import sys; sys.path.insert(0, {str(pkg.parent)!r}); import dni.kernels as k; "
        "open(k._SRC, 'a').write('\\n#error changed after import\\n'); "
        "lib = k.library(); print(lib is not None, k.build_error())"
    )
    env = {**os.environ, "DNI_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("DNI_NO_KERNELS", None)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[0] == "True", res.stdout


def test_loading_the_kernels_keeps_subnormal_floats(lib):
    """The library must not switch the process to flush-to-zero (as -ffast-math would)."""
    tiny = np.float32(1e-40)  # subnormal in float32
    assert tiny * np.float32(1.0) != 0
    assert (torch.tensor([1e-40], dtype=torch.float32) * 1.0).item() != 0


@pytest.mark.parametrize("arch", ["lstm", "rnn"])
def test_clean_passes_without_a_generator_take_the_compiled_loop(lib, arch, monkeypatch):
    """Training's clean accuracy passes (sigma 0, no generator) run the compiled loop, and
    give what it gives with any Philox generator at sigma 0 (which draws nothing)."""
    from dni import kernels as kernels_module

    calls = []
    real = kernels_module.fused_recurrence
    monkeypatch.setattr(kernels_module, "fused_recurrence", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    model = build_model(arch, 28).eval()
    x = torch.rand(100, 28, 28)
    with torch.no_grad():
        clean = model(x, AdditiveGaussian(0.0), None)
        assert calls
        assert torch.equal(clean, model(x, AdditiveGaussian(0.0), PhiloxGenerator(7)))
