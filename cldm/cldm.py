"""ControlNet: a trainable copy of the UNet encoder whose zero-initialised taps steer a locked UNet."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
from einops import rearrange
from torch import nn
from torchvision.utils import make_grid

from ldm.modules.diffusionmodules.openaimodel import (
    TimestepEmbedSequential,
    UNetConfig,
    UNetModel,
    build_encoder,
    set_gradient_checkpointing,
)
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.modules.diffusionmodules.util import conv_nd, timestep_embedding, zero_module
from ldm.util import instantiate_from_config, log_txt_as_img

# ---------------------------------------------------------------------------------------------
# The locked UNet that receives the control residuals
# ---------------------------------------------------------------------------------------------


class ControlledUnetModel(UNetModel):
    """UNetModel whose middle output and decoder skips receive ControlNet residuals; the encoder runs frozen."""

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        control: Sequence[torch.Tensor] | None = None,
        only_mid_control: bool = False,
        **kwargs,
    ) -> torch.Tensor:
        """Predict the model output for `x` (B, C, H, W); `control` is ControlNet's list, middle residual last."""
        # 1. frozen encoder and middle block: no autograd, whatever is trainable
        skips = []
        with torch.no_grad():
            emb = self.time_embed(timestep_embedding(timesteps, self.model_channels, repeat_only=False))
            h = x.type(self.dtype)
            for block in self.input_blocks:
                h = block(h, emb, context)
                skips.append(h)
            h = self.middle_block(h, emb, context)  # (B, C_max, H / 2^(L-1), W / 2^(L-1))
        # 2. middle control residual (a copy of the list is consumed, the caller's list is left intact)
        residuals = list(control) if control is not None else None
        if residuals is not None:
            h = h + residuals.pop()
        # 3. decoder: each skip, popped in reverse order, gets its control residual
        for block in self.output_blocks:
            skip = skips.pop()
            if residuals is not None and not only_mid_control:
                skip = skip + residuals.pop()
            h = block(torch.cat([h, skip], dim=1), emb, context)
        h = h.type(x.dtype)  # (B, model_channels, H, W)
        return self.out(h)


# ---------------------------------------------------------------------------------------------
# The control branch
# ---------------------------------------------------------------------------------------------

# (out_channels, stride) of the hint encoder's convs before the zero conv: 8x downsampling in three steps.
_HINT_ENCODER_LAYERS = ((16, 1), (16, 1), (32, 2), (32, 1), (96, 2), (96, 1), (256, 2))


def _zero_conv(dims: int, channels: int) -> TimestepEmbedSequential:
    """A zero-initialised 1x1 conv: the ControlNet taps output exactly zero until trained."""
    return TimestepEmbedSequential(zero_module(conv_nd(dims, channels, channels, 1, padding=0)))


def _hint_encoder(dims: int, hint_channels: int, model_channels: int) -> TimestepEmbedSequential:
    """Convs + SiLUs from the hint image (8x the latent size) to the latent grid, ending in a zero conv."""
    layers = []
    channels = hint_channels
    for out_channels, stride in _HINT_ENCODER_LAYERS:
        layers += [conv_nd(dims, channels, out_channels, 3, padding=1, stride=stride), nn.SiLU()]
        channels = out_channels
    layers.append(zero_module(conv_nd(dims, channels, model_channels, 3, padding=1)))
    return TimestepEmbedSequential(*layers)


