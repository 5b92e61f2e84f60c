"""The first-stage model: a KL-regularised autoencoder between images and latents (frozen in ControlNet, trained
from scratch for the tiny demo base)."""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from einops import rearrange
from torch import nn

from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)


class AutoencoderKL(pl.LightningModule):
    """The SD VAE: `encode` images to a Gaussian posterior over latents, `decode` latents to images.

    ControlNet never trains the VAE; the tiny demo base trains one from scratch (`cldm.training.pretrain`) with a
    Lightning Trainer: `training_step` reconstructs `batch[image_key]` and takes the loss of `lossconfig` (`self.loss`,
    e.g. `ldm.modules.losses.ReconstructionKLLoss`; every ControlNet config names `torch.nn.Identity`, which cannot
    train), and `configure_optimizers` is the original's Adam at `self.learning_rate`. The original's discriminator
    step, EMA and image logs are left out.

    Args:
        ddconfig: encoder/decoder arguments shared by both (`double_z` must be true).
        lossconfig: `target`/`params` of the training loss module.
        embed_dim: number of latent channels.
        ckpt_path: optional checkpoint to load (a flat state dict or one wrapped under `state_dict`), non-strictly.
        ignore_keys: key prefixes dropped from that checkpoint before loading.
        image_key, monitor: kept as attributes for configs and callers that read them.
        colorize_nlabels, ema_decay: training-only options of the original; only None is accepted.
        learn_logvar: training-only flag of the original; accepted and unused.
        learning_rate: Adam's learning rate when trained (the original's main.py sets it as an attribute).
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
        learning_rate: float = 4.5e-6,
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
        self.learning_rate = learning_rate

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

    # -- training ------------------------------------------------------------------------------

    def get_input(self, batch: Mapping[str, Any], k: str) -> torch.Tensor:
        """`batch[k]` (B, H, W, C) in [-1, 1] as a contiguous float (B, C, H, W) tensor."""
        x = batch[k]
        if x.ndim == 3:
            x = x[..., None]
        return rearrange(x, "b h w c -> b c h w").to(memory_format=torch.contiguous_format).float()

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        if isinstance(self.loss, nn.Identity):
            raise ValueError("this AutoencoderKL's lossconfig is torch.nn.Identity, which cannot train it; set "
                             "lossconfig to ldm.modules.losses.ReconstructionKLLoss")
        inputs = self.get_input(batch, self.image_key)
        reconstructions, posterior = self(inputs)
        loss, log_dict = self.loss(inputs, reconstructions, posterior, split="train")
        self.log_dict(log_dict, prog_bar=True, logger=True, on_step=True, on_epoch=True, batch_size=len(inputs))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        parameters = [*self.encoder.parameters(), *self.decoder.parameters(), *self.quant_conv.parameters(),
                      *self.post_quant_conv.parameters()]
        return torch.optim.Adam(parameters, lr=self.learning_rate, betas=(0.5, 0.9))


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
