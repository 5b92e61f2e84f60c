"""Our ControlNet -> diffusers ControlNetModel: config values, key names, and the same residuals (in memory)."""
from __future__ import annotations

from typing import Any

import pytest
import torch

from cldm.cldm import ControlNet
from cldm.checkpoints.diffusers_export import (
    check_against_diffusers,
    diffusers_config,
    diffusers_module_names,
    to_diffusers_state_dict,
)
from tests.helpers.random_weights import control_params as read_control_params
from tests.helpers.random_weights import random_control_net
from tests.helpers.paths import REPO_ROOT


def control_params(name: str) -> dict[str, Any]:
    """`control_stage_config.params` of models/<name>.yaml as a plain dict."""
    return read_control_params(REPO_ROOT / "models" / f"{name}.yaml")


# The SD2.1 architecture (head width 64, linear projections, 1024-wide context) at a quarter of the width.
SD21_SMALL = {**control_params("cldm_v21"), "model_channels": 64}


def relative_errors(ours: list[torch.Tensor], theirs: list[torch.Tensor]) -> list[float]:
    """max |ours - theirs| / max |theirs| for each residual."""
    return [float((a - b).abs().max() / b.abs().max()) for a, b in zip(ours, theirs, strict=True)]


def residual_errors(params: dict[str, Any], latent_size: int) -> list[float]:
    """Relative error of every residual of our ControlNet vs diffusers' with the converted weights."""
    diffusers = pytest.importorskip("diffusers")
    net = random_control_net(params)
    config = diffusers_config(params)
    with torch.device("meta"):
        theirs_model = diffusers.ControlNetModel.from_config(config)
    theirs_model.load_state_dict(to_diffusers_state_dict(net.state_dict(), params), strict=True, assign=True)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, latent_size, latent_size, generator=generator)
    hint = torch.rand(2, 3, 8 * latent_size, 8 * latent_size, generator=generator)
    context = torch.randn(2, 77, config["cross_attention_dim"], generator=generator)
    t = torch.tensor([999, 1])
    with torch.no_grad():
        ours = net(x, hint, t, context)
        down, mid = theirs_model.eval()(x, t, context, hint, return_dict=False)
    theirs = [*down, mid]
    assert len(ours) == len(theirs) == len(net.zero_convs) + 1
    assert all(float(r.abs().max()) > 1e-3 for r in theirs)  # random zero convs: nothing is trivially zero
    return relative_errors(ours, theirs)


# ---------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------


