"""Noise models for noisy analog computation: all the noise maths of dni lives here.

A noise model perturbs the result of one matrix-vector product (plus bias), the
pre-activation ``y = W·x + b`` of Eq. (1) in Qin & Vucinic (2018), turning it into
``y + z`` of Eq. (2). Layers receive a noise model and call it right after each
matrix-vector product; they never draw random numbers themselves, so adding a noise
model never touches the layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from dni.errors import SpecError


class NoiseModel(Protocol):
    """What a layer needs from a noise model."""

    @property
    def is_noiseless(self) -> bool:
        """True when the model leaves every pre-activation unchanged."""

    def __call__(self, pre: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Return the perturbed pre-activation (fresh draws on every call)."""


def check_sigma(sigma: float, name: str = "sigma") -> float:
    """Validate a noise standard deviation: finite and non-negative."""
    try:
        value = float(sigma)
    except (TypeError, ValueError):
        raise SpecError(f"{name} must be a number, got {sigma!r}") from None
    if not math.isfinite(value) or value < 0:
        raise SpecError(f"{name} must be a finite number >= 0, got {sigma!r}")
    return value


def gaussian(
    shape: torch.Size | tuple[int, ...],
    generator: torch.Generator | None,
    *,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Standard normal samples N(0, 1) from ``generator`` (the one place dni draws them)."""
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


@dataclass(frozen=True)
class AdditiveGaussian:
    """Additive Gaussian noise z ~ N(0, sigma²), one independent draw per element (Eq. 2).

    Every call draws fresh noise, so each time step, each sample and each forward pass
    sees independent noise. ``sigma == 0`` returns the input unchanged (exactly the
    noise-free network, no random numbers drawn).
    """

    sigma: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "sigma", check_sigma(self.sigma))

    @property
    def is_noiseless(self) -> bool:
        return self.sigma == 0.0

    def __call__(self, pre: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if self.sigma == 0.0:
            return pre
        z = gaussian(pre.shape, generator, device=pre.device, dtype=pre.dtype)
        if pre.requires_grad:
            return pre + self.sigma * z
        # Inference: no autograd graph to protect, so update in place and save a tensor.
        return pre.add_(z, alpha=self.sigma)


NOISE_KINDS = ("additive",)


def make_noise(kind: str, sigma: float) -> NoiseModel:
    """Build a noise model from its name (as stored in specs and CSVs) and its strength."""
    if kind == "additive":
        return AdditiveGaussian(sigma)
    raise SpecError(f"unknown noise model {kind!r}; choose one of {', '.join(NOISE_KINDS)}")
