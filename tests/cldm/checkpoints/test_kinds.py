"""Which model a state dict holds, and the key-mismatch message that says so."""
from __future__ import annotations

import json

import pytest
import torch

from cldm.checkpoints.kinds import describe_key_mismatch, detect_base_model
from tests.helpers.paths import FIXTURES

_DTYPES = {"float32": torch.float32, "int64": torch.int64}


def _fixture_state_dict(version: str) -> dict[str, torch.Tensor]:
    """The original's full ControlLDM keys and shapes, as meta tensors (no memory)."""
    keys = json.loads((FIXTURES / f"keys_cldm_{version}.json").read_text())
    return {key: torch.empty(shape, dtype=_DTYPES[dtype], device="meta") for key, (shape, dtype) in keys.items()}


@pytest.fixture(scope="module")
def full_state_dicts() -> dict[str, dict[str, torch.Tensor]]:
    return {version: _fixture_state_dict(version) for version in ("v15", "v21")}


def _only(state_dict: dict, prefix: str) -> dict:
    return {key: value for key, value in state_dict.items() if key.startswith(prefix)}


def _without(state_dict: dict, prefix: str) -> dict:
    return {key: value for key, value in state_dict.items() if not key.startswith(prefix)}


@pytest.mark.parametrize("version,sd", [("v15", "sd1"), ("v21", "sd2")])
def test_detect_base_model_on_real_layouts(full_state_dicts, version: str, sd: str) -> None:
    full = full_state_dicts[version]
    assert detect_base_model(full) == f"controlnet-{sd}"
    assert detect_base_model(_without(full, "control_model.")) == sd
    assert detect_base_model(_only(full, "model.diffusion_model.")) == sd  # UNet alone: context width decides
    assert detect_base_model(_only(full, "control_model.")) == "controlnet-only"
    bare = {key.removeprefix("control_model."): value for key, value in _only(full, "control_model.").items()}
    assert detect_base_model(bare) == "controlnet-only"
    assert detect_base_model(_only(full, "first_stage_model.")) == "unknown"


def test_detect_base_model_other_layouts() -> None:
    meta = torch.empty(1, device="meta")
    diffusers_unet = {"conv_in.weight": meta, "down_blocks.0.resnets.0.conv1.weight": meta}
    diffusers_pipeline = {"unet.mid_block.attentions.0.proj_in.weight": meta}
    sdxl = {"model.diffusion_model.out.2.weight": meta, "conditioner.embedders.0.transformer.x": meta}
    assert detect_base_model(diffusers_unet) == "diffusers"
    assert detect_base_model(diffusers_pipeline) == "diffusers"
    assert detect_base_model(sdxl) == "unknown"
    assert detect_base_model({}) == "unknown"
    # Small test models: the proj_in layout (conv for SD1.x, linear for SD2.x), else the text encoder's keys.
    unet = "model.diffusion_model.input_blocks.1.1."
    tiny = {unet + "transformer_blocks.0.attn2.to_k.weight": torch.empty(8, 32, device="meta")}
    assert detect_base_model({**tiny, "cond_stage_model.model.ln_final.weight": meta}) == "sd2"
    assert detect_base_model({**tiny, unet + "proj_in.weight": torch.empty(8, 8, 1, 1, device="meta")}) == "sd1"
    assert detect_base_model({**tiny, unet + "proj_in.weight": torch.empty(8, 8, device="meta")}) == "sd2"
    clip = {"cond_stage_model.transformer.text_model.final_layer_norm.weight": meta}
    assert detect_base_model({**tiny, **clip}) == "sd1"
    assert detect_base_model({**tiny, **clip, unet + "proj_in.weight": torch.empty(8, 8, device="meta")}) == "sd2"
    assert detect_base_model(tiny) == "unknown"


def test_describe_key_mismatch(full_state_dicts) -> None:
    checkpoint = _without(full_state_dicts["v21"], "control_model.")
    missing = [f"control_model.zero_convs.{i}.0.weight" for i in range(5)]
    message = describe_key_mismatch(missing, ["model_ema.decay"], checkpoint, "models/cldm_v15.yaml", source="a.ckpt")
    assert message.startswith("checkpoint 'a.ckpt' does not fit config 'models/cldm_v15.yaml'")
    assert "5 keys missing (control_model.zero_convs.0.0.weight, control_model.zero_convs.1.0.weight, " in message
    assert "zero_convs.3" not in message and "..." in message
    assert "1 unexpected (model_ema.decay)" in message
    assert message.endswith("looks like a Stable Diffusion 2.x model")
    assert "\n" not in message
