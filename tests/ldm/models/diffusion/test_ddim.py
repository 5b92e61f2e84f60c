"""DDIM: the original discretisation, tables, and guidance computed batched or sequentially."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cldm.ddim_hacked import DDIMSampler as HackedDDIMSampler
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.modules.diffusionmodules.util import make_ddim_timesteps


@pytest.mark.parametrize("steps, first, last, count", [(20, 1, 951, 20), (50, 1, 981, 50), (30, 1, 991, 31)])
def test_uniform_timesteps_keep_the_plus_one_offset(steps, first, last, count):
    timesteps = make_ddim_timesteps("uniform", steps, 1000, verbose=False)
    assert (timesteps[0], timesteps[-1], len(timesteps)) == (first, last, count)


@pytest.mark.parametrize("steps", [3, 9, 27, 37])
def test_step_counts_that_crashed_the_original_stay_in_range(steps):
    timesteps = make_ddim_timesteps("uniform", steps, 1000, verbose=False)
    assert timesteps.max() < 1000 and len(timesteps) == steps


class _LinearModel(torch.nn.Module):
    """A stand-in diffusion model: eps = a * x + conditioning, enough to exercise the sampler."""

    parameterization = "eps"
    num_timesteps = 1000

    def __init__(self):
        super().__init__()
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1 - betas, 0)
        self.register_buffer("betas", betas.float())
        self.register_buffer("alphas_cumprod", alphas_cumprod.float())
        self.register_buffer("alphas_cumprod_prev", torch.cat([torch.ones(1), alphas_cumprod[:-1].float()]))
        self.calls = []

    @property
    def device(self):
        return self.betas.device

    def apply_model(self, x, t, cond):
        self.calls.append(x.shape[0])
        context = torch.cat(cond["c_crossattn"], 1)
        shift = context.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        if cond["c_concat"] is not None:
            shift = shift + torch.cat(cond["c_concat"], 1).mean(dim=(1, 2, 3)).view(-1, 1, 1, 1)
        return 0.1 * x + shift


def _conditioning(seed: int, with_hint: bool = True) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"c_concat": [torch.rand(2, 3, 16, 16, generator=generator)] if with_hint else None,
            "c_crossattn": [torch.randn(2, 77, 8, generator=generator)]}


def test_first_previous_alpha_is_alphas_cumprod_0():
    sampler = DDIMSampler(_LinearModel())
    sampler.make_schedule(20, verbose=False)
    assert sampler.ddim_alphas_prev[0] == pytest.approx(0.99915, rel=1e-6)
    np.testing.assert_array_equal(sampler.ddim_sigmas, np.zeros(20))


def test_batched_and_sequential_guidance_agree():
    x_t = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(3))
    cond, uncond = _conditioning(1), _conditioning(2)
    results = []
    for sampler_class in (DDIMSampler, HackedDDIMSampler):
        model = _LinearModel()
        samples, intermediates = sampler_class(model).sample(
            5, 2, (4, 2, 2), conditioning=cond, x_T=x_t.clone(), verbose=False,
            unconditional_guidance_scale=7.5, unconditional_conditioning=uncond)
        results.append(samples)
        assert set(model.calls) == ({4} if sampler_class is DDIMSampler else {2})
        assert set(intermediates) == {"x_inter", "pred_x0"}
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-6)


def test_guess_mode_unconditional_without_hint_needs_sequential_guidance():
    cond, uncond = _conditioning(1), _conditioning(2, with_hint=False)
    HackedDDIMSampler(_LinearModel()).sample(2, 2, (4, 2, 2), conditioning=cond, verbose=False,
                                             unconditional_guidance_scale=3.0, unconditional_conditioning=uncond)
    with pytest.raises(ValueError, match="sequential"):
        DDIMSampler(_LinearModel()).sample(2, 2, (4, 2, 2), conditioning=cond, verbose=False,
                                           unconditional_guidance_scale=3.0, unconditional_conditioning=uncond)