class ControlNet(nn.Module):
    """Trainable copy of the UNet encoder and middle block, fed a hint image, emitting one residual per skip.

    Takes `hint_channels` (channels of the hint image, whose spatial size must be 8x the latent's) and the fields of
    `UNetConfig`, the configuration it shares with UNetModel, as keyword arguments (a yaml's `params:`).
    """

    kwargs_class: ClassVar[type] = UNetConfig  # `**params` build it (ldm.util.accepted_params checks configs)

    def __init__(self, hint_channels: int, **params: Any) -> None:
        super().__init__()
        config = UNetConfig(**params)
        self.image_size = config.image_size
        self.in_channels = config.in_channels
        self.model_channels = config.model_channels
        self.hint_channels = hint_channels
        self.dtype = torch.float16 if config.use_fp16 else torch.float32
        dims = config.dims

        # Registration order = the original's state-dict order.
        encoder = build_encoder(config)
        self.time_embed = encoder.time_embed
        self.input_blocks = encoder.input_blocks
        self.zero_convs = nn.ModuleList(_zero_conv(dims, channels) for channels in encoder.skip_channels)
        self.input_hint_block = _hint_encoder(dims, hint_channels, config.model_channels)
        self.middle_block = encoder.middle_block
        self.middle_block_out = _zero_conv(dims, encoder.skip_channels[-1])
        set_gradient_checkpointing(self, config.use_checkpoint)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Turn activation checkpointing on or off in every block but the middle one (UNCHECKPOINTED_BLOCKS)."""
        set_gradient_checkpointing(self, enabled)

    def forward(
        self, x: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None, **kwargs
    ) -> list[torch.Tensor]:
        """Residuals for the UNet: one per input block (skip order), then the middle block's, last."""
        # 1. timestep embedding: (B, 4 * model_channels)
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels, repeat_only=False))
        # 2. hint encoding: (B, hint_channels, 8H, 8W) -> (B, model_channels, H, W)
        guided_hint = _in_float32(self.input_hint_block, hint, emb, context)
        # 3. encoder with a zero-conv tap after every block; the hint joins right after the stem conv
        stem, *blocks = self.input_blocks
        h = stem(x.type(self.dtype), emb, context) + guided_hint  # (B, model_channels, H, W)
        outs = [_in_float32(self.zero_convs[0], h, emb, context)]
        for block, zero_conv in zip(blocks, self.zero_convs[1:], strict=True):
            h = block(h, emb, context)
            outs.append(_in_float32(zero_conv, h, emb, context))
        # 4. middle block and its zero conv: (B, C_max, H / 2^(L-1), W / 2^(L-1))
        h = self.middle_block(h, emb, context)
        outs.append(_in_float32(self.middle_block_out, h, emb, context))
        return outs


def _in_float32(layers: TimestepEmbedSequential, h: torch.Tensor, emb: torch.Tensor,
                context: torch.Tensor | None) -> torch.Tensor:
    """`layers(h)` in float32 with autocast off: under mixed precision the hint encoder and the zero convolutions,
    whose outputs start at exactly zero and grow from small updates, stay float32-accurate (a no-op in float32)."""
    with torch.autocast(h.device.type, enabled=False):
        return layers(h.float(), emb, context)


# ---------------------------------------------------------------------------------------------
# ControlLDM: latent diffusion whose UNet is steered by the ControlNet
# ---------------------------------------------------------------------------------------------

GUESS_MODE_DECAY = 0.825
# Makes the optimizer of the trainable parameters from (parameters, learning rate).
OptimizerFactory = Callable[[list[nn.Parameter], float], torch.optim.Optimizer]


def control_scales_for(num_outputs: int, strength: float = 1.0, guess_mode: bool = False) -> list[float]:
    """Per-residual scales: `strength` everywhere, or decaying towards the shallow blocks in guess mode."""
    if guess_mode:
        return [strength * GUESS_MODE_DECAY ** float(num_outputs - 1 - i) for i in range(num_outputs)]
    return [strength] * num_outputs


