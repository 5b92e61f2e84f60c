"""ControlLDMs that misbehave on purpose, loaded through a config `target` by the reliability tests."""
from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch

from cldm.cldm import ControlLDM


class NonFiniteLossControlLDM(ControlLDM):
    """A NaN loss at the global steps in `nan_loss_steps`, and a finite loss with NaN gradients at those in
    `nan_grad_steps` (as a diverging run or a bad batch would give)."""

    def __init__(self, *args, nan_loss_steps: Sequence[int] = (), nan_grad_steps: Sequence[int] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.nan_loss_steps = tuple(nan_loss_steps)
        self.nan_grad_steps = tuple(nan_grad_steps)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if self.global_step in self.nan_loss_steps:
            return loss * float("nan")
        if self.global_step in self.nan_grad_steps:
            # Forward: + 0. Backward: d sqrt(x)/dx at x = -1 is NaN, times the zero mask is still NaN.
            weight = next(self.control_model.parameters())
            return loss + torch.where(torch.tensor(False), torch.sqrt(weight.sum() * 0 - 1), torch.tensor(0.0))
        return loss


class FailingLogImagesControlLDM(ControlLDM):
    """`log_images` draws from every random stream, switches the model to training mode and then fails."""

    def log_images(self, batch, **kwargs):
        torch.randn(1000)
        np.random.rand(1000)
        random.random()
        self.train()
        raise RuntimeError("simulated failure while sampling the image grid")
