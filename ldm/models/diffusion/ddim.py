"""DDIM sampling (Song et al. 2021) with classifier-free guidance, batched or sequential."""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ldm.modules.diffusionmodules.util import make_ddim_sampling_parameters, make_ddim_timesteps, noise_like

logger = logging.getLogger(__name__)

GUIDANCE_MODES = ("batched", "sequential")


def _concat_conditioning(uncond: Any, cond: Any) -> Any:
    """Stack unconditional and conditional inputs along the batch, as [uncond, cond]."""
    if cond is None or uncond is None:
        raise ValueError("batched guidance needs the same conditioning structure with and without the prompt; "
                         "use guidance='sequential' (cldm.ddim_hacked.DDIMSampler) for a None entry such as guess mode")
    if isinstance(cond, dict):
        return {key: _concat_conditioning(uncond[key], value) for key, value in cond.items()}
    if isinstance(cond, list):
        return [torch.cat([u, c]) for u, c in zip(uncond, cond)]
    return torch.cat([uncond, cond])


class DDIMSampler:
    """Deterministic (eta = 0) or stochastic DDIM sampler over a diffusion model's `apply_model`.

    Args:
        model: a `DDPM`-like model with `apply_model`, `alphas_cumprod`, `num_timesteps`.
        schedule: kept for the original signature ("linear").
        guidance: "batched" runs the unconditional and conditional passes as one forward of 2B
            samples (the stock sampler); "sequential" runs them one after the other (the "hacked"
            sampler of the gradio apps, which allows `c_concat: None` in the unconditional dict).
    """

    def __init__(self, model, schedule: str = "linear", guidance: str = "batched"):
        if guidance not in GUIDANCE_MODES:
            raise ValueError(f"guidance '{guidance}' is not one of {GUIDANCE_MODES}")
        self.model = model
        self.ddpm_num_timesteps = model.num_timesteps
        self.schedule = schedule
        self.guidance = guidance

    def register_buffer(self, name: str, attr: Any) -> None:
        """Store a schedule table; tensors live on the model's device."""
        if isinstance(attr, torch.Tensor):
            attr = attr.to(self.model.device)
        setattr(self, name, attr)

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0,
                      verbose: bool = True) -> None:
        """Choose the DDIM timesteps and precompute the per-step alphas and sigmas."""
        self.ddim_timesteps = make_ddim_timesteps(ddim_discretize, ddim_num_steps, self.ddpm_num_timesteps, verbose)
        alphas_cumprod = self.model.alphas_cumprod
        if alphas_cumprod.shape[0] != self.ddpm_num_timesteps:
            raise ValueError("alphas have to be defined for each timestep")
        self.register_buffer("betas", self.model.betas.detach().float())
        self.register_buffer("alphas_cumprod", alphas_cumprod.detach().float())
        self.register_buffer("alphas_cumprod_prev", self.model.alphas_cumprod_prev.detach().float())

        sigmas, alphas, alphas_prev = make_ddim_sampling_parameters(
            alphacums=alphas_cumprod.detach().float().cpu(), ddim_timesteps=self.ddim_timesteps, eta=ddim_eta,
            verbose=verbose)
        self.register_buffer("ddim_sigmas", sigmas)
        self.register_buffer("ddim_alphas", alphas)
        self.register_buffer("ddim_alphas_prev", alphas_prev)
        self.register_buffer("ddim_sqrt_one_minus_alphas", torch.sqrt(1.0 - alphas))

    @torch.no_grad()
    def sample(
        self,
        S: int,
        batch_size: int,
        shape: tuple[int, int, int],
        conditioning: Any = None,
        callback: Callable | None = None,
        normals_sequence: Any = None,
        img_callback: Callable | None = None,
        quantize_x0: bool = False,
        eta: float = 0.0,
        mask: torch.Tensor | None = None,
        x0: torch.Tensor | None = None,
        temperature: float = 1.0,
        noise_dropout: float = 0.0,
        score_corrector: Any = None,
        corrector_kwargs: dict | None = None,
        verbose: bool = True,
        x_T: torch.Tensor | None = None,
        log_every_t: int = 100,
        unconditional_guidance_scale: float = 1.0,
        unconditional_conditioning: Any = None,
        dynamic_threshold: float | None = None,
        ucg_schedule: list[float] | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """Run S DDIM steps from x_T (or fresh noise); returns (final latent, intermediates)."""
        if quantize_x0 or dynamic_threshold is not None:
            raise NotImplementedError("quantize_x0 and dynamic_threshold are not supported by this DDIM sampler")
        self._warn_batch_mismatch(conditioning, batch_size)
        self.make_schedule(ddim_num_steps=S, ddim_eta=eta, verbose=verbose)
        size = (batch_size, *shape)
        if verbose:
            logger.info("Data shape for DDIM sampling is %s, eta %s", size, eta)
        return self.ddim_sampling(
            conditioning, size, callback=callback, img_callback=img_callback, mask=mask, x0=x0,
            temperature=temperature, noise_dropout=noise_dropout, score_corrector=score_corrector,
            corrector_kwargs=corrector_kwargs, x_T=x_T, log_every_t=log_every_t,
            unconditional_guidance_scale=unconditional_guidance_scale,
            unconditional_conditioning=unconditional_conditioning, ucg_schedule=ucg_schedule, verbose=verbose)

    @staticmethod
    def _warn_batch_mismatch(conditioning: Any, batch_size: int) -> None:
        if isinstance(conditioning, dict):
            first = conditioning[next(iter(conditioning))]
            while isinstance(first, list):
                first = first[0]
            n = first.shape[0] if first is not None else batch_size
        elif isinstance(conditioning, list):
            n = conditioning[0].shape[0]
        elif isinstance(conditioning, torch.Tensor):
            n = conditioning.shape[0]
        else:
            return
        if n != batch_size:
            logger.warning("Got %d conditionings but batch-size is %d", n, batch_size)

    @torch.no_grad()
    def ddim_sampling(self, cond: Any, shape: tuple[int, ...], x_T: torch.Tensor | None = None,
                      callback: Callable | None = None, img_callback: Callable | None = None,
                      mask: torch.Tensor | None = None, x0: torch.Tensor | None = None, log_every_t: int = 100,
                      temperature: float = 1.0, noise_dropout: float = 0.0, score_corrector: Any = None,
                      corrector_kwargs: dict | None = None, unconditional_guidance_scale: float = 1.0,
                      unconditional_conditioning: Any = None, ucg_schedule: list[float] | None = None,
                      verbose: bool = True):
        """The DDIM loop from the noisiest selected timestep down to the first."""
        device = self.model.betas.device
        img = torch.randn(shape, device=device) if x_T is None else x_T
        timesteps = self.ddim_timesteps
        total_steps = timesteps.shape[0]
        intermediates = {"x_inter": [img], "pred_x0": [img]}
        iterator = tqdm(np.flip(timesteps), desc="DDIM Sampler", total=total_steps, disable=not verbose)
        for i, step in enumerate(iterator):
            index = total_steps - i - 1
            ts = torch.full((shape[0],), int(step), device=device, dtype=torch.long)
            if mask is not None:
                img = self.model.q_sample(x0, ts) * mask + (1.0 - mask) * img
            scale = ucg_schedule[i] if ucg_schedule is not None else unconditional_guidance_scale
            img, pred_x0 = self.p_sample_ddim(
                img, cond, ts, index=index, temperature=temperature, noise_dropout=noise_dropout,
                score_corrector=score_corrector, corrector_kwargs=corrector_kwargs,
                unconditional_guidance_scale=scale, unconditional_conditioning=unconditional_conditioning)
            if callback is not None:
                callback(i)
            if img_callback is not None:
                img_callback(pred_x0, i)
            if index % log_every_t == 0 or index == total_steps - 1:
                intermediates["x_inter"].append(img)
                intermediates["pred_x0"].append(pred_x0)
        return img, intermediates

    def guided_model_output(self, x: torch.Tensor, t: torch.Tensor, c: Any, unconditional_conditioning: Any,
                            unconditional_guidance_scale: float) -> torch.Tensor:
        """The model output with classifier-free guidance: e_u + scale * (e_c - e_u) (Ho & Salimans 2022)."""
        if unconditional_conditioning is None or unconditional_guidance_scale == 1.0:
            return self.model.apply_model(x, t, c)
        if self.guidance == "sequential":
            out_cond = self.model.apply_model(x, t, c)
            out_uncond = self.model.apply_model(x, t, unconditional_conditioning)
        else:
            c_in = _concat_conditioning(unconditional_conditioning, c)
            out_uncond, out_cond = self.model.apply_model(torch.cat([x] * 2), torch.cat([t] * 2), c_in).chunk(2)
        return out_uncond + unconditional_guidance_scale * (out_cond - out_uncond)

    @torch.no_grad()
    def p_sample_ddim(self, x: torch.Tensor, c: Any, t: torch.Tensor, index: int, repeat_noise: bool = False,
                      temperature: float = 1.0, noise_dropout: float = 0.0, score_corrector: Any = None,
                      corrector_kwargs: dict | None = None, unconditional_guidance_scale: float = 1.0,
                      unconditional_conditioning: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One DDIM update x_t -> x_{t-1} (Song et al. 2021, eq. 12); returns (x_prev, predicted x_0)."""
        b, device = x.shape[0], x.device
        model_output = self.guided_model_output(x, t, c, unconditional_conditioning, unconditional_guidance_scale)
        v_param = self.model.parameterization == "v"
        e_t = self.model.predict_eps_from_z_and_v(x, t, model_output) if v_param else model_output
        if score_corrector is not None:
            if v_param:
                raise ValueError("score_corrector is only supported for eps-prediction models")
            e_t = score_corrector.modify_score(self.model, e_t, x, t, c, **(corrector_kwargs or {}))

        # 1. the step's schedule values, broadcast over the batch
        a_t = torch.full((b, 1, 1, 1), float(self.ddim_alphas[index]), device=device)
        a_prev = torch.full((b, 1, 1, 1), float(self.ddim_alphas_prev[index]), device=device)
        sigma_t = torch.full((b, 1, 1, 1), float(self.ddim_sigmas[index]), device=device)
        sqrt_one_minus_at = torch.full((b, 1, 1, 1), float(self.ddim_sqrt_one_minus_alphas[index]), device=device)

        # 2. predicted x_0
        if v_param:
            pred_x0 = self.model.predict_start_from_z_and_v(x, t, model_output)
        else:
            pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()

        # 3. direction pointing to x_t, and the noise term (drawn every step, even when eta = 0)
        dir_xt = (1.0 - a_prev - sigma_t**2).sqrt() * e_t
        noise = sigma_t * noise_like(x.shape, device, repeat_noise) * temperature
        if noise_dropout > 0.0:
            noise = F.dropout(noise, p=noise_dropout)
        x_prev = a_prev.sqrt() * pred_x0 + dir_xt + noise
        return x_prev, pred_x0