def test_config_sd15_matches_the_released_diffusers_controlnets() -> None:
    config = diffusers_config(control_params("cldm_v15"))
    assert config["_class_name"] == "ControlNetModel"
    assert config["attention_head_dim"] == 8
    assert config["block_out_channels"] == [320, 640, 1280, 1280]
    assert config["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert config["cross_attention_dim"] == 768
    assert config["layers_per_block"] == 2
    assert config["use_linear_projection"] is False
    assert config["conditioning_embedding_out_channels"] == [16, 32, 96, 256]
    assert (config["flip_sin_to_cos"], config["freq_shift"], config["norm_num_groups"]) == (True, 0, 32)


def test_config_sd21_has_head_width_64_and_linear_projections() -> None:
    config = diffusers_config(control_params("cldm_v21"))
    assert config["attention_head_dim"] == [5, 10, 20, 20]  # heads per level = width / 64
    assert config["cross_attention_dim"] == 1024
    assert config["use_linear_projection"] is True


def test_config_tiny() -> None:
    config = diffusers_config(control_params("cldm_tiny"))
    assert config["block_out_channels"] == [32, 64]
    assert config["down_block_types"] == ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert (config["attention_head_dim"], config["layers_per_block"], config["cross_attention_dim"]) == (2, 1, 32)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"use_scale_shift_norm": True}, "use_scale_shift_norm"),
        ({"num_res_blocks": [2, 1, 2, 2]}, "num_res_blocks"),
        ({"resblock_updown": True}, "resblock_updown"),
        ({"not_an_argument": 1}, "not_an_argument"),
    ],
)
def test_config_refuses_what_diffusers_cannot_express(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        diffusers_config({**control_params("cldm_v15"), **change})


# ---------------------------------------------------------------------------------------------
# Key names
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cldm_v15", "cldm_v21", "cldm_tiny"])
def test_keys_and_shapes_fit_diffusers_exactly(name: str) -> None:
    pytest.importorskip("diffusers")
    params = control_params(name)
    with torch.device("meta"):
        ours = ControlNet(**params).state_dict()
    renamed = to_diffusers_state_dict(ours, params)
    assert len(renamed) == len(ours)  # no two keys collapse into one
    check_against_diffusers(renamed, diffusers_config(params))


def test_known_keys_of_sd15() -> None:
    names = diffusers_module_names(control_params("cldm_v15"))
    assert names["input_hint_block.0"] == "controlnet_cond_embedding.conv_in"
    assert names["input_hint_block.12"] == "controlnet_cond_embedding.blocks.5"
    assert names["input_hint_block.14"] == "controlnet_cond_embedding.conv_out"
    assert names["input_blocks.3.0.op"] == "down_blocks.0.downsamplers.0.conv"
    assert names["input_blocks.4.0.skip_connection"] == "down_blocks.1.resnets.0.conv_shortcut"
    assert names["input_blocks.8.1"] == "down_blocks.2.attentions.1"
    assert names["zero_convs.11.0"] == "controlnet_down_blocks.11"
    assert names["middle_block.2.out_layers.3"] == "mid_block.resnets.1.conv2"
    assert names["middle_block_out.0"] == "controlnet_mid_block"
    assert "input_blocks.10.1" not in names  # the last level has no attention


def test_unknown_key_is_refused() -> None:
    params = control_params("cldm_tiny")
    with pytest.raises(ValueError, match="1 ControlNet weights have no diffusers name"):
        to_diffusers_state_dict({"input_blocks.0.0.weight": torch.zeros(1), "extra.weight": torch.zeros(1)}, params)


def test_check_against_diffusers_reports_a_wrong_shape() -> None:
    pytest.importorskip("diffusers")
    params = control_params("cldm_tiny")
    with torch.device("meta"):
        renamed = to_diffusers_state_dict(ControlNet(**params).state_dict(), params)
    renamed["conv_in.weight"] = torch.zeros(1, 1)
    with pytest.raises(ValueError, match=r"conv_in.weight \[1, 1\] vs \[32, 4, 3, 3\]"):
        check_against_diffusers(renamed, diffusers_config(params))


# ---------------------------------------------------------------------------------------------
# Same residuals
# ---------------------------------------------------------------------------------------------


def test_same_residuals_tiny() -> None:
    assert max(residual_errors(control_params("cldm_tiny"), latent_size=8)) < 1e-4


def test_same_residuals_sd21_architecture_small_width() -> None:
    errors = residual_errors(SD21_SMALL, latent_size=8)
    assert len(errors) == 13
    assert max(errors) < 1e-4


def test_a_wrong_mapping_is_detected() -> None:
    """The parity check can fail: swapping two same-shaped zero convs breaks it."""
    diffusers = pytest.importorskip("diffusers")
    params = control_params("cldm_tiny")
    net = random_control_net(params)
    renamed = to_diffusers_state_dict(net.state_dict(), params)
    for suffix in ("weight", "bias"):
        first, second = f"controlnet_down_blocks.0.{suffix}", f"controlnet_down_blocks.1.{suffix}"
        renamed[first], renamed[second] = renamed[second], renamed[first]
    theirs_model = diffusers.ControlNetModel.from_config(diffusers_config(params))
    theirs_model.load_state_dict(renamed)
    x, hint, context, t = torch.randn(1, 4, 8, 8), torch.rand(1, 3, 64, 64), torch.randn(1, 77, 32), torch.tensor([10])
    with torch.no_grad():
        down, mid = theirs_model.eval()(x, t, context, hint, return_dict=False)
        errors = relative_errors(net(x, hint, t, context), [*down, mid])
    assert errors[0] > 1e-2 and errors[1] > 1e-2
