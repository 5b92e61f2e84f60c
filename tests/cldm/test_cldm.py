"""ControlLDM: state-dict layout of the real configs, the zero-convolution property, locking, logging."""
from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from cldm.cldm import ControlLDM, control_scales_for
from cldm.model import create_model
from ldm.util import instantiate_from_config
from tests.helpers.paths import FIXTURES, MODELS, TINY_CONFIG


@pytest.mark.parametrize("version", ["v15", "v21"])
def test_full_model_state_dict_equals_original_layout(version):
    expected = json.loads((FIXTURES / f"keys_cldm_{version}.json").read_text())
    config = OmegaConf.load(MODELS / f"cldm_{version}.yaml")
    with torch.device("meta"):  # full size, no memory
        model = instantiate_from_config(config.model)
    got = {key: [list(value.shape), str(value.dtype).removeprefix("torch.")] for key, value in model.state_dict().items()}
    assert sorted(set(expected) - set(got)) == []
    assert sorted(set(got) - set(expected)) == []
    assert {k: got[k] for k in expected} == expected
    assert model.num_control_outputs == 13
    assert len(model.control_scales) == 13


def test_guess_mode_scales_are_the_originals():
    scales = control_scales_for(13, strength=1.0, guess_mode=True)
    expected = [0.09941, 0.1205, 0.14606, 0.17705, 0.2146, 0.26012, 0.3153, 0.38218, 0.46325, 0.56152, 0.68062,
                0.825, 1.0]
    assert scales == pytest.approx(expected, abs=1e-5)
    assert control_scales_for(13, strength=0.5) == [0.5] * 13


@pytest.fixture(scope="module")
def tiny_model() -> ControlLDM:
    torch.manual_seed(0)
    return create_model(str(TINY_CONFIG))


def _batch(n: int = 2, size: int = 64) -> dict:
    generator = torch.Generator().manual_seed(1)
    return {
        "jpg": torch.rand(n, size, size, 3, generator=generator) * 2 - 1,
        "hint": torch.rand(n, size, size, 3, generator=generator),
        "txt": ["red circle with blue background", "green circle with black background"][:n],
    }


@torch.no_grad()
def test_fresh_controlnet_leaves_the_unet_unchanged_for_any_hint(tiny_model):
    # The paper's defining property: zero convolutions make every residual zero at initialisation.
    tiny_model.eval()
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([3, 900])
    context = tiny_model.get_learned_conditioning(["a", "b"])
    plain = tiny_model.apply_model(x, t, {"c_concat": None, "c_crossattn": [context]})
    for hint in (torch.rand(2, 3, 64, 64), torch.zeros(2, 3, 64, 64), torch.ones(2, 3, 64, 64)):
        controlled = tiny_model.apply_model(x, t, {"c_concat": [hint], "c_crossattn": [context]})
        torch.testing.assert_close(controlled, plain, rtol=0, atol=0)


def test_get_input_returns_latent_and_nchw_hint(tiny_model):
    batch = _batch()
    z, cond = tiny_model.get_input(batch, tiny_model.first_stage_key)
    assert z.shape == (2, 4, 8, 8)
    hint = cond["c_concat"][0]
    assert hint.shape == (2, 3, 64, 64) and hint.dtype == torch.float32 and hint.is_contiguous()
    torch.testing.assert_close(hint, batch["hint"].permute(0, 3, 1, 2))
    assert cond["c_crossattn"][0].shape == (2, 77, 32)


def test_sd_locked_freezes_the_unet_and_chooses_the_optimized_parameters():
    torch.manual_seed(0)
    model = create_model(str(TINY_CONFIG))
    unet = model.model.diffusion_model
    assert model.sd_locked and model.learning_rate == 1e-5
    assert not any(p.requires_grad for p in unet.parameters())
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in model.control_model.parameters()}

    model.sd_locked = False  # scripts may still assign the attribute, as the original tutorial did
    decoder = list(unet.output_blocks.parameters()) + list(unet.out.parameters())
    assert all(p.requires_grad for p in decoder)
    assert not any(p.requires_grad for p in unet.input_blocks.parameters())
    optimizer = model.configure_optimizers()
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in [*model.control_model.parameters(), *decoder]}
    assert optimizer.defaults["weight_decay"] == 0.01


def test_frozen_parts_stay_in_eval_mode(tiny_model):
    tiny_model.train()
    assert tiny_model.control_model.training
    assert not tiny_model.first_stage_model.training and not tiny_model.cond_stage_model.training
    tiny_model.eval()


def test_apply_model_rejects_non_dict_conditioning(tiny_model):
    with pytest.raises(TypeError, match="c_crossattn"):
        tiny_model.apply_model(torch.randn(1, 4, 8, 8), torch.tensor([1]), torch.randn(1, 77, 32))


def test_log_images_keys_and_shapes(tiny_model):
    images = tiny_model.log_images(_batch(), ddim_steps=2)
    assert sorted(images) == ["conditioning", "control", "reconstruction", "samples_cfg_scale_9.00"]
    assert images["reconstruction"].shape == (2, 3, 64, 64)
    assert images["samples_cfg_scale_9.00"].shape == (2, 3, 64, 64)
    assert images["conditioning"].shape == (2, 3, 512, 512)
    assert images["control"].min() >= -1 and images["control"].max() <= 1


def test_training_step_only_updates_the_control_model():
    torch.manual_seed(0)
    model = create_model(str(TINY_CONFIG))
    model.train()
    loss, loss_dict = model.shared_step(_batch())
    assert set(loss_dict) == {"train/loss_simple", "train/loss_vlb", "train/loss"}
    loss.backward()
    assert all(p.grad is None for p in model.model.parameters())
    assert all(p.grad is not None for p in model.control_model.parameters())


def test_training_settings_are_constructor_arguments():
    """The job passes sd_locked, the learning rate and its optimizer factory to the constructor (no attribute
    assignments after construction); the default optimizer is AdamW over the trainable parameters."""
    calls = []

    def factory(params, lr):
        calls.append((len(params), lr))
        return torch.optim.SGD(params, lr=lr)

    model = create_model(str(TINY_CONFIG), sd_locked=False, learning_rate=3e-4, optimizer_factory=factory)
    assert not model.sd_locked and isinstance(model.configure_optimizers(), torch.optim.SGD)
    assert calls == [(len(model.trainable_parameters()), 3e-4)]
    default = create_model(str(TINY_CONFIG)).configure_optimizers()
    assert type(default) is torch.optim.AdamW and default.defaults["lr"] == 1e-5
