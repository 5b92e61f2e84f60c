"""Denoising diffusion in pixel and latent space: `DDPM`, `LatentDiffusion` and `DiffusionWrapper`.

The networks (UNet, VAE, text encoder) are plain modules built from config; this file holds the
diffusion process (schedule buffers and the forward-process formulas of Ho et al. 2020) and the
Lightning hooks that orchestrate training.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ldm.modules.diffusionmodules.util import extract_into_tensor, make_beta_schedule
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.ema import LitEma
from ldm.util import count_params, default, exists, instantiate_from_config

logger = logging.getLogger(__name__)

CONDITIONING_KEYS = (None, "concat", "crossattn", "hybrid", "adm", "hybrid-adm", "crossattn-adm")
PARAMETERIZATIONS = ("eps", "x0", "v")
# Batch keys of a latent cache (cldm.data.latent_cache): the VAE posterior's moments (B, 2C, h, w), mean and
# log-variance concatenated on the channel axis, in place of the image; the prompts' embeddings (B, 77, D) in place
# of the text.
LATENT_MOMENTS_KEY = "latent_moments"
TEXT_EMBEDDING_KEY = "txt_embedding"


# ---------------------------------------------------------------------------------------------
# DiffusionWrapper: routes the conditioning into the denoising network
# ---------------------------------------------------------------------------------------------


def _encoder_methods(model: nn.Module) -> list[str]:
    """The public methods a text encoder's own classes define (torch.nn.Module's are not among them)."""
    cls = type(model)
    return sorted(name for name in dir(cls) if not name.startswith("_") and callable(getattr(cls, name))
                  and (name == "forward" or not hasattr(nn.Module, name)))


def _checked_encoder_method(model: nn.Module | None, name: str | None) -> str | None:
    """`cond_stage_forward`: None, or the name of a method of the text encoder's own classes, which
    `get_learned_conditioning` calls with the prompts; any other name could call any method of torch.nn.Module."""
    if name is None:
        return None
    if model is None:
        raise ValueError(f"cond_stage_forward '{name}' needs a cond_stage_config with a text encoder; remove the key")
    methods = _encoder_methods(model)
    if name not in methods:
        raise ValueError(f"cond_stage_forward '{name}' is not a method of the text encoder {type(model).__name__}; "
                         f"use one of {', '.join(methods)}, or remove the key")
    return name


class DiffusionWrapper(nn.Module):
    """Holds the denoising network as `diffusion_model` and feeds it conditioning by `conditioning_key`."""

    def __init__(self, diff_model_config: Mapping[str, Any], conditioning_key: str | None):
        super().__init__()
        if conditioning_key not in CONDITIONING_KEYS:
            raise ValueError(f"conditioning_key '{conditioning_key}' is not one of {CONDITIONING_KEYS}")
        config = dict(diff_model_config)
        self.sequential_cross_attn = bool(config.pop("sequential_crossattn", False))
        self.diffusion_model = instantiate_from_config(config)
        self.conditioning_key = conditioning_key

    def forward(self, x: torch.Tensor, t: torch.Tensor, c_concat: list | None = None,
                c_crossattn: list | None = None, c_adm: torch.Tensor | None = None) -> torch.Tensor:
        key = self.conditioning_key
        if key is None:
            return self.diffusion_model(x, t)
        if key == "concat":
            return self.diffusion_model(torch.cat([x, *c_concat], dim=1), t)
        if key == "crossattn":
            return self.diffusion_model(x, t, context=torch.cat(c_crossattn, dim=1))
        if key == "hybrid":
            return self.diffusion_model(torch.cat([x, *c_concat], dim=1), t, context=torch.cat(c_crossattn, dim=1))
        if key == "adm":
            return self.diffusion_model(x, t, y=c_crossattn[0])
        context = torch.cat(c_crossattn, dim=1)
        if key == "hybrid-adm":
            return self.diffusion_model(torch.cat([x, *c_concat], dim=1), t, context=context, y=c_adm)
        return self.diffusion_model(x, t, context=context, y=c_adm)  # crossattn-adm


# ---------------------------------------------------------------------------------------------
# DDPM: schedule, forward process, loss, Lightning hooks
# ---------------------------------------------------------------------------------------------


class DDPM(pl.LightningModule):
    """Gaussian diffusion with a denoising network; trains with the simple (MSE) objective."""

    def __init__(
        self,
        unet_config: Mapping[str, Any],
        timesteps: int = 1000,
        beta_schedule: str = "linear",
        loss_type: str = "l2",
        ckpt_path: str | None = None,
        ignore_keys: Sequence[str] = (),
        load_only_unet: bool = False,
        monitor: str | None = "val/loss",
        use_ema: bool = True,
        first_stage_key: str = "image",
        image_size: int = 256,
        channels: int = 3,
        log_every_t: int = 100,
        clip_denoised: bool = True,
        linear_start: float = 1e-4,
        linear_end: float = 2e-2,
        cosine_s: float = 8e-3,
        given_betas: Sequence[float] | None = None,
        original_elbo_weight: float = 0.0,
        v_posterior: float = 0.0,
        l_simple_weight: float = 1.0,
        conditioning_key: str | None = None,
        parameterization: str = "eps",
        scheduler_config: Mapping[str, Any] | None = None,
        use_positional_encodings: bool = False,
        learn_logvar: bool = False,
        logvar_init: float = 0.0,
        make_it_fit: bool = False,
        ucg_training: Mapping[str, Any] | None = None,
        reset_ema: bool = False,
        reset_num_ema_updates: bool = False,
        learning_rate: float = 1e-4,
    ):
        super().__init__()
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization '{parameterization}' is not one of {PARAMETERIZATIONS}")
        if loss_type not in ("l1", "l2"):
            raise ValueError(f"loss_type '{loss_type}' is not 'l1' or 'l2'")
        if make_it_fit:
            raise ValueError("make_it_fit is not supported; load weights of the same architecture instead")
        self.parameterization = parameterization
        self.cond_stage_model = None
        self.clip_denoised = clip_denoised
        self.log_every_t = log_every_t
        self.first_stage_key = first_stage_key
        self.image_size = image_size
        self.channels = channels
        self.use_positional_encodings = use_positional_encodings
        self.model = DiffusionWrapper(unet_config, conditioning_key)
        count_params(self.model, verbose=True)
        self.use_ema = use_ema
        if self.use_ema:
            self.model_ema = LitEma(self.model)
        self.use_scheduler = scheduler_config is not None
        self.scheduler_config = scheduler_config
        self.v_posterior = v_posterior
        self.original_elbo_weight = original_elbo_weight
        self.l_simple_weight = l_simple_weight
        self.loss_type = loss_type
        self.learning_rate = learning_rate
        if monitor is not None:
            self.monitor = monitor

        self.register_schedule(given_betas=given_betas, beta_schedule=beta_schedule, timesteps=timesteps,
                               linear_start=linear_start, linear_end=linear_end, cosine_s=cosine_s)

        self.learn_logvar = learn_logvar
        logvar = torch.full((self.num_timesteps,), logvar_init)
        if self.learn_logvar:
            self.logvar = nn.Parameter(logvar, requires_grad=True)
        else:
            self.register_buffer("logvar", logvar)

        self.ucg_training = dict(ucg_training or {})
        self.ucg_prng = np.random.RandomState() if self.ucg_training else None

        self.restore(ckpt_path, ignore_keys, load_only_unet, reset_ema, reset_num_ema_updates)

    # -- schedule -------------------------------------------------------------------------------

    def register_schedule(self, given_betas=None, beta_schedule: str = "linear", timesteps: int = 1000,
                          linear_start: float = 1e-4, linear_end: float = 2e-2, cosine_s: float = 8e-3) -> None:
        """Register the schedule buffers under the original names (computed in float64, stored float32)."""
        if exists(given_betas):
            betas = np.asarray(given_betas, dtype=np.float64)
        else:
            betas = make_beta_schedule(beta_schedule, timesteps, linear_start=linear_start,
                                       linear_end=linear_end, cosine_s=cosine_s)
        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas, axis=0)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        self.num_timesteps = int(betas.shape[0])
        self.linear_start = linear_start
        self.linear_end = linear_end

        def buffer(name: str, value: np.ndarray) -> None:
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32))

        buffer("betas", betas)
        buffer("alphas_cumprod", alphas_cumprod)
        buffer("alphas_cumprod_prev", alphas_cumprod_prev)

        # q(x_t | x_0)
        buffer("sqrt_alphas_cumprod", np.sqrt(alphas_cumprod))
        buffer("sqrt_one_minus_alphas_cumprod", np.sqrt(1.0 - alphas_cumprod))
        buffer("log_one_minus_alphas_cumprod", np.log(1.0 - alphas_cumprod))
        buffer("sqrt_recip_alphas_cumprod", np.sqrt(1.0 / alphas_cumprod))
        buffer("sqrt_recipm1_alphas_cumprod", np.sqrt(1.0 / alphas_cumprod - 1))

        # posterior q(x_{t-1} | x_t, x_0)
        posterior_variance = ((1 - self.v_posterior) * betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
                              + self.v_posterior * betas)
        buffer("posterior_variance", posterior_variance)
        # log clipped because the posterior variance is 0 at the start of the chain
        buffer("posterior_log_variance_clipped", np.log(np.maximum(posterior_variance, 1e-20)))
        buffer("posterior_mean_coef1", betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod))
        buffer("posterior_mean_coef2", (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod))

        # weights of the variational bound per timestep (float32 arithmetic, as the original)
        if self.parameterization == "eps":
            lvlb_weights = self.betas**2 / (
                2 * self.posterior_variance * torch.tensor(alphas, dtype=torch.float32) * (1 - self.alphas_cumprod))
        elif self.parameterization == "x0":
            sqrt_ac = torch.sqrt(torch.tensor(alphas_cumprod, dtype=torch.float32))
            lvlb_weights = 0.5 * sqrt_ac / (2.0 * 1 - torch.tensor(alphas_cumprod, dtype=torch.float32))
        else:
            lvlb_weights = torch.ones_like(self.betas)
        lvlb_weights[0] = lvlb_weights[1]
        self.register_buffer("lvlb_weights", lvlb_weights, persistent=False)

    # -- EMA --------------------------------------------------------------------------------------

    @contextmanager
    def ema_scope(self, context: str | None = None) -> Iterator[None]:
        """Temporarily swap the EMA weights into `self.model` (no-op without EMA)."""
        if self.use_ema:
            self.model_ema.store(self.model.parameters())
            self.model_ema.copy_to(self.model)
            if context is not None:
                logger.info("%s: switched to EMA weights", context)
        try:
            yield None
        finally:
            if self.use_ema:
                self.model_ema.restore(self.model.parameters())
                if context is not None:
                    logger.info("%s: restored training weights", context)

    def restore(self, ckpt_path: str | None, ignore_keys: Sequence[str], only_model: bool, reset_ema: bool,
                reset_num_ema_updates: bool) -> None:
        """The constructor's optional start from `ckpt_path`, with the EMA reset options."""
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys, only_model=only_model)
            if reset_ema and self.use_ema:
                self.model_ema = LitEma(self.model)
        if reset_num_ema_updates and self.use_ema:
            self.model_ema.reset_num_updates()

    def init_from_ckpt(self, path: str, ignore_keys: Sequence[str] = (), only_model: bool = False) -> None:
        """Load weights non-strictly from `path`, dropping keys that start with any of `ignore_keys`."""
        from ldm.checkpoint import read_state_dict

        state_dict = read_state_dict(path)
        state_dict = {k: v for k, v in state_dict.items() if not any(k.startswith(p) for p in ignore_keys)}
        target = self.model if only_model else self
        missing, unexpected = target.load_state_dict(state_dict, strict=False)
        logger.info("Restored from %s with %d missing and %d unexpected keys", path, len(missing), len(unexpected))

    # -- forward process q(x_t | x_0) and its inversions -----------------------------------------

    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor):
        """Mean, variance and log-variance of q(x_t | x_0)."""
        mean = extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
        variance = extract_into_tensor(1.0 - self.alphas_cumprod, t, x_start.shape)
        log_variance = extract_into_tensor(self.log_one_minus_alphas_cumprod, t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0) = N(sqrt(a_t) x_0, (1 - a_t) I) (Ho et al. 2020, eq. 4)."""
        noise = default(noise, lambda: torch.randn(x_start.shape, device=x_start.device, dtype=x_start.dtype))
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
                + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

    def get_v(self, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The v-prediction target sqrt(a_t) eps - sqrt(1 - a_t) x_0 (Salimans & Ho 2022)."""
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x.shape) * noise
                - extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x.shape) * x)

    def predict_start_from_noise(self, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return (extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                - extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * noise)

    def predict_start_from_z_and_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x_t.shape) * x_t
                - extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * v)

    def predict_eps_from_z_and_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x_t.shape) * v
                + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * x_t)

    def q_posterior(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (extract_into_tensor(self.posterior_mean_coef1, t, x_t.shape) * x_start
                + extract_into_tensor(self.posterior_mean_coef2, t, x_t.shape) * x_t)
        variance = extract_into_tensor(self.posterior_variance, t, x_t.shape)
        log_variance = extract_into_tensor(self.posterior_log_variance_clipped, t, x_t.shape)
        return mean, variance, log_variance

    # -- loss ---------------------------------------------------------------------------------------

    def get_loss(self, pred: torch.Tensor, target: torch.Tensor, mean: bool = True) -> torch.Tensor:
        if self.loss_type == "l1":
            loss = (target - pred).abs()
            return loss.mean() if mean else loss
        return F.mse_loss(target, pred) if mean else F.mse_loss(target, pred, reduction="none")

    def training_target(self, x_start: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network is trained to predict under the configured parameterization."""
        if self.parameterization == "eps":
            return noise
        if self.parameterization == "x0":
            return x_start
        return self.get_v(x_start, noise, t)

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        return self.model(x_noisy, t)

    def p_losses(self, x_start: torch.Tensor, cond: Any, t: torch.Tensor, noise: torch.Tensor | None = None):
        """The training objective at timesteps `t`: (loss, loss_dict with the original's keys)."""
        noise = default(noise, lambda: torch.randn(x_start.shape, device=x_start.device, dtype=x_start.dtype))
        x_noisy = self.q_sample(x_start=x_start, t=t, noise=noise)
        model_output = self.apply_model(x_noisy, t, cond)
        target = self.training_target(x_start, noise, t)
        prefix = "train" if self.training else "val"

        loss_simple = self.get_loss(model_output, target, mean=False).mean(dim=[1, 2, 3])
        loss_dict = {f"{prefix}/loss_simple": loss_simple.mean()}

        logvar_t = self.logvar[t].to(x_start.device)
        loss = loss_simple / torch.exp(logvar_t) + logvar_t
        if self.learn_logvar:
            loss_dict[f"{prefix}/loss_gamma"] = loss.mean()
            loss_dict["logvar"] = self.logvar.data.mean()
        loss = self.l_simple_weight * loss.mean()

        loss_vlb = (self.lvlb_weights[t] * loss_simple).mean()
        loss_dict[f"{prefix}/loss_vlb"] = loss_vlb
        loss = loss + self.original_elbo_weight * loss_vlb
        loss_dict[f"{prefix}/loss"] = loss
        return loss, loss_dict

    def forward(self, x: torch.Tensor, *args, **kwargs):
        t = torch.randint(0, self.num_timesteps, (x.shape[0],), device=self.device).long()
        return self.p_losses(x, None, t, *args, **kwargs)

    # -- data ---------------------------------------------------------------------------------------

    def get_input(self, batch: Mapping[str, Any], k: str) -> torch.Tensor:
        """`batch[k]` as a contiguous float NCHW tensor (the data set yields NHWC)."""
        x = batch[k]
        if x.ndim == 3:
            x = x[..., None]
        x = rearrange(x, "b h w c -> b c h w")
        return x.to(memory_format=torch.contiguous_format).float()

    def shared_step(self, batch: Mapping[str, Any]):
        x = self.get_input(batch, self.first_stage_key)
        return self(x)

    def _batch_size(self, batch: Mapping[str, Any]) -> int:
        """Samples in `batch`: its images, or their cached latent moments."""
        return len(batch[LATENT_MOMENTS_KEY if LATENT_MOMENTS_KEY in batch else self.first_stage_key])

    def apply_ucg(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Replace conditioning entries by their null value with the configured probabilities."""
        for key, spec in self.ucg_training.items():
            p, value = spec["p"], spec["val"]
            batch[key] = [value if self.ucg_prng.choice(2, p=[1 - p, p]) else item for item in batch[key]]
        return batch

    # -- Lightning hooks -----------------------------------------------------------------------

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if self.ucg_training:
            batch = self.apply_ucg(batch)
        loss, loss_dict = self.shared_step(batch)
        batch_size = self._batch_size(batch)
        self.log_dict(loss_dict, prog_bar=True, logger=True, on_step=True, on_epoch=True, batch_size=batch_size)
        self.log("global_step", float(self.global_step), prog_bar=True, logger=True, on_step=True,
                 on_epoch=False, batch_size=batch_size)
        if self.use_scheduler:
            lr = self.optimizers().param_groups[0]["lr"]
            self.log("lr_abs", lr, prog_bar=True, logger=True, on_step=True, on_epoch=False, batch_size=batch_size)
        return loss

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        _, loss_dict = self.shared_step(batch)
        batch_size = self._batch_size(batch)
        self.log_dict(loss_dict, prog_bar=False, logger=True, on_step=False, on_epoch=True, batch_size=batch_size)
        if self.use_ema:
            with self.ema_scope():
                _, loss_dict_ema = self.shared_step(batch)
            loss_dict_ema = {f"{key}_ema": value for key, value in loss_dict_ema.items()}
            self.log_dict(loss_dict_ema, logger=True, on_step=False, on_epoch=True, batch_size=batch_size)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.use_ema:
            self.model_ema(self.model)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimizer updates."""
        params = list(self.model.parameters())
        if self.learn_logvar:
            params.append(self.logvar)
        return params

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.trainable_parameters(), lr=self.learning_rate)
        if not self.use_scheduler:
            return optimizer
        scheduler = instantiate_from_config(self.scheduler_config)
        lr_scheduler = {"scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=scheduler.schedule),
                        "interval": "step", "frequency": 1}
        return [optimizer], [lr_scheduler]


# ---------------------------------------------------------------------------------------------
# LatentDiffusion: diffusion in the latent space of a frozen autoencoder, with text conditioning
# ---------------------------------------------------------------------------------------------


class LatentDiffusion(DDPM):
    """Diffusion on VAE latents conditioned on a frozen (or trainable) text encoder (Rombach et al. 2022)."""

    def __init__(
        self,
        first_stage_config: Mapping[str, Any],
        cond_stage_config: Mapping[str, Any] | str,
        num_timesteps_cond: int | None = None,
        cond_stage_key: str = "image",
        cond_stage_trainable: bool = False,
        concat_mode: bool = True,
        cond_stage_forward: str | None = None,
        conditioning_key: str | None = None,
        scale_factor: float = 1.0,
        scale_by_std: bool = False,
        force_null_conditioning: bool = False,
        **kwargs,
    ):
        self.force_null_conditioning = force_null_conditioning
        self.num_timesteps_cond = default(num_timesteps_cond, 1)
        self.scale_by_std = scale_by_std
        if self.num_timesteps_cond > kwargs.get("timesteps", 1000):
            raise ValueError("num_timesteps_cond must not exceed timesteps")
        if conditioning_key is None:
            conditioning_key = "concat" if concat_mode else "crossattn"
        if cond_stage_config == "__is_unconditional__" and not force_null_conditioning:
            conditioning_key = None
        ckpt_path = kwargs.pop("ckpt_path", None)
        ignore_keys = kwargs.pop("ignore_keys", ())
        reset_ema = kwargs.pop("reset_ema", False)
        reset_num_ema_updates = kwargs.pop("reset_num_ema_updates", False)
        super().__init__(conditioning_key=conditioning_key, **kwargs)
        self.concat_mode = concat_mode
        self.cond_stage_trainable = cond_stage_trainable
        self.cond_stage_key = cond_stage_key
        self.num_downs = len(first_stage_config["params"]["ddconfig"]["ch_mult"]) - 1
        if scale_by_std:
            self.register_buffer("scale_factor", torch.tensor(scale_factor))
        else:
            self.scale_factor = scale_factor
        self.first_stage_model = self.instantiate_first_stage(first_stage_config)
        self.cond_stage_model = self.instantiate_cond_stage(cond_stage_config)
        self.cond_stage_forward = _checked_encoder_method(self.cond_stage_model, cond_stage_forward)
        self.clip_denoised = False
        self.bbox_tokenizer = None
        self.restarted_from_ckpt = ckpt_path is not None
        self.restore(ckpt_path, ignore_keys, False, reset_ema, reset_num_ema_updates)

    # -- frozen sub-models -------------------------------------------------------------------------

    @staticmethod
    def _frozen(model: nn.Module) -> nn.Module:
        model.eval()
        for param in model.parameters():
            param.requires_grad = False
        return model

    def instantiate_first_stage(self, config: Mapping[str, Any]) -> nn.Module:
        return self._frozen(instantiate_from_config(config))

    def instantiate_cond_stage(self, config: Mapping[str, Any] | str) -> nn.Module | None:
        if config == "__is_first_stage__":
            raise ValueError("cond_stage_config '__is_first_stage__' is not supported; configure a text encoder")
        if config == "__is_unconditional__":
            return None
        model = instantiate_from_config(config)
        return model if self.cond_stage_trainable else self._frozen(model)

    def train(self, mode: bool = True) -> LatentDiffusion:
        """Switch training mode; the frozen VAE (and a frozen text encoder) always stay in eval mode."""
        super().train(mode)
        self.first_stage_model.eval()
        if self.cond_stage_model is not None and not self.cond_stage_trainable:
            self.cond_stage_model.eval()
        return self

    # -- first stage (VAE) -------------------------------------------------------------------

    def get_first_stage_encoding(self, encoder_posterior: DiagonalGaussianDistribution | torch.Tensor) -> torch.Tensor:
        """A latent sample of the posterior, times `scale_factor`."""
        if isinstance(encoder_posterior, DiagonalGaussianDistribution):
            z = encoder_posterior.sample()
        elif isinstance(encoder_posterior, torch.Tensor):
            z = encoder_posterior
        else:
            raise TypeError(f"encoder_posterior of type {type(encoder_posterior).__name__} is not supported")
        return self.scale_factor * z

    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        return self.first_stage_model.encode(x)

    @torch.no_grad()
    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        return self.first_stage_model.decode(1.0 / self.scale_factor * z)

    # -- conditioning ------------------------------------------------------------------------------

    def get_learned_conditioning(self, c: Any) -> Any:
        """Encode raw conditioning (prompts) with the conditioning model."""
        if self.cond_stage_forward is not None:
            return getattr(self.cond_stage_model, self.cond_stage_forward)(c)
        if callable(getattr(self.cond_stage_model, "encode", None)):
            c = self.cond_stage_model.encode(c)
            return c.mode() if isinstance(c, DiagonalGaussianDistribution) else c
        return self.cond_stage_model(c)

    def _raw_conditioning(self, batch: Mapping[str, Any], cond_key: str, x: torch.Tensor) -> Any:
        if cond_key == self.first_stage_key:
            return x
        if cond_key in ("caption", "coordinates_bbox", "txt"):
            return batch[cond_key]
        if cond_key in ("class_label", "cls"):
            return batch
        return DDPM.get_input(self, batch, cond_key).to(self.device)

    @torch.no_grad()
    def get_input(self, batch: Mapping[str, Any], k: str, return_first_stage_outputs: bool = False,
                  force_c_encode: bool = False, cond_key: str | None = None, return_original_cond: bool = False,
                  bs: int | None = None, return_x: bool = False) -> list:
        """Encode `batch[k]` to a latent and the conditioning to its embedding: [z, c, ...extras].

        A batch from a latent cache holds the posterior moments and the prompts' embeddings instead (see
        `LATENT_MOMENTS_KEY`); z is sampled from the moments as from the encoder's, and x is then None.
        """
        z, x = self._first_stage_latent(batch, k, bs)

        c = xc = None
        if self.model.conditioning_key is not None and not self.force_null_conditioning:
            xc = self._raw_conditioning(batch, default(cond_key, self.cond_stage_key), x)
            if bs is not None:
                xc = xc[:bs]
            if TEXT_EMBEDDING_KEY in batch:
                c = batch[TEXT_EMBEDDING_KEY][:bs].to(self.device).float()
            elif not self.cond_stage_trainable or force_c_encode:
                c = self.get_learned_conditioning(xc if isinstance(xc, (dict, list)) else xc.to(self.device))
            else:
                c = xc

        out = [z, c]
        if return_first_stage_outputs:
            out.extend([x, self.decode_first_stage(z)])
        if return_x:
            out.append(x)
        if return_original_cond:
            out.append(xc)
        return out

    def _first_stage_latent(self, batch: Mapping[str, Any], k: str,
                            bs: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(z, x): a latent sample of the images `batch[k]` (x, NCHW on the device), or of their cached posterior
        moments (x None); both draw the same noise from the same generator."""
        if LATENT_MOMENTS_KEY in batch:
            moments = batch[LATENT_MOMENTS_KEY][:bs].to(self.device).float()
            return self.get_first_stage_encoding(DiagonalGaussianDistribution(moments)).detach(), None
        x = DDPM.get_input(self, batch, k)[:bs].to(self.device)
        return self.get_first_stage_encoding(self.encode_first_stage(x)).detach(), x

    # -- training ------------------------------------------------------------------------------

    def shared_step(self, batch: Mapping[str, Any], **kwargs):
        x, c = self.get_input(batch, self.first_stage_key)
        return self(x, c, **kwargs)

    def forward(self, x: torch.Tensor, c: Any, *args, **kwargs):
        t = torch.randint(0, self.num_timesteps, (x.shape[0],), device=self.device).long()
        if self.model.conditioning_key is not None and self.cond_stage_trainable:
            c = self.get_learned_conditioning(c)
        return self.p_losses(x, c, t, *args, **kwargs)

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
        if not isinstance(cond, dict):
            cond = cond if isinstance(cond, list) else [cond]
            key = "c_concat" if self.model.conditioning_key == "concat" else "c_crossattn"
            cond = {key: cond}
        return self.model(x_noisy, t, **cond)

    @torch.no_grad()
    def on_train_batch_start(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        """With `scale_by_std`, set the latent scale to 1/std of the first batch's latents."""
        if not (self.scale_by_std and self.current_epoch == 0 and self.global_step == 0 and batch_idx == 0
                and not self.restarted_from_ckpt):
            return
        z, _ = self._first_stage_latent(batch, self.first_stage_key, None)
        self.scale_factor = 1.0 / z.flatten().std()
        logger.info("setting scale_factor to %s", float(self.scale_factor))

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = super().trainable_parameters()
        if self.cond_stage_trainable:
            params.extend(self.cond_stage_model.parameters())
        return params
