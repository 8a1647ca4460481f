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

from dni import seeding
from dni.errors import SpecError


class NoiseModel(Protocol):
    """What a layer needs from a noise model."""

    @property
    def is_noiseless(self) -> bool:
        """True when the model leaves every pre-activation unchanged."""

    def __call__(self, pre: torch.Tensor, generator: "Generator") -> torch.Tensor:
        """Return the perturbed pre-activation (fresh draws on every call). May update
        ``pre`` in place when it does not require gradients."""


def check_sigma(sigma: float, name: str = "sigma") -> float:
    """Validate a noise standard deviation: finite and non-negative."""
    try:
        value = float(sigma)
    except (TypeError, ValueError):
        raise SpecError(f"{name} must be a number, got {sigma!r}") from None
    if not math.isfinite(value) or value < 0:
        raise SpecError(f"{name} must be a finite number >= 0, got {sigma!r}")
    return value


class CounterGenerator:
    """A counter-based N(0, 1) stream of dni (``dni/csrc``): :class:`PhiloxGenerator` or
    :class:`ArsGenerator`, named by :attr:`stream`.

    The stream is fixed by its key (a seed); :meth:`take` hands out consecutive ranges of
    it, so the samples depend only on the seed and on the order of the draws, never on
    threads, processes or the device. On CPU the compiled kernel draws it; elsewhere (or
    without a C compiler) a torch implementation does, and for Philox on a GPU one Triton
    kernel (:mod:`dni.gpu_philox`).
    """

    stream = ""  # the rng name: "philox" or "ars"
    AHEAD_CHUNK = 1 << 23  # samples drawn ahead at once (~0.3 GB of temporaries for torch's ops, none for Triton)

    def __init__(self, seed: int):
        self.key = int(seed) & 0xFFFFFFFFFFFFFFFF
        self.counter = 0  # next block (4 samples)
        self._ahead: tuple[int, torch.Tensor] | None = None  # (first block, samples) drawn ahead
        self._ahead_end: int | None = None  # first block past what prefetch asked for
        self._ahead_device: torch.device | None = None

    @staticmethod
    def draws_ahead_on(device: torch.device) -> bool:
        """Whether a pass on ``device`` should :meth:`prefetch` its samples: on a GPU, where
        a draw per step would cost more to launch than to run (one Triton kernel, or ~150
        small torch ops without Triton). Not on a CPU: there the
        compiled kernel draws; and the torch fallback runs no faster from one large draw
        (measured: 1.0-1.3x slower, its temporaries no longer fit in cache)."""
        return device.type != "cpu"

    def prefetch(self, n: int, device: torch.device) -> None:
        """Compute the next ``n`` samples on ``device`` ahead, in chunks of up to
        ``AHEAD_CHUNK``, and serve the draws that fall within them from there (the counter
        still advances per draw). On a GPU a pass that draws at every step spends its time
        launching kernels (one per draw with Triton, ~150 small torch ops without); drawn
        ahead, it launches them once per chunk. Each sample depends only on its place in
        the stream, so the values are the same."""
        self._ahead_end = self.counter + (n + 3) // 4  # first block not to draw ahead
        self._ahead = None
        self._ahead_device = device

    def _from_ahead(self, start: int, n: int, device: torch.device) -> torch.Tensor | None:
        """Samples ``4 start ..`` of the stream from the chunk drawn ahead (drawing the next
        chunk when this draw is past the current one); None where the draw is not within
        what :meth:`prefetch` asked for, which then ends."""
        from dni import kernels

        blocks = (n + 3) // 4
        if self._ahead_end is None or device != self._ahead_device or start + blocks > self._ahead_end:
            self._ahead_end = self._ahead = None
            return None
        first, z = self._ahead if self._ahead is not None else (start, None)
        offset = 4 * (start - first)
        if z is None or offset < 0 or offset + n > z.numel():  # past the chunk: draw the next one
            first, offset = start, 0
            z = kernels.normal_on(max(n, min(self.AHEAD_CHUNK, 4 * (self._ahead_end - start))), self.key, start, device,
                                 stream=self.stream)
        self._ahead = (first, z)
        if start + blocks >= self._ahead_end:  # the last draw asked for: let the samples go
            self._ahead_end = self._ahead = None
        return z[offset : offset + n]

    def take(self, n: int) -> int:
        """Reserve the next ``n`` samples; return the block they start at."""
        start = self.counter
        self.counter += (n + 3) // 4
        return start

    def normal(self, shape, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        out = torch.empty(shape, device=device, dtype=torch.float32)
        self.add_normal_(out, 1.0, overwrite=True)
        return out.to(dtype)

    def add_normal_(self, t: torch.Tensor, scale: float, overwrite: bool = False) -> torch.Tensor:
        """``t += scale * z`` (or ``t = scale * z``) in place, z the next ``t.numel()`` samples."""
        from dni import kernels

        start = self.take(t.numel())
        lib = kernels.library()
        if kernels.draws(lib, self.stream) and t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous():
            lib.dni_normal(t.data_ptr(), t.numel(), self.key, kernels.STREAMS[self.stream], start, float(scale),
                           0 if overwrite else 1)
            return t
        z = self._from_ahead(start, t.numel(), t.device)
        if z is None:
            z = kernels.normal_on(t.numel(), self.key, start, t.device, stream=self.stream)
        z = z.view(t.shape).to(t.dtype)
        return t.copy_(z * scale) if overwrite else t.add_(z, alpha=scale)


class PhiloxGenerator(CounterGenerator):
    """dni's default stream: Philox4x32-10 + Box-Muller. The compiled kernel draws ~3x more
    samples per second than ``torch.randn`` on a CPU; the stored results use it."""

    stream = "philox"


class ArsGenerator(CounterGenerator):
    """The ARS stream (``--rng ars``): ARS-7, Random123's AES-based generator, + Box-Muller
    laid out for vector units. On x86 CPUs with AES instructions its samples come ~1.7x
    faster than Philox's, which makes noisy LSTM passes ~13% faster. A different stream:
    results drawn with it are stored under their own protocol, never mixed with Philox's.
    Off x86 (no AES instructions) and on a GPU torch ops draw it, slowly."""

    stream = "ars"


#: Sources of noise a layer accepts: torch's generators or dni's counter-based streams.
Generator = torch.Generator | CounterGenerator | None


def stream_draws(generators: list[CounterGenerator], sizes: list[int], device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """The samples of the draws ``sizes`` (in that order) from each of ``generators``, whose
    streams stand at one position: one row per generator, one kernel each (on a GPU), and
    each draw's offset in the rows. Every generator advances as those draws would advance it."""
    from dni import kernels

    starts = [generators[0].take(n) for n in sizes]
    for g in generators[1:]:
        for n in sizes:
            g.take(n)
    first = starts[0]
    z = torch.empty(len(generators), 4 * (generators[0].counter - first), device=device)
    for row, g in zip(z, generators):
        kernels.normal_on(z.shape[1], g.key, first, device, out=row, stream=g.stream)
    return z, [4 * (s - first) for s in starts]


def draw_ahead(generator: Generator, noise: NoiseModel, n: int, device: torch.device) -> None:
    """Before a pass that draws ``n`` samples on ``device``: let ``generator`` compute them
    in one go where that is faster (:meth:`CounterGenerator.prefetch`); else nothing."""
    if isinstance(generator, CounterGenerator) and generator.draws_ahead_on(device) and not noise.is_noiseless:
        generator.prefetch(n, device)


def gaussian(
    shape: torch.Size | tuple[int, ...],
    generator: Generator,
    *,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Standard normal samples N(0, 1) from ``generator`` (the one place dni draws them)."""
    if isinstance(generator, CounterGenerator):
        return generator.normal(tuple(shape), device, dtype)
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


@dataclass(frozen=True)
class _GaussianNoise:
    """What every noise model of strength ``sigma`` shares: validation, the noiseless test."""

    sigma: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "sigma", check_sigma(self.sigma))

    @property
    def is_noiseless(self) -> bool:
        return self.sigma == 0.0


@dataclass(frozen=True)
class AdditiveGaussian(_GaussianNoise):
    """Additive Gaussian noise z ~ N(0, sigma²), one independent draw per element (Eq. 2).

    Every call draws fresh noise, so each time step, each sample and each forward pass
    sees independent noise. ``sigma == 0`` returns the input unchanged (exactly the
    noise-free network, no random numbers drawn).
    """

    def add_samples_(self, pre: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """In place, for inference: ``pre + sigma * z`` with samples ``z`` drawn elsewhere
        (:func:`stream_draws`), the operation of the in-place draw below."""
        return pre.add_(z, alpha=self.sigma)

    def __call__(self, pre: torch.Tensor, generator: Generator) -> torch.Tensor:
        if self.sigma == 0.0:
            return pre
        if not pre.requires_grad:
            # Inference: no autograd graph to protect, so update in place and save a tensor.
            if isinstance(generator, CounterGenerator):
                return generator.add_normal_(pre, self.sigma)
            return pre.add_(gaussian(pre.shape, generator, device=pre.device, dtype=pre.dtype), alpha=self.sigma)
        return pre + self.sigma * gaussian(pre.shape, generator, device=pre.device, dtype=pre.dtype)


def add_stacked_gaussian(pre: torch.Tensor, sigmas: torch.Tensor, noiseless: int, generator: Generator,
                         batched: bool = False) -> torch.Tensor:
    """:class:`AdditiveGaussian` for M stacked models (dim 0 of ``pre``) that share one noise
    stream (dni.stacking): member k gets ``pre[k] + sigmas[k] * z`` with the same z, the
    samples each member would draw from its own copy of the stream. The first
    ``noiseless`` members (sigma = 0) are returned unchanged, and when all are, nothing is
    drawn, as ``AdditiveGaussian(0)`` does.

    Args:
        pre: pre-activations, shape (M, ...).
        sigmas: float32, shape (M, 1, ..., 1) broadcasting against ``pre``.
        batched: one kernel for all members, ``addcmul`` (the noise-free members add
            0 z: their values, up to the sign of a zero), instead of ``pre + sigmas * z``
            on the noisy members, which keeps the bits of each member alone
            (:func:`dni.stacking.batched`).
    """
    m = pre.shape[0]
    if noiseless >= m:
        return pre
    z = gaussian(pre.shape[1:], generator, device=pre.device, dtype=pre.dtype)
    if batched:
        return torch.addcmul(pre, sigmas, z)
    if noiseless == 0:
        return pre + sigmas * z
    return torch.cat((pre[:noiseless], pre[noiseless:] + sigmas[noiseless:] * z))


@dataclass(frozen=True)
class MultiplicativeGaussian(_GaussianNoise):
    """Multiplicative noise y·(1 + z), z ~ N(0, sigma²) (Walking Noise, Borras et al.)."""

    def __call__(self, pre: torch.Tensor, generator: Generator) -> torch.Tensor:
        if self.sigma == 0.0:
            return pre
        return pre * (1.0 + self.sigma * gaussian(pre.shape, generator, device=pre.device, dtype=pre.dtype))


@dataclass(frozen=True)
class MixedGaussian(_GaussianNoise):
    """Mixed noise y·(1 + r·z₁) + (1 − r)·z₂ with z₁, z₂ ~ N(0, sigma²) independent:
    ``ratio`` r in [0, 1] is the multiplicative share (Walking Noise's mixed model)."""

    ratio: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= float(self.ratio) <= 1.0:
            raise SpecError(f"mixed noise ratio must be in [0, 1], got {self.ratio!r}")

    def __call__(self, pre: torch.Tensor, generator: Generator) -> torch.Tensor:
        if self.sigma == 0.0:
            return pre
        z1 = gaussian(pre.shape, generator, device=pre.device, dtype=pre.dtype)
        z2 = gaussian(pre.shape, generator, device=pre.device, dtype=pre.dtype)
        return pre * (1.0 + self.ratio * self.sigma * z1) + (1.0 - self.ratio) * self.sigma * z2


@dataclass(frozen=True)
class RelativeGaussian(_GaussianNoise):
    """Signal-relative noise y + sigma·rms(y)·z: the noise std is ``sigma`` times the
    root-mean-square of each pre-activation vector (per sample, over its units), so
    ``sigma`` fixes the signal-to-noise ratio SNR = -20·log10(sigma) dB (0 dB: sigma = 1).
    As in Qin & Vucinic, "Noisy computations during inference: harmful or helpful?". The
    measured power is treated as a constant in training (no gradient through it)."""

    def __call__(self, pre: torch.Tensor, generator: Generator) -> torch.Tensor:
        if self.sigma == 0.0:
            return pre
        rms = pre.detach().pow(2).mean(dim=-1, keepdim=True).sqrt()
        return pre + (self.sigma * rms) * gaussian(pre.shape, generator, device=pre.device, dtype=pre.dtype)


NOISE_KINDS = ("additive", "multiplicative", "mixed:R", "relative")
RNGS = ("philox", "ars", "torch")


def snr_db_to_sigma(snr_db: float) -> float:
    """The ``relative`` noise strength of a signal-to-noise ratio in dB."""
    return 10.0 ** (-float(snr_db) / 20.0)


def check_noise_kind(kind: str) -> str:
    """Validate a noise-model name (``additive``, ``multiplicative``, ``mixed:R``, ``relative``)."""
    make_noise(kind, 0.0)
    return kind


def make_noise(kind: str, sigma: float) -> NoiseModel:
    """Build a noise model from its name (as stored in specs and CSVs) and its strength."""
    name, _, arg = str(kind).partition(":")
    if name == "additive" and not arg:
        return AdditiveGaussian(sigma)
    if name == "multiplicative" and not arg:
        return MultiplicativeGaussian(sigma)
    if name == "relative" and not arg:
        return RelativeGaussian(sigma)
    if name == "mixed":
        try:
            ratio = float(arg) if arg else 0.5
        except ValueError:
            raise SpecError(f"mixed noise takes a ratio, e.g. mixed:0.5, got {kind!r}") from None
        return MixedGaussian(sigma, ratio)
    raise SpecError(f"unknown noise model {kind!r}; choose one of {', '.join(NOISE_KINDS)}")


# --------------------------------------------------------------------------- weight noise

WEIGHT_NOISE_MODES = ("absolute", "relative")


def perturb_weights(model: torch.nn.Module, std: float, mode: str, generator: Generator) -> dict[str, torch.Tensor]:
    """Programming noise: add Gaussian noise to every weight matrix and bias once, in place,
    and return the original tensors (restore with ``load_state_dict``).

    ``absolute``: std ``std``; ``relative``: std ``std`` times each tensor's max |w| (as
    analog simulators such as IBM's aihwkit scale programming noise to the weight range).
    """
    if mode not in WEIGHT_NOISE_MODES:
        raise SpecError(f"unknown weight-noise mode {mode!r}; choose one of {', '.join(WEIGHT_NOISE_MODES)}")
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if std == 0.0:
        return original
    with torch.no_grad():
        for p in model.parameters():
            scale = std if mode == "absolute" else std * float(p.abs().max())
            p.add_(gaussian(p.shape, generator, device=p.device, dtype=p.dtype), alpha=scale)
    return original


def make_generator(rng: str, seed: int, device: torch.device | str = "cpu") -> Generator:
    """A noise source by name: ``philox`` (dni's default counter-based stream), ``ars``
    (dni's AES-based stream, faster on x86 CPUs) or ``torch``."""
    if rng == "philox":
        return PhiloxGenerator(seed)
    if rng == "ars":
        return ArsGenerator(seed)
    if rng == "torch":
        return seeding.make_generator(seed, device)
    raise SpecError(f"unknown generator {rng!r}; choose one of {', '.join(RNGS)}")

