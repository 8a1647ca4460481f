import math

import pytest
import torch

from dni.errors import SpecError
from dni.noise import AdditiveGaussian, make_noise


def test_sigma_zero_is_exactly_noiseless():
    x = torch.randn(64, 512)
    noise = AdditiveGaussian(0.0)
    assert noise.is_noiseless
    gen = torch.Generator().manual_seed(1)
    state = gen.get_state()
    y = noise(x.clone(), gen)
    assert torch.equal(y, x)
    assert torch.equal(gen.get_state(), state), "sigma = 0 must draw no random numbers"


@pytest.mark.parametrize("sigma", [0.1, 0.5, 1.0, 2.5])
def test_sampled_noise_has_requested_moments(sigma):
    x = torch.zeros(1000, 1000)
    z = AdditiveGaussian(sigma)(x, torch.Generator().manual_seed(0))
    n = z.numel()
    assert abs(z.mean().item()) < 5 * sigma / math.sqrt(n)
    # std of the sample std is about sigma / sqrt(2n)
    assert abs(z.std().item() - sigma) < 5 * sigma / math.sqrt(2 * n)


def test_noise_is_fresh_and_independent_across_calls_and_elements():
    gen = torch.Generator().manual_seed(3)
    noise = AdditiveGaussian(1.0)
    a = noise(torch.zeros(200, 500), gen)  # e.g. step t
    b = noise(torch.zeros(200, 500), gen)  # step t + 1
    assert not torch.equal(a, b)
    n = a.numel()
    corr_steps = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()
    corr_samples = torch.corrcoef(torch.stack([a[:-1].flatten(), a[1:].flatten()]))[0, 1].item()
    corr_units = torch.corrcoef(torch.stack([a[:, :-1].flatten(), a[:, 1:].flatten()]))[0, 1].item()
    for c in (corr_steps, corr_samples, corr_units):
        assert abs(c) < 5 / math.sqrt(n)


def test_noise_is_reproducible_from_a_seed():
    noise = AdditiveGaussian(0.7)
    a = noise(torch.zeros(10, 10), torch.Generator().manual_seed(42))
    b = noise(torch.zeros(10, 10), torch.Generator().manual_seed(42))
    assert torch.equal(a, b)


def test_noise_keeps_the_autograd_graph():
    x = torch.randn(8, 4, requires_grad=True)
    y = AdditiveGaussian(0.3)(x, torch.Generator().manual_seed(0))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "abc"])
def test_invalid_sigma_is_rejected(bad):
    with pytest.raises(SpecError):
        AdditiveGaussian(bad)


def test_make_noise():
    assert make_noise("additive", 0.2) == AdditiveGaussian(0.2)
    with pytest.raises(SpecError, match="unknown noise model"):
        make_noise("pink", 0.2)


# ------------------------------------------------------------------ the other noise models

from dni.noise import (  # noqa: E402
    MixedGaussian,
    MultiplicativeGaussian,
    PhiloxGenerator,
    RelativeGaussian,
    perturb_weights,
    snr_db_to_sigma,
)

ALL_KINDS = ["additive", "multiplicative", "mixed:0.3", "relative"]


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_every_noise_model_is_exact_at_zero_and_reproducible(kind):
    x = torch.randn(50, 64)
    assert torch.equal(make_noise(kind, 0.0)(x.clone(), torch.Generator().manual_seed(0)), x)
    a = make_noise(kind, 0.4)(x.clone(), PhiloxGenerator(3))
    b = make_noise(kind, 0.4)(x.clone(), PhiloxGenerator(3))
    assert torch.equal(a, b) and not torch.equal(a, x)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_every_noise_model_trains(kind):
    from dni.models import build_model

    model = build_model("lstm", 28)
    loss = model(torch.rand(4, 28, 28), make_noise(kind, 0.5), torch.Generator().manual_seed(0)).sum()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_multiplicative_noise_scales_with_the_signal():
    y = torch.full((1000, 1000), 2.0)
    out = MultiplicativeGaussian(0.3)(y, torch.Generator().manual_seed(0))
    assert abs((out / y - 1).std().item() - 0.3) < 0.003 and abs((out - y).mean().item()) < 0.003


