"""Checkpoint surgery on synthetic state dicts: add_control and transfer_control."""
from __future__ import annotations

import pytest
import torch

from cldm.checkpoints.surgery import add_control, control_source_key, transfer_control


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def model_state_dict() -> dict[str, torch.Tensor]:
    """A freshly built ControlLDM in miniature: random copies, zero convs, a hint block, buffers."""
    return {
        "betas": torch.linspace(0.1, 0.2, 5),
        "model.diffusion_model.input_blocks.0.0.weight": _randn(4, 4, seed=1),
        "model.diffusion_model.out.2.weight": _randn(4, 4, seed=2),
        "control_model.input_blocks.0.0.weight": _randn(4, 4, seed=3),
        "control_model.zero_convs.0.0.weight": torch.zeros(4, 4),
        "control_model.input_hint_block.0.weight": _randn(4, 3, seed=4),
        "first_stage_model.decoder.conv_out.weight": _randn(3, 4, seed=5),
    }


@pytest.fixture
def base_state_dict() -> dict[str, torch.Tensor]:
    """A Stable Diffusion checkpoint in miniature, with an EMA copy the model does not use."""
    return {
        "betas": torch.linspace(0.1, 0.2, 5),
        "model.diffusion_model.input_blocks.0.0.weight": _randn(4, 4, seed=11),
        "model.diffusion_model.out.2.weight": _randn(4, 4, seed=12),
        "first_stage_model.decoder.conv_out.weight": _randn(3, 4, seed=13),
        "model_ema.diffusion_modelinput_blocks00weight": _randn(4, 4, seed=14),
    }


def test_control_source_key() -> None:
    assert control_source_key("control_model.input_blocks.1.1.proj_in.weight") == (
        "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    )
    assert control_source_key("model.diffusion_model.out.2.weight") == "model.diffusion_model.out.2.weight"
    assert control_source_key("betas") == "betas"


def test_add_control_copies_unet_into_control_branch(model_state_dict, base_state_dict) -> None:
    merged, newly_added = add_control(model_state_dict, base_state_dict)

    assert list(merged) == list(model_state_dict)  # the model's keys, in its order; model_ema.* dropped
    assert newly_added == ["control_model.zero_convs.0.0.weight", "control_model.input_hint_block.0.weight"]
    for key in newly_added:
        assert merged[key] is model_state_dict[key]
    for key in ("betas", "model.diffusion_model.out.2.weight", "first_stage_model.decoder.conv_out.weight"):
        assert torch.equal(merged[key], base_state_dict[key])

    control = merged["control_model.input_blocks.0.0.weight"]
    unet = base_state_dict["model.diffusion_model.input_blocks.0.0.weight"]
    assert torch.equal(control, unet)
    assert control.untyped_storage().data_ptr() != unet.untyped_storage().data_ptr()  # cloned, not aliased
    control.add_(1.0)
    assert torch.equal(merged["model.diffusion_model.input_blocks.0.0.weight"], unet)
    assert not torch.equal(control, unet)


def test_add_control_newly_added_is_exactly_what_the_base_lacks(model_state_dict) -> None:
    merged, newly_added = add_control(model_state_dict, {})
    assert newly_added == list(model_state_dict)
    assert all(merged[key] is model_state_dict[key] for key in model_state_dict)


def test_add_control_shape_mismatch(model_state_dict, base_state_dict) -> None:
    model_state_dict["control_model.input_blocks.0.0.weight"] = torch.zeros(4, 5)
    with pytest.raises(ValueError) as error:
        add_control(model_state_dict, base_state_dict)
    assert str(error.value).startswith(
        "'model.diffusion_model.input_blocks.0.0.weight' has shape [4, 4] in the checkpoint but the model's "
        "'control_model.input_blocks.0.0.weight' needs [4, 5]"
    )
    base_state_dict["model.diffusion_model.out.2.weight"] = torch.zeros(2, 4)
    with pytest.raises(ValueError, match=r"^'model.diffusion_model.out.2.weight' has shape \[2, 4\] .* needs \[4, 4\]"):
        add_control(model_state_dict, base_state_dict)


@pytest.fixture
def transfer_dicts() -> tuple[dict, dict, dict]:
    """(ControlNet checkpoint, base SD, fine-tuned SD) in miniature."""
    control = {
        "betas": torch.linspace(0.1, 0.2, 5),
        "model.diffusion_model.out.2.weight": _randn(2, 2, seed=1),
        "control_model.input_blocks.0.0.weight": _randn(2, 2, seed=2),
        "control_model.zero_convs.0.0.weight": _randn(2, 2, seed=3),
        "first_stage_model.quant_conv.weight": _randn(2, 2, seed=4),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(4)[None],
    }
    base = {
        "betas": torch.linspace(0.1, 0.2, 5),
        "model.diffusion_model.out.2.weight": _randn(2, 2, seed=11),
        "model.diffusion_model.input_blocks.0.0.weight": _randn(2, 2, seed=12),
        "first_stage_model.quant_conv.weight": _randn(2, 2, seed=13),
    }
    finetuned = {
        "betas": torch.linspace(0.1, 0.2, 5),
        "model.diffusion_model.out.2.weight": _randn(2, 2, seed=21),
        "model.diffusion_model.input_blocks.0.0.weight": _randn(2, 2, seed=22),
        "first_stage_model.quant_conv.weight": _randn(2, 2, seed=23),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(4)[None] + 1,
    }
    return control, base, finetuned


def test_transfer_control_offsets(transfer_dicts) -> None:
    control, base, finetuned = transfer_dicts
    merged = transfer_control(control, base, finetuned)

    assert list(merged) == list(control)
    for key, unet_key in [
        ("model.diffusion_model.out.2.weight", "model.diffusion_model.out.2.weight"),
        ("control_model.input_blocks.0.0.weight", "model.diffusion_model.input_blocks.0.0.weight"),
    ]:
        torch.testing.assert_close(merged[key], control[key] + finetuned[unet_key] - base[unet_key], rtol=0, atol=0)
    torch.testing.assert_close(merged["betas"], control["betas"])
    assert merged["control_model.zero_convs.0.0.weight"] is control["control_model.zero_convs.0.0.weight"]
    position_ids = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    for key in ("first_stage_model.quant_conv.weight", position_ids):
        assert merged[key] is finetuned[key]


def test_transfer_control_errors(transfer_dicts) -> None:
    control, base, finetuned = transfer_dicts
    with pytest.raises(ValueError, match="fine-tuned model has no 'cond_stage_model.transformer"):
        transfer_control(control, base, {k: v for k, v in finetuned.items() if not k.startswith("cond_stage")})
    with pytest.raises(ValueError, match="base model has no 'model.diffusion_model.input_blocks.0.0.weight'"):
        transfer_control(control, {k: v for k, v in base.items() if "input_blocks" not in k}, finetuned)
    finetuned["model.diffusion_model.out.2.weight"] = torch.zeros(3, 2)
    with pytest.raises(ValueError, match=r"'model.diffusion_model.out.2.weight'.*\[3, 2\] .*fine-tuned"):
        transfer_control(control, base, finetuned)
