"""Arithmetic precision of the matrix-vector products at inference: fp32 or bf16.

``fp32`` (the default, and the paper's) computes every product in single precision.

``bf16`` evaluates a model as hardware with bfloat16 multipliers would: each weight
matrix, and each vector it multiplies, is rounded to bfloat16 (to nearest even) right
before the product, and the product accumulates in fp32. Biases, the noise, the gates and
the states stay fp32. **It changes the numbers**: every operand loses all but 8 of its 24
significand bits (a relative error of up to 2^-8), so bf16 cells are stored under an
evaluation protocol of their own and never mix with fp32 ones.

Where the BLAS has a bf16 GEMM (MKL's ``gemm_bf16bf16f32``, on AMX tiles where the CPU has
them), the compiled CPU loop uses it, and bf16 inference is faster than fp32. Elsewhere
the same maths runs as fp32 products of the rounded operands (a product of two bf16
numbers is exact in fp32). The two ways sum in different orders, and their gates round
differently in the last bit (as in fp32); a difference in the last bit of h flips its bf16
rounding now and then, so their logits agree to ~1e-4 (LSTM) to ~1e-3 (RNN), not bit for
bit. Training always runs in fp32; bf16 is an inference setting.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from dni.errors import SpecError

PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise SpecError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return precision


def operand(t: torch.Tensor, precision: str) -> torch.Tensor:
    """``t`` as a matrix-vector product at ``precision`` sees it (fp32 values)."""
    if precision == "fp32":
        return t
    return t.to(torch.bfloat16).to(t.dtype)


@contextlib.contextmanager
def products_in(model: nn.Module, precision: str) -> Iterator[nn.Module]:
    """Run ``model``'s matrix-vector products at ``precision`` inside the block."""
    check_precision(precision)
    previous = getattr(model, "precision", "fp32")
    model.precision = precision
    try:
        yield model
    finally:
        model.precision = previous
