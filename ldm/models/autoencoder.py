"""The first-stage model: a KL-regularised autoencoder between images and latents (frozen in ControlNet)."""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)


class AutoencoderKL(nn.Module):
    """The SD VAE for inference: `encode` images to a Gaussian posterior over latents, `decode` latents to images.

    ControlNet never trains the VAE, so the original's training loop, loss and logging are left out; `lossconfig`
    is still instantiated (as `self.loss`, `torch.nn.Identity` in every ControlNet config) so yaml files keep working.

    Args:
        ddconfig: encoder/decoder arguments shared by both (`double_z` must be true).
        lossconfig: `target`/`params` of the training loss module.
        embed_dim: number of latent channels.
        ckpt_path: optional checkpoint to load (a flat state dict or one wrapped under `state_dict`), non-strictly.
        ignore_keys: key prefixes dropped from that checkpoint before loading.
        image_key, monitor: kept as attributes for configs and callers that read them.
        colorize_nlabels, ema_decay: training-only options of the original; only None is accepted.
        learn_logvar: training-only flag of the original; accepted and unused.
    """

    def __init__(
        self,
        ddconfig: Mapping[str, Any],
        lossconfig: Mapping[str, Any],
        embed_dim: int,
        ckpt_path: str | None = None,
        ignore_keys: Iterable[str] = (),
        image_key: str = "image",
        colorize_nlabels: int | None = None,
        monitor: str | None = None,
        ema_decay: float | None = None,
        learn_logvar: bool = False,
    ):
        super().__init__()
        if not ddconfig.get("double_z", True):
            raise ValueError("AutoencoderKL needs ddconfig.double_z: true (the encoder must output mean and logvar)")
        if colorize_nlabels is not None or ema_decay is not None:
            raise ValueError(
                "AutoencoderKL options colorize_nlabels and ema_decay belong to VAE training, which this port leaves "
                f"out; got colorize_nlabels={colorize_nlabels}, ema_decay={ema_decay}: remove them from the config"
            )
        self.image_key = image_key
        self.monitor = monitor
        self.learn_logvar = learn_logvar
        self.embed_dim = embed_dim

        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.loss = instantiate_from_config(lossconfig)
        self.quant_conv = nn.Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], kernel_size=1)
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys)

    def init_from_ckpt(self, path: str, ignore_keys: Iterable[str] = ()) -> None:
        """Load weights from `path` non-strictly, dropping keys that start with any of `ignore_keys`."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"AutoencoderKL ckpt_path '{path}' does not exist; fix the path or remove it")
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        state_dict = state_dict.get("state_dict", state_dict)
        prefixes = tuple(ignore_keys)
        state_dict = {k: v for k, v in state_dict.items() if not (prefixes and k.startswith(prefixes))}
        missing, unexpected = self.load_state_dict(state_dict, strict=False)
        logger.info(
            "Restored AutoencoderKL from %s (%d missing, %d unexpected keys)", path, len(missing), len(unexpected)
        )

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Images (B, 3, H, W) in [-1, 1] -> posterior over latents (B, embed_dim, H/f, W/f)."""
        moments = self.quant_conv(self.encoder(x))  # (B, 2 * embed_dim, H/f, W/f)
        return DiagonalGaussianDistribution(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, embed_dim, h, w) -> images (B, 3, h*f, w*f), roughly in [-1, 1] (not clamped)."""
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, input: torch.Tensor, sample_posterior: bool = True
    ) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        # 1. encode to the posterior
        posterior = self.encode(input)
        # 2. pick a latent: a sample or the mean
        z = posterior.sample() if sample_posterior else posterior.mode()  # (B, embed_dim, H/f, W/f)
        # 3. decode
        return self.decode(z), posterior


class IdentityFirstStage(nn.Module):
    """A first stage that leaves its input unchanged (for diffusion directly in pixel space)."""

    def __init__(self, *args, vq_interface: bool = False, **kwargs):
        super().__init__()
        self.vq_interface = vq_interface

    def encode(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Return `x`."""
        return x

    def decode(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """Return `x`."""
        return x

    def quantize(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor | tuple[torch.Tensor, None, list[None]]:
        """Return `x`, in the VQ tuple layout when `vq_interface` is set."""
        if self.vq_interface:
            return x, None, [None, None, None]
        return x

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return x
