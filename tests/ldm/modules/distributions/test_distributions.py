"""The VAE posterior: moments, CPU-RNG sampling parity with the original, KL / NLL against torch.distributions."""
from __future__ import annotations

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from ldm.modules.distributions.distributions import DiagonalGaussianDistribution, normal_kl


def _moments(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, 8, 3, 3, generator=generator, dtype=dtype)


def test_moments_split_and_logvar_clamp() -> None:
    parameters = _moments()
    parameters[:, 4:, 0, 0] = 100.0
    parameters[:, 4:, 0, 1] = -100.0
    dist = DiagonalGaussianDistribution(parameters)
    torch.testing.assert_close(dist.mean, parameters[:, :4])
    assert dist.logvar[:, :, 0, 0].eq(20.0).all() and dist.logvar[:, :, 0, 1].eq(-30.0).all()
    torch.testing.assert_close(dist.std, torch.exp(0.5 * dist.logvar))
    torch.testing.assert_close(dist.var, torch.exp(dist.logvar))
    assert dist.mode() is dist.mean


def test_sample_draws_cpu_float32_noise_like_the_original() -> None:
    # The original: mean + std * torch.randn(mean.shape).to(device), noise from the CPU default generator.
    dist = DiagonalGaussianDistribution(_moments(dtype=torch.float64))
    torch.manual_seed(123)
    sample = dist.sample()
    torch.manual_seed(123)
    expected = dist.mean + dist.std * torch.randn(dist.mean.shape).to(torch.float64)
    assert sample.dtype == torch.float64
    torch.testing.assert_close(sample, expected, rtol=0, atol=0)
    assert not torch.allclose(sample, dist.sample())  # the default generator moved on


def test_sample_with_explicit_generator() -> None:
    dist = DiagonalGaussianDistribution(_moments())
    state = torch.random.get_rng_state()
    sample = dist.sample(generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.random.get_rng_state(), state)  # default generator untouched
    expected = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(sample, expected, rtol=0, atol=0)


def test_deterministic_is_a_point_mass() -> None:
    dist = DiagonalGaussianDistribution(_moments(), deterministic=True)
    assert dist.std.eq(0).all() and dist.var.eq(0).all()
    torch.testing.assert_close(dist.sample(), dist.mean)
    assert dist.kl().eq(0).all() and dist.nll(dist.mean).eq(0).all()


def test_kl_and_nll_match_torch_distributions() -> None:
    p, q = DiagonalGaussianDistribution(_moments(0)), DiagonalGaussianDistribution(_moments(1))
    p_normal, q_normal = Normal(p.mean, p.std), Normal(q.mean, q.std)
    standard = Normal(torch.zeros_like(p.mean), torch.ones_like(p.mean))
    torch.testing.assert_close(p.kl(), kl_divergence(p_normal, standard).sum(dim=[1, 2, 3]))
    torch.testing.assert_close(p.kl(q), kl_divergence(p_normal, q_normal).sum(dim=[1, 2, 3]))
    x = torch.randn_like(p.mean)
    torch.testing.assert_close(p.nll(x), -p_normal.log_prob(x).sum(dim=[1, 2, 3]))
    torch.testing.assert_close(p.nll(x, dims=[1]), -p_normal.log_prob(x).sum(dim=1))


def test_normal_kl_elementwise_and_with_scalars() -> None:
    mean1, logvar1 = torch.randn(5), torch.randn(5)
    expected = kl_divergence(Normal(mean1, torch.exp(0.5 * logvar1)), Normal(0.5, torch.exp(torch.tensor(0.25))))
    torch.testing.assert_close(normal_kl(mean1, logvar1, 0.5, 0.5), expected)
    with pytest.raises(TypeError, match="torch.Tensor"):
        normal_kl(0.0, 0.0, 1.0, 1.0)
