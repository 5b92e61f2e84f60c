"""The VAE posterior: a diagonal Gaussian over latents, and the KL divergence between two Gaussians."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ldm.util import to_device


class DiagonalGaussianDistribution:
    """Diagonal Gaussian whose mean and log-variance are the two channel halves of `parameters` (B, 2C, H, W).

    Args:
        parameters: moments from the encoder; the log-variance half is clamped to [-30, 20].
        deterministic: make the distribution a point mass at the mean (std and var are zero).
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        self.parameters = parameters
        self.deterministic = deterministic
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)  # (B, C, H, W) each
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)
        if deterministic:
            self.var = self.std = torch.zeros_like(self.mean)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * eps, eps drawn in float32 from the CPU default generator, or from `generator` on its device.

        Like the original, the default noise comes from the CPU generator and is moved afterwards, so a seeded run
        encodes to the same latents on CPU and GPU.
        """
        generator_device = generator.device if generator is not None else torch.device("cpu")
        noise = torch.randn(self.mean.shape, generator=generator, device=generator_device, dtype=torch.float32)
        return self.mean + self.std * to_device(noise, self.mean.device, self.mean.dtype)

    def mode(self) -> torch.Tensor:
        """The most likely latent, i.e. the mean."""
        return self.mean

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> torch.Tensor:
        """KL(self || other) per sample, summed over (C, H, W); `other` defaults to the standard normal."""
        if self.deterministic:
            return torch.zeros(1, device=self.mean.device)
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])
        return 0.5 * torch.sum(
            (self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar,
            dim=[1, 2, 3],
        )

    def nll(self, sample: torch.Tensor, dims: Sequence[int] = (1, 2, 3)) -> torch.Tensor:
        """Negative log-likelihood of `sample`, summed over `dims`."""
        if self.deterministic:
            return torch.zeros(1, device=self.mean.device)
        log_two_pi = math.log(2.0 * math.pi)
        return 0.5 * torch.sum(log_two_pi + self.logvar + (sample - self.mean).pow(2) / self.var, dim=list(dims))


def normal_kl(
    mean1: torch.Tensor | float,
    logvar1: torch.Tensor | float,
    mean2: torch.Tensor | float,
    logvar2: torch.Tensor | float,
) -> torch.Tensor:
    """Elementwise KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))); at least one argument must be a tensor."""
    reference = next((x for x in (mean1, logvar1, mean2, logvar2) if isinstance(x, torch.Tensor)), None)
    if reference is None:
        raise TypeError("normal_kl needs at least one torch.Tensor argument; all four were Python numbers")
    logvar1, logvar2 = (
        x if isinstance(x, torch.Tensor) else torch.tensor(x).to(reference) for x in (logvar1, logvar2)
    )
    variance_ratio = torch.exp(logvar1 - logvar2)
    return 0.5 * (-1.0 + logvar2 - logvar1 + variance_ratio + (mean1 - mean2) ** 2 * torch.exp(-logvar2))
