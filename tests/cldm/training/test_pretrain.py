"""tool_pretrain_tiny_sd.py: a base in the Stable Diffusion layout that tool_add_control.py takes, deterministic
for a seed, with the finished VAE stage reused."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import tool_add_control
import tool_pretrain_tiny_sd
from cldm.checkpoints.extraction import to_half
from cldm.checkpoints.kinds import CONTROL_PREFIX
from cldm.model import create_model
from cldm.training.pretrain import base_model_config, build_base, build_vae
from ldm.checkpoint import read_state_dict
from ldm.util import instantiate_from_config
from tests.helpers.paths import TINY_CONFIG


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    """The tiny config with a scale factor that fits a VAE trained for a few steps (its posterior starts narrow,
    so its latents are the fresh encoder's means, of std about 0.34)."""
    config = OmegaConf.load(TINY_CONFIG)
    config.model.params.scale_factor = 3.0
    path = tmp_path_factory.mktemp("config") / "cldm_tiny_base.yaml"
    OmegaConf.save(config, path)
    return path


def _pretrain(config: Path, work_dir: Path, out: Path, *extra: str) -> int:
    argv = ["--config", config, "--work_dir", work_dir, "--out", out, "--count", "8", "--vae_steps", "2",
            "--vae_batch_size", "4", "--unet_steps", "2", "--unet_batch_size", "4", "--seed", "5", *extra]
    return tool_pretrain_tiny_sd.main([str(arg) for arg in argv])


def _differing(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> list[str]:
    assert got.keys() == want.keys()
    return [key for key, value in want.items() if not torch.equal(got[key], value)]


def test_base_config_has_the_stable_diffusion_layout() -> None:
    control_ldm_keys = set(create_model(TINY_CONFIG).state_dict())
    with torch.device("meta"):
        base_keys = set(instantiate_from_config(base_model_config(TINY_CONFIG)).state_dict())
    assert base_keys == {key for key in control_ldm_keys if not key.startswith(CONTROL_PREFIX)}


def test_pretrain_end_to_end(config: Path, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO)
    first, second = tmp_path / "first.ckpt", tmp_path / "second.ckpt"
    continued = tmp_path / "continued.safetensors"
    assert _pretrain(config, tmp_path / "work", first) == 0
    out = caplog.text
    assert "vae: 2 steps" in out and "unet: 2 steps" in out and "1/std = " in out
    assert f"Next: python tool_add_control.py {first} <control_ini.ckpt> --config {config}" in out
    # The same seed in a new work folder: the same weights.
    assert _pretrain(config, tmp_path / "other_work", second) == 0
    assert _differing(read_state_dict(first), read_state_dict(second)) == []
    # The finished VAE stage is reused, and the UNet stage is the same as after training it; --half stores it
    # in float16.
    assert len(list((tmp_path / "work").glob("vae-*.ckpt"))) == 1
    assert _pretrain(config, tmp_path / "work", continued, "--half") == 0
    assert "vae: using the finished stage" in caplog.text
    assert _differing(read_state_dict(continued), to_half(read_state_dict(first))) == []
    # tool_add_control.py takes it as a Stable Diffusion checkpoint of the config, strictly.
    initial = tmp_path / "control_ini.ckpt"
    assert tool_add_control.main([str(first), str(initial), "--config", str(config)]) == 0
    model = create_model(config)
    model.load_state_dict(read_state_dict(initial), strict=True)


def test_the_vae_posterior_starts_at_the_initial_log_variance() -> None:
    torch.manual_seed(0)
    vae = build_vae(TINY_CONFIG, kl_weight=1e-6, learning_rate=1e-3, initial_logvar=-8.0)
    posterior = vae.encode(torch.rand(2, 3, 64, 64) * 2 - 1)
    # The fresh encoder's output moves the log-variance only a little from the bias it starts at.
    assert abs(float(posterior.logvar.mean()) + 8.0) < 1.0
    assert float(posterior.std.max()) < 0.05


@pytest.mark.parametrize("train_text_encoder", [True, False])
def test_the_text_encoder_trains_with_the_unet_only_when_asked(train_text_encoder: bool) -> None:
    vae = build_vae(TINY_CONFIG, kl_weight=1e-6, learning_rate=1e-3)
    base = build_base(TINY_CONFIG, vae, seed=0, learning_rate=1e-3, train_text_encoder=train_text_encoder)
    text_encoder = list(base.cond_stage_model.parameters())
    trainable = {id(parameter) for parameter in base.trainable_parameters()}
    assert all(parameter.requires_grad == train_text_encoder for parameter in text_encoder)
    assert all((id(parameter) in trainable) == train_text_encoder for parameter in text_encoder)
    assert not any(parameter.requires_grad for parameter in base.first_stage_model.parameters())
    assert base.train().cond_stage_model.training == train_text_encoder


def test_the_unet_stage_learning_rate_falls_along_a_half_cosine_only_when_asked() -> None:
    vae = build_vae(TINY_CONFIG, kl_weight=1e-6, learning_rate=1e-3)
    constant = build_base(TINY_CONFIG, vae, seed=0, learning_rate=1e-3)
    assert isinstance(constant.configure_optimizers(), torch.optim.Optimizer)

    decaying = build_base(TINY_CONFIG, vae, seed=0, learning_rate=1e-3, decay_steps=4)
    [optimizer], [scheduler] = decaying.configure_optimizers()
    rates = []
    for _ in range(5):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler["scheduler"].step()
    assert scheduler["interval"] == "step"
    assert rates == pytest.approx([1e-3, 1e-3 * (1 + 2 ** -0.5) / 2, 5e-4, 1e-3 * (1 - 2 ** -0.5) / 2, 0.0])
