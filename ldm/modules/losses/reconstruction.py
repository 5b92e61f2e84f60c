"""A reconstruction + KL loss for training the KL autoencoder from scratch."""
from __future__ import annotations

import torch
from torch import nn

from ldm.modules.distributions.distributions import DiagonalGaussianDistribution

PIXEL_LOSSES = ("l1", "l2")


class ReconstructionKLLoss(nn.Module):
    """Mean pixel loss (L1 or L2) of the reconstruction plus `kl_weight` times the posterior's mean KL divergence
    from N(0, I).

    The original trains its VAE with `LPIPSWithDiscriminator` (perceptual loss and a patch GAN), which needs LPIPS
    and VGG weights that cannot be downloaded here; this loss is its pixel and KL part, enough for simple images
    such as Fill50K's.

    Args:
        kl_weight: weight of the KL term (the original's default is 1e-6).
        pixel_loss: "l1" or "l2".
    """

    def __init__(self, kl_weight: float = 1e-6, pixel_loss: str = "l1"):
        super().__init__()
        if pixel_loss not in PIXEL_LOSSES:
            raise ValueError(f"pixel_loss must be one of {', '.join(PIXEL_LOSSES)}, got {pixel_loss!r}")
        if kl_weight < 0:
            raise ValueError(f"kl_weight must be zero or positive, got {kl_weight}")
        self.kl_weight = kl_weight
        self.pixel_loss = pixel_loss

    def forward(self, inputs: torch.Tensor, reconstructions: torch.Tensor, posterior: DiagonalGaussianDistribution,
                split: str = "train") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of a batch (inputs and reconstructions (B, C, H, W)) and its parts, keyed `<split>/...`."""
        difference = inputs - reconstructions
        rec_loss = difference.abs().mean() if self.pixel_loss == "l1" else difference.pow(2).mean()
        kl_loss = posterior.kl().mean()  # summed over the latent's elements, averaged over the batch
        loss = rec_loss + self.kl_weight * kl_loss
        log = {f"{split}/total_loss": loss.detach(), f"{split}/rec_loss": rec_loss.detach(),
               f"{split}/kl_loss": kl_loss.detach()}
        return loss, log
