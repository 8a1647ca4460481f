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
