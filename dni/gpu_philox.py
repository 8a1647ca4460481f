"""dni's Philox/Box-Muller stream as one Triton kernel, for GPUs.

The stream is defined in ``dni/csrc/philox_normal.c`` and, with torch ops, by
:func:`dni.kernels.normal_torch`. On a GPU those torch ops are ~150 element-wise kernels
over int64 and float64 temporaries per draw, memory-bound at a few G samples/s, while the
paper protocol's evaluation alone draws ~1.9 T samples (4,400 noisy cells per case x 10,000
sequences x steps x gates x H). This kernel computes the same samples in one pass: each
program takes a range of Philox blocks, runs the ten rounds in registers (64-bit products
of 32-bit words, as the torch version does) and writes four samples per block from the
float64 Box-Muller transform, rounded to float32. The values are those of
:func:`~dni.kernels.normal_torch` up to the last bit of the float64 transcendental
functions before that rounding (libdevice on the GPU, torch's on the CPU), so nearly
always the same float32.

Triton comes with the CUDA builds of torch; where it is missing (the CPU wheel) nothing
here is used. Before its first use on a GPU the kernel is checked once per process
(:func:`available`): it must compile, run and draw what the torch ops draw; where it does
not, a warning says why and the torch ops draw instead. With ``TRITON_INTERPRET=1`` in the
environment before Triton is imported, the kernel runs on CPU tensors through Triton's
interpreter (tests).
"""

from __future__ import annotations

import torch

from dni.gpu_triton import checked_once, triton, verified

if triton is not None:
    import triton.language as tl

BLOCKS_PER_PROGRAM = 1024  # Philox blocks (4 samples each) per Triton program


def available(device: torch.device) -> bool:
    """Whether draws on ``device`` take :func:`normal`: on a GPU, with Triton, once the
    kernel has passed :func:`self_check` there. (The interpreter runs it on CPU tensors
    too, but only for tests, which call it directly.)"""
    return triton is not None and device.type == "cuda" and checked_once("philox", device, self_check)


def self_check(device: torch.device) -> bool:
    """Whether the kernel compiles and runs on ``device`` and draws the samples of the torch
    ops (a tail, several programs, a counter whose high word turns over); where it does
    not, a warning says why."""
    from dni.kernels import normal_torch

    n, key, counter = 3 * 4 * BLOCKS_PER_PROGRAM + 5, 0xDEADBEEFCAFE, 2**32 - 3

    def check() -> bool:
        return torch.allclose(normal(n, key, counter, device).cpu(), normal_torch(n, key, counter), rtol=1e-6, atol=1e-6)

    return verified(check, "the Triton kernel of the Philox stream is", "it draws other samples than the torch ops",
                    "torch ops draw it instead", device)


def normal(n: int, key: int, counter: int, device: torch.device, out: torch.Tensor | None = None) -> torch.Tensor:
    """Samples ``4 counter ..`` of the stream of ``key`` (``n`` of them), float32 on
    ``device`` (written into ``out``, contiguous, where given)."""
    out = torch.empty(n, dtype=torch.float32, device=device) if out is None else out
    if n:
        blocks = (n + 3) // 4
        grid = (-(-blocks // BLOCKS_PER_PROGRAM),)  # (triton.cdiv, without its cost per call from Python)
        # No contraction into fused multiply-adds: each float64 operation rounds as torch's does
        # (Triton's default for it changes between versions).
        _philox_normal[grid](out, n, blocks, int(counter), int(key) & 0xFFFFFFFF, (int(key) >> 32) & 0xFFFFFFFF,
                             BLOCK=BLOCKS_PER_PROGRAM, enable_fp_fusion=False)
    return out


if triton is not None:

    @triton.jit
    def _philox_normal(out_ptr, n, blocks, counter, k0_in, k1_in, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        cnt = (i + counter).to(tl.uint64)
        mask32 = 0xFFFFFFFF
        c0 = cnt & mask32
        c1 = (cnt >> 32) & mask32
        c2 = tl.zeros_like(c0)
        c3 = tl.zeros_like(c0)
        k0 = tl.full(c0.shape, k0_in, tl.uint64)
        k1 = tl.full(c0.shape, k1_in, tl.uint64)
        for _ in tl.static_range(10):
            p0 = c0 * 0xD2511F53  # < 2^64: the whole product of two 32-bit words
            p1 = c2 * 0xCD9E8D57
            hi0, lo0 = p0 >> 32, p0 & mask32
            hi1, lo1 = p1 >> 32, p1 & mask32
            c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
            k0 = (k0 + 0x9E3779B9) & mask32
            k1 = (k1 + 0xBB67AE85) & mask32
        inv32 = 2.3283064365386963e-10  # 2^-32 (exact as float32, like 0.5 and -2.0 below)
        # 2 * math.pi in float64, as normal_torch multiplies: a Python float literal here
        # would be a float32 constant, so the double's bits are spelled out.
        two_pi = tl.full(c0.shape, 0x401921FB54442D18, tl.uint64).to(tl.float64, bitcast=True)
        u1a = (c0.to(tl.float64) + 0.5) * inv32
        va = c1.to(tl.float64) * inv32
        u1b = (c2.to(tl.float64) + 0.5) * inv32
        vb = c3.to(tl.float64) * inv32
        ra = tl.sqrt(-2.0 * tl.log(u1a))
        rb = tl.sqrt(-2.0 * tl.log(u1b))
        base = 4 * i
        live = i < blocks
        tl.store(out_ptr + base, (ra * tl.cos(two_pi * va)).to(tl.float32), mask=live & (base < n))
        tl.store(out_ptr + base + 1, (ra * tl.sin(two_pi * va)).to(tl.float32), mask=live & (base + 1 < n))
        tl.store(out_ptr + base + 2, (rb * tl.cos(two_pi * vb)).to(tl.float32), mask=live & (base + 2 < n))
        tl.store(out_ptr + base + 3, (rb * tl.sin(two_pi * vb)).to(tl.float32), mask=live & (base + 3 < n))

