"""ControlNet and ControlledUnetModel: state-dict tree, zero-init invariant, control plumbing, parity."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.testing import assert_close

from cldm.cldm import ControlledUnetModel, ControlNet
from ldm.modules.attention import BasicTransformerBlock
from ldm.modules.diffusionmodules.openaimodel import ResBlock, UNetModel
from tests.helpers.random_weights import randomize_

TINY = dict(
    image_size=8, in_channels=4, model_channels=32, attention_resolutions=[2, 1], num_res_blocks=1,
    channel_mult=[1, 2], num_heads=2, use_spatial_transformer=True, transformer_depth=1, context_dim=32,
    use_checkpoint=True, legacy=False,
)
TINY_UNET = dict(TINY, out_channels=4)
TINY_CONTROL = dict(TINY, hint_channels=3)
SD_CONTROLNET_PARAMETERS = {"v15": 361_279_120, "v21": 364_228_240}


def _inputs(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(2, 4, 8, 8, generator=generator),
        timesteps=torch.tensor([3, 901]),
        context=torch.randn(2, 5, 32, generator=generator),
    )


def _random_controls(seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = [(32, 8), (32, 8), (32, 4), (64, 4), (64, 4)]  # four input blocks, then the middle block
    return [torch.randn(2, channels, size, size, generator=generator) for channels, size in shapes]


def _fixture_module(fixtures_dir, name: str):
    spec = importlib.util.spec_from_file_location(f"tiny_parity_{name}", fixtures_dir / "tiny_parity" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# Full-size SD models on the meta device
# ---------------------------------------------------------------------------------------------


def _expected_keys(fixtures_dir, version: str, prefix: str) -> dict[str, list]:
    original = json.loads((fixtures_dir / f"keys_cldm_{version}.json").read_text())
    return {key.removeprefix(prefix): value for key, value in original.items() if key.startswith(prefix)}


def _keys(model: nn.Module) -> dict[str, list]:
    return {key: [list(t.shape), str(t.dtype).removeprefix("torch.")] for key, t in model.state_dict().items()}


@pytest.mark.parametrize("version", ["v15", "v21"])
def test_sd_controlnet_state_dict_equals_the_original(version, repo_root, fixtures_dir):
    params = OmegaConf.load(repo_root / f"models/cldm_{version}.yaml").model.params
    with torch.device("meta"):
        control = ControlNet(**params.control_stage_config.params)
        unet = ControlledUnetModel(**params.unet_config.params)
    expected = _expected_keys(fixtures_dir, version, "control_model.")
    got = _keys(control)
    assert sorted(set(expected) - set(got)) == [], "missing keys"
    assert sorted(set(got) - set(expected)) == [], "unexpected keys"
    assert got == expected
    assert list(got) == list(expected), "state-dict order differs from the original"
    assert sum(p.numel() for p in control.parameters()) == SD_CONTROLNET_PARAMETERS[version]
    assert _keys(unet) == _expected_keys(fixtures_dir, version, "model.diffusion_model.")


# ---------------------------------------------------------------------------------------------
# The control branch
# ---------------------------------------------------------------------------------------------


def test_fresh_controlnet_outputs_exact_zeros_for_any_hint():
    control = ControlNet(**TINY_CONTROL)
    hint = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        residuals = control(hint=hint, **_inputs())
    assert [tuple(r.shape[1:]) for r in residuals] == [(c.shape[1], *c.shape[2:]) for c in _random_controls()]
    assert all(not r.any() for r in residuals)


def test_hint_encoder_downsamples_by_eight_and_starts_at_zero():
    hint_block = ControlNet(**TINY_CONTROL).input_hint_block
    assert [type(layer).__name__ for layer in hint_block] == ["Conv2d", "SiLU"] * 7 + ["Conv2d"]
    assert [layer.stride[0] for layer in hint_block[::2]] == [1, 1, 2, 1, 2, 1, 2, 1]
    assert not hint_block[14].weight.any() and not hint_block[14].bias.any()
    assert hint_block[0].weight.any()
    assert hint_block(torch.rand(1, 3, 64, 64), None).shape == (1, 32, 8, 8)


def test_controlnet_encoder_is_a_trainable_copy_of_the_unet_encoder():
    unet = randomize_(ControlledUnetModel(**TINY_UNET))
    control = ControlNet(**TINY_CONTROL)
    for name in ("time_embed", "input_blocks", "middle_block"):
        getattr(control, name).load_state_dict(getattr(unet, name).state_dict())  # strict: same keys and shapes
    # With identity taps (and the still-zero hint), the control branch reproduces the UNet's encoder activations.
    with torch.no_grad():
        for tap in [*control.zero_convs, control.middle_block_out]:
            tap[0].weight.copy_(torch.eye(tap[0].weight.shape[0])[:, :, None, None])
        activations = []
        for block in [*unet.input_blocks, unet.middle_block]:
            block.register_forward_hook(lambda _module, _args, output: activations.append(output))
        unet(**_inputs())
        residuals = control(hint=torch.rand(2, 3, 64, 64), **_inputs())
    for residual, activation in zip(residuals, activations, strict=True):
        assert_close(residual, activation, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("from_config", [True, False])
def test_controlnet_checkpoints_every_block_but_the_middle_one(from_config):
    control = ControlNet(**{**TINY_CONTROL, "use_checkpoint": from_config})
    if not from_config:
        control.set_gradient_checkpointing(True)
    for name, layer in control.named_modules():
        if isinstance(layer, ResBlock):
            assert layer.use_checkpoint == (not name.startswith("middle_block.")), name
        elif isinstance(layer, BasicTransformerBlock):
            assert layer.checkpoint == (not name.startswith("middle_block.")), name


# ---------------------------------------------------------------------------------------------
# The controlled UNet
# ---------------------------------------------------------------------------------------------


def test_zero_controls_leave_the_unet_unchanged():
    unet = randomize_(ControlledUnetModel(**TINY_UNET))
    control = randomize_(ControlNet(**TINY_CONTROL))
    for tap in [*control.zero_convs, control.middle_block_out]:
        nn.init.zeros_(tap[0].weight), nn.init.zeros_(tap[0].bias)
    with torch.no_grad():
        residuals = control(hint=torch.rand(2, 3, 64, 64), **_inputs())
        plain = unet(**_inputs(), control=None)
        assert plain.abs().max() > 0.1
        assert torch.equal(unet(**_inputs(), control=residuals), plain)


def test_only_mid_control_ignores_the_skip_residuals():
    unet = randomize_(ControlledUnetModel(**TINY_UNET))
    controls = _random_controls()
    mid_only = [torch.zeros_like(c) for c in controls[:-1]] + [controls[-1]]
    with torch.no_grad():
        full = unet(**_inputs(), control=controls)
        only_mid = unet(**_inputs(), control=controls, only_mid_control=True)
        assert torch.equal(only_mid, unet(**_inputs(), control=mid_only))
        assert not torch.allclose(only_mid, full)
        assert not torch.allclose(only_mid, unet(**_inputs(), control=None))


def test_control_list_is_not_consumed():
    unet = randomize_(ControlledUnetModel(**TINY_UNET))
    controls = _random_controls()
    snapshot = list(controls)
    with torch.no_grad():
        first = unet(**_inputs(), control=controls)
        second = unet(**_inputs(), control=controls)  # the original popped the list empty here
    assert len(controls) == len(snapshot) and all(a is b for a, b in zip(controls, snapshot, strict=True))
    assert torch.equal(first, second)


def test_frozen_encoder_gets_no_gradients_but_the_control_branch_does():
    unet = randomize_(ControlledUnetModel(**TINY_UNET))
    control = randomize_(ControlNet(**TINY_CONTROL))
    residuals = control(hint=torch.rand(2, 3, 64, 64), **_inputs())
    unet(**_inputs(), control=residuals).square().mean().backward()
    for name, p in unet.named_parameters():
        trainable_part = name.startswith(("output_blocks.", "out."))
        assert (p.grad is not None) == trainable_part, name
    assert all(p.grad is not None for p in control.parameters())


# ---------------------------------------------------------------------------------------------
# Parity with the original implementation (tests/fixtures/tiny_parity)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn_backend", ["sdpa", "math"])
def test_tiny_parity_with_the_original(attn_backend, fixtures_dir):
    detweights = _fixture_module(fixtures_dir, "detweights")
    tiny_case = _fixture_module(fixtures_dir, "tiny_case")
    reference = torch.load(fixtures_dir / "tiny_parity" / "tiny_parity.pt", weights_only=True)
    params = OmegaConf.load(fixtures_dir / "tiny_parity" / "cldm_tiny.yaml").model.params
    holder = nn.Module()  # the key prefixes of ControlLDM, which detweights seeds by
    holder.control_model = ControlNet(**params.control_stage_config.params, attn_backend=attn_backend)
    holder.model = nn.Module()
    holder.model.diffusion_model = ControlledUnetModel(**params.unet_config.params, attn_backend=attn_backend)
    detweights.fill_(holder)
    inputs, expected = reference["inputs"], reference["outputs"]
    x_noisy, timesteps, hint, context = expected["q_sample"], inputs["t"], inputs["hint"], inputs["context"]
    unet = holder.model.diffusion_model

    got = {}
    with torch.no_grad():
        got["control"] = holder.control_model(x=x_noisy, hint=hint, timesteps=timesteps, context=context)
        got["eps"] = unet(x=x_noisy, timesteps=timesteps, context=context, control=got["control"])
        got["eps_no_control"] = unet(x=x_noisy, timesteps=timesteps, context=context, control=None)
    residuals = holder.control_model(x=x_noisy, hint=hint, timesteps=timesteps, context=context)
    eps = unet(x=x_noisy, timesteps=timesteps, context=context, control=residuals)
    loss = (eps - inputs["noise"]).square().mean()  # p_losses with logvar 0 and no ELBO term
    loss.backward()
    got["loss"] = loss.detach()
    got["grads_control"] = {name: p.grad for name, p in holder.control_model.named_parameters() if p.grad is not None}
    got["unet_params_with_grad"] = sorted(name for name, p in unet.named_parameters() if p.grad is not None)

    rows = {name: error for name, _, error, _ in tiny_case.compare(got, {name: expected[name] for name in got})}
    for name in ("control", "eps", "eps_no_control", "loss", "unet_params_with_grad"):
        assert rows[name] < 1e-5, (name, rows[name])
    # These gradients are ill-conditioned in float32: the same code in float32 vs float64 differs by ~7e-5.
    assert rows["grads_control"] < 1e-3, rows["grads_control"]


def test_unet_and_controlnet_share_one_configuration():
    """Both constructors take UNetConfig's fields: the same unknown key is refused by both, the same value read."""
    for build, extra in ((UNetModel, {"out_channels": 4}), (ControlNet, {"hint_channels": 3})):
        with pytest.raises(TypeError, match="unexpected keyword argument 'not_a_field'"):
            build(**TINY, **extra, not_a_field=1)
        assert build(**TINY, **extra, use_fp16=True).dtype == torch.float16