class ControlLDM(LatentDiffusion):
    """`LatentDiffusion` with a ControlNet: a trainable copy of the UNet encoder fed by a hint image.

    Args:
        control_stage_config: config of the `ControlNet`.
        control_key: batch key of the hint image (NHWC in [0, 1]).
        only_mid_control: inject only the middle-block residual.
        sd_locked: keep the Stable Diffusion UNet frozen; when False its output blocks and `out` train too.
        learning_rate: AdamW learning rate.
        optimizer_factory: makes the optimizer from (trainable parameters, learning rate); None for
            `torch.optim.AdamW`, the paper's. The training job passes its own AdamW variants here.
    """

    def __init__(self, control_stage_config: Mapping[str, Any], control_key: str, only_mid_control: bool,
                 sd_locked: bool = True, learning_rate: float = 1e-5,
                 optimizer_factory: OptimizerFactory | None = None, **kwargs):
        super().__init__(learning_rate=learning_rate, **kwargs)
        self.optimizer_factory = optimizer_factory
        self.control_model = instantiate_from_config(control_stage_config)
        self.control_key = control_key
        self.only_mid_control = only_mid_control
        self.control_scales = control_scales_for(self.num_control_outputs)
        self.sd_locked = sd_locked
        # The empty prompt's embedding, set when a latent cache stands in for the text encoder (the training job).
        self.null_text_embedding: torch.Tensor | None = None

    @property
    def num_control_outputs(self) -> int:
        """Residuals the ControlNet emits: one per zero convolution plus the middle block's."""
        return len(self.control_model.zero_convs) + 1

    @property
    def sd_locked(self) -> bool:
        return self._sd_locked

    @sd_locked.setter
    def sd_locked(self, locked: bool) -> None:
        """Lock or unlock the UNet decoder; locked weights get no gradients (no memory, no all-reduce)."""
        unet = self.model.diffusion_model
        if not locked:
            decoder = [*unet.output_blocks.parameters(), *unet.out.parameters()]
            half = sorted({str(p.dtype) for p in decoder if p.is_floating_point() and p.dtype != torch.float32})
            if half:
                raise ValueError(f"cannot unlock the UNet decoder: its frozen weights are stored in {', '.join(half)} "
                                 "(store_frozen_weights_in); set sd_locked = False before storing frozen weights")
        self._sd_locked = bool(locked)
        unet.requires_grad_(False)
        if not locked:
            unet.output_blocks.requires_grad_(True)
            unet.out.requires_grad_(True)

    def set_control_strength(self, strength: float = 1.0, guess_mode: bool = False) -> None:
        """Scale the control residuals as the original apps do (guess mode: 0.825 ** (12 - i) for SD)."""
        self.control_scales = control_scales_for(self.num_control_outputs, strength, guess_mode)

    @torch.no_grad()
    def get_input(self, batch: Mapping[str, Any], k: str, bs: int | None = None, *args, **kwargs):
        """Latent of the target and `{'c_crossattn': [text], 'c_concat': [hint NCHW]}`."""
        x, c = super().get_input(batch, self.first_stage_key, *args, bs=bs, **kwargs)
        control = batch[self.control_key]
        if bs is not None:
            control = control[:bs]
        control = rearrange(control.to(self.device), "b h w c -> b c h w")
        control = control.to(memory_format=torch.contiguous_format).float()
        return x, dict(c_crossattn=[c], c_concat=[control])

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Mapping[str, Any], *args, **kwargs):
        """Noise prediction of the locked UNet plus the scaled ControlNet residuals (plain UNet without a hint)."""
        if not isinstance(cond, Mapping):
            raise TypeError(
                f"ControlLDM.apply_model needs a dict with c_crossattn and c_concat, got {type(cond).__name__}"
            )
        unet = self.model.diffusion_model
        context = torch.cat(cond["c_crossattn"], dim=1)
        if cond["c_concat"] is None:
            return unet(x=x_noisy, timesteps=t, context=context, control=None, only_mid_control=self.only_mid_control)
        control = self.control_model(x=x_noisy, hint=torch.cat(cond["c_concat"], dim=1), timesteps=t, context=context)
        control = [residual * scale for residual, scale in zip(control, self.control_scales)]
        return unet(x=x_noisy, timesteps=t, context=context, control=control, only_mid_control=self.only_mid_control)

    @torch.no_grad()
    def get_unconditional_conditioning(self, N: int):
        if self.null_text_embedding is not None:
            return self.null_text_embedding.to(self.device).expand(N, -1, -1)
        return self.get_learned_conditioning([""] * N)

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any], N: int = 4, n_row: int = 2, sample: bool = False,
                   ddim_steps: int = 50, ddim_eta: float = 0.0, return_keys=None, quantize_denoised: bool = True,
                   inpaint: bool = True, plot_denoise_rows: bool = False, plot_progressive_rows: bool = True,
                   plot_diffusion_rows: bool = False, unconditional_guidance_scale: float = 9.0,
                   unconditional_guidance_label=None, use_ema_scope: bool = True, **kwargs) -> dict[str, torch.Tensor]:
        """Images for the logger: reconstruction, control, conditioning text and guided samples.

        `return_keys`, `quantize_denoised`, `inpaint`, `plot_denoise_rows`, `plot_progressive_rows`,
        `unconditional_guidance_label` and `use_ema_scope` are accepted for the original's signature and ignored.
        """
        log = {}
        z, c = self.get_input(batch, self.first_stage_key, bs=N)
        c_cat, c = c["c_concat"][0][:N], c["c_crossattn"][0][:N]
        N = min(z.shape[0], N)
        n_row = min(z.shape[0], n_row)
        log["reconstruction"] = self.decode_first_stage(z)
        log["control"] = c_cat * 2.0 - 1.0
        captions = batch[self.cond_stage_key]
        if all(isinstance(caption, str) for caption in captions):
            log["conditioning"] = log_txt_as_img((512, 512), list(captions)[:N], size=16)
        if plot_diffusion_rows:
            log["diffusion_row"] = self._diffusion_row(z[:n_row])
        cond = {"c_concat": [c_cat], "c_crossattn": [c]}
        if sample:
            samples, _ = self.sample_log(cond=cond, batch_size=N, ddim=True, ddim_steps=ddim_steps, eta=ddim_eta)
            log["samples"] = self.decode_first_stage(samples)
        if unconditional_guidance_scale > 1.0:
            uc_full = {"c_concat": [c_cat], "c_crossattn": [self.get_unconditional_conditioning(N)]}
            samples_cfg, _ = self.sample_log(cond=cond, batch_size=N, ddim=True, ddim_steps=ddim_steps, eta=ddim_eta,
                                             unconditional_guidance_scale=unconditional_guidance_scale,
                                             unconditional_conditioning=uc_full)
            log[f"samples_cfg_scale_{unconditional_guidance_scale:.2f}"] = self.decode_first_stage(samples_cfg)
        return log

    def _diffusion_row(self, z: torch.Tensor) -> torch.Tensor:
        """Decoded q_sample of `z` at t = 0, log_every_t, ..., T - 1, one column per t."""
        rows = []
        for t in range(self.num_timesteps):
            if t % self.log_every_t == 0 or t == self.num_timesteps - 1:
                ts = torch.full((z.shape[0],), t, device=self.device, dtype=torch.long)
                rows.append(self.decode_first_stage(self.q_sample(x_start=z, t=ts, noise=torch.randn_like(z))))
        return make_grid(rearrange(torch.stack(rows), "n b c h w -> (b n) c h w"), nrow=len(rows))

    @torch.no_grad()
    def sample_log(self, cond: Mapping[str, Any], batch_size: int, ddim: bool, ddim_steps: int, **kwargs):
        """DDIM samples (latents) for the given conditioning, at 1/8 of the hint's resolution."""
        sampler = DDIMSampler(self)
        _, _, h, w = cond["c_concat"][0].shape
        shape = (self.channels, h // 8, w // 8)
        return sampler.sample(ddim_steps, batch_size, shape, cond, verbose=False, **kwargs)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The ControlNet, plus the UNet's output blocks and `out` when `sd_locked` is False."""
        params = list(self.control_model.parameters())
        if not self.sd_locked:
            unet = self.model.diffusion_model
            params += list(unet.output_blocks.parameters()) + list(unet.out.parameters())
        return params

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over `trainable_parameters()`, or what the constructor's `optimizer_factory` makes."""
        if self.optimizer_factory is None:
            return torch.optim.AdamW(self.trainable_parameters(), lr=self.learning_rate)
        return self.optimizer_factory(self.trainable_parameters(), self.learning_rate)

    def low_vram_shift(self, is_diffusing: bool, device: str | torch.device = "cuda") -> None:
        """Keep only what the current phase needs on `device` (diffusion: UNet + ControlNet; else VAE + text)."""
        on_device, off_device = (self.model, self.control_model), (self.first_stage_model, self.cond_stage_model)
        if not is_diffusing:
            on_device, off_device = off_device, on_device
        for module in on_device:
            module.to(device)
        for module in off_device:
            module.cpu()
