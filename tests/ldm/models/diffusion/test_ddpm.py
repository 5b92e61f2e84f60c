"""The diffusion process of DDPM / LatentDiffusion: schedule buffers, forward process, loss keys."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ldm.models.diffusion.ddpm import DDPM
from ldm.modules.diffusionmodules.util import make_beta_schedule

TINY_UNET = {
    "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
    "params": {"image_size": 8, "in_channels": 4, "out_channels": 4, "model_channels": 32,
               "attention_resolutions": [], "num_res_blocks": 1, "channel_mult": [1, 2], "num_heads": 2},
}
SCHEDULE_BUFFERS = ["betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2"]


@pytest.fixture(scope="module")
def sd_ddpm() -> DDPM:
    return DDPM(TINY_UNET, linear_start=0.00085, linear_end=0.012, use_ema=False, channels=4, image_size=8)


def test_sd15_betas_follow_the_scaled_linear_formula():
    betas = make_beta_schedule("linear", 1000, linear_start=0.00085, linear_end=0.012)
    expected = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000, dtype=np.float64) ** 2
    np.testing.assert_allclose(betas, expected, rtol=1e-14)
    assert betas[0] == pytest.approx(0.00085, rel=1e-12)
    assert betas[1] == pytest.approx(0.0008546986554056862, rel=1e-12)
    assert betas[-1] == pytest.approx(0.012, rel=1e-12)


def test_schedule_buffers_have_the_original_names_values_and_persistence(sd_ddpm):
    state = sd_ddpm.state_dict()
    top_level = [key for key in state if "." not in key]
    assert top_level == SCHEDULE_BUFFERS + ["logvar"]
    assert "lvlb_weights" not in state  # non-persistent, as the original
    assert all(state[key].dtype == torch.float32 for key in top_level)
    assert float(sd_ddpm.alphas_cumprod[0]) == pytest.approx(0.99915, rel=1e-6)
    assert float(sd_ddpm.alphas_cumprod[-1]) == pytest.approx(0.004660098513, rel=1e-6)
    assert float(sd_ddpm.sqrt_alphas_cumprod[-1]) == pytest.approx(0.06826492, rel=1e-6)
    assert float(sd_ddpm.sqrt_one_minus_alphas_cumprod[-1]) == pytest.approx(0.99766725, rel=1e-6)
    assert float(sd_ddpm.lvlb_weights[0]) == float(sd_ddpm.lvlb_weights[1]) == pytest.approx(0.5032, abs=1e-4)
    assert float(sd_ddpm.lvlb_weights[2]) == pytest.approx(0.2524, abs=1e-4)
    assert float(sd_ddpm.lvlb_weights[999]) == pytest.approx(0.0061, abs=1e-4)
    assert torch.equal(sd_ddpm.logvar, torch.zeros(1000))


def test_forward_process_formulas(sd_ddpm):
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 8, 8, generator=generator)
    noise = torch.randn(3, 4, 8, 8, generator=generator)
    t = torch.tensor([0, 500, 999])
    x_t = sd_ddpm.q_sample(x0, t, noise)
    a = sd_ddpm.alphas_cumprod[t].view(3, 1, 1, 1)
    torch.testing.assert_close(x_t, a.sqrt() * x0 + (1 - a).sqrt() * noise)
    torch.testing.assert_close(sd_ddpm.predict_start_from_noise(x_t, t, noise), x0, atol=2e-4, rtol=1e-4)
    v = sd_ddpm.get_v(x0, noise, t)
    torch.testing.assert_close(sd_ddpm.predict_start_from_z_and_v(x_t, t, v), x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sd_ddpm.predict_eps_from_z_and_v(x_t, t, v), noise, atol=1e-5, rtol=1e-5)


def test_loss_dict_keys_and_plain_mse(sd_ddpm):
    generator = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 4, 8, 8, generator=generator)
    noise = torch.randn(2, 4, 8, 8, generator=generator)
    t = torch.tensor([10, 700])
    sd_ddpm.train()
    loss, loss_dict = sd_ddpm.p_losses(x0, None, t, noise=noise)
    assert set(loss_dict) == {"train/loss_simple", "train/loss_vlb", "train/loss"}
    prediction = sd_ddpm.apply_model(sd_ddpm.q_sample(x0, t, noise), t)
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(prediction, noise))
    sd_ddpm.eval()
    _, loss_dict = sd_ddpm.p_losses(x0, None, t, noise=noise)
    assert set(loss_dict) == {"val/loss_simple", "val/loss_vlb", "val/loss"}


@pytest.mark.parametrize("kwargs, message", [
    ({"parameterization": "score"}, "parameterization"),
    ({"loss_type": "huber"}, "loss_type"),
    ({"conditioning_key": "film"}, "conditioning_key"),
])
def test_invalid_options_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DDPM(TINY_UNET, use_ema=False, **kwargs)
