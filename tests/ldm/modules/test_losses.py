"""ReconstructionKLLoss: pixel loss plus weighted KL, and its log."""
from __future__ import annotations

import pytest
import torch

from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.losses import ReconstructionKLLoss


def _posterior(mean: float, logvar: float) -> DiagonalGaussianDistribution:
    moments = torch.cat([torch.full((2, 4, 2, 2), mean), torch.full((2, 4, 2, 2), logvar)], dim=1)
    return DiagonalGaussianDistribution(moments)


@pytest.mark.parametrize("pixel_loss, expected_rec", [("l1", 0.5), ("l2", 0.25)])
def test_loss_is_pixel_loss_plus_weighted_kl(pixel_loss: str, expected_rec: float) -> None:
    inputs, reconstructions = torch.zeros(2, 3, 8, 8), torch.full((2, 3, 8, 8), 0.5)
    posterior = _posterior(mean=1.0, logvar=0.0)  # KL per element 0.5 * mean^2 = 0.5, 16 elements per sample
    loss, log = ReconstructionKLLoss(kl_weight=0.1, pixel_loss=pixel_loss)(inputs, reconstructions, posterior)
    assert log["train/rec_loss"].item() == pytest.approx(expected_rec)
    assert log["train/kl_loss"].item() == pytest.approx(8.0)
    assert loss.item() == pytest.approx(expected_rec + 0.8)
    assert log["train/total_loss"].item() == pytest.approx(loss.item())


def test_refuses_unknown_pixel_loss() -> None:
    with pytest.raises(ValueError, match="pixel_loss must be one of l1, l2"):
        ReconstructionKLLoss(pixel_loss="lpips")