def test_mixed_noise_has_both_parts():
    zero = MixedGaussian(0.5, 0.25)(torch.zeros(1000, 1000), torch.Generator().manual_seed(0))
    assert abs(zero.std().item() - 0.75 * 0.5) < 0.002  # only the additive part at y = 0
    big = MixedGaussian(0.5, 0.25)(torch.full((1000, 1000), 10.0), torch.Generator().manual_seed(1))
    expected = math.sqrt((0.25 * 0.5 * 10) ** 2 + (0.75 * 0.5) ** 2)
    assert abs(big.std().item() - expected) < 0.01
    with pytest.raises(SpecError):
        make_noise("mixed:1.5", 0.1)
    with pytest.raises(SpecError):
        make_noise("mixed:x", 0.1)


def test_relative_noise_sets_the_snr_per_pre_activation():
    y = torch.randn(2000, 512) * torch.linspace(0.1, 10, 2000)[:, None]  # very different powers
    sigma = snr_db_to_sigma(10.0)
    z = RelativeGaussian(sigma)(y.clone(), torch.Generator().manual_seed(0)) - y
    snr = 10 * torch.log10(y.pow(2).mean(1) / z.pow(2).mean(1))
    assert abs(snr.mean().item() - 10.0) < 0.1 and snr.std().item() < 0.6
    assert snr_db_to_sigma(0.0) == 1.0 and snr_db_to_sigma(20.0) == pytest.approx(0.1)


@pytest.mark.parametrize("mode", ["absolute", "relative"])
def test_weight_noise_perturbs_once_and_restores(mode):
    from dni.models import build_model

    model = build_model("rnn", 28)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    original = perturb_weights(model, 0.1, mode, PhiloxGenerator(1))
    for k, v in model.state_dict().items():
        diff = (v - before[k]).std().item()
        scale = 0.1 if mode == "absolute" else 0.1 * before[k].abs().max().item()
        assert abs(diff - scale) < 0.25 * scale, k
    model.load_state_dict(original)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(SpecError):
        perturb_weights(model, 0.1, "per-cell", PhiloxGenerator(1))


@pytest.mark.parametrize("chunk", [1 << 23, 1000])
def test_philox_draws_served_from_a_prefetch_are_the_stream_itself(monkeypatch, chunk):
    """``prefetch`` (used on a GPU, where the stream is torch ops) changes no sample: draws
    within it equal direct draws (also across the chunks it draws ahead), the counter
    advances as before, the samples are let go after the last draw asked for, and a draw
    beyond what was asked for is drawn directly."""
    from dni import kernels
    from dni.noise import PhiloxGenerator

    monkeypatch.setattr(kernels, "library", lambda: None)  # the torch implementation, as on a GPU
    monkeypatch.setattr(PhiloxGenerator, "AHEAD_CHUNK", chunk)
    cpu = torch.device("cpu")
    sizes = [4 * 300, 4 * 300, 4 * 300, 70]  # three steps' pre-activations, then logits
    ahead, direct = PhiloxGenerator(2024), PhiloxGenerator(2024)
    ahead.counter = direct.counter = 2**32 - 500  # the low counter word wraps inside the pass
    ahead.prefetch(sum(sizes), cpu)
    drawn = []
    real = kernels.normal_torch
    monkeypatch.setattr(kernels, "normal_torch", lambda n, *args: (drawn.append(n), real(n, *args))[1])
    for n in sizes:
        assert torch.equal(ahead.normal((n,), cpu, torch.float32), direct.normal((n,), cpu, torch.float32))
        assert ahead.counter == direct.counter
    assert ahead._ahead is None and ahead._ahead_end is None  # the last draw asked for: let go
    ahead_draws = len(drawn) - len(sizes)  # direct's draws are one per call
    assert ahead_draws == (1 if chunk > sum(sizes) else 4)  # 1000-sample chunks: 1,200 each, then 70
    ahead.prefetch(100, cpu)
    assert torch.equal(ahead.normal((200,), cpu, torch.float32), direct.normal((200,), cpu, torch.float32))
    assert ahead._ahead is None and ahead._ahead_end is None  # beyond what was asked for: drawn directly
