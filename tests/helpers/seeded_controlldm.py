"""A ControlLDM whose training noise depends only on each sample, for batch/rank equivalence tests."""
from __future__ import annotations

import torch

from cldm.cldm import ControlLDM


class PerSampleNoiseControlLDM(ControlLDM):
    """Uses the VAE posterior mean and draws each sample's timestep and noise from a generator seeded by its hint.

    A sample then gets the same latent, timestep and noise whatever batch or DDP rank it lands in,
    so one step of 2 ranks x batch 1 must equal one step of 1 process x batch 2.
    """

    def get_first_stage_encoding(self, encoder_posterior):
        return self.scale_factor * encoder_posterior.mode()

    def forward(self, x, c, *args, **kwargs):
        hints = c["c_concat"][0]
        timesteps, noises = [], []
        for hint, latent in zip(hints, x):
            generator = torch.Generator().manual_seed(int(hint.double().sum().item() * 1000))
            timesteps.append(torch.randint(0, self.num_timesteps, (1,), generator=generator))
            noises.append(torch.randn(latent.shape, generator=generator))
        t = torch.cat(timesteps).to(self.device)
        noise = torch.stack(noises).to(self.device)
        return self.p_losses(x, c, t, noise=noise)
