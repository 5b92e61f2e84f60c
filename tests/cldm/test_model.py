"""cldm.model: building from yaml, loading checkpoints, strict weight loading with clear errors."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from cldm.model import create_model, get_state_dict, load_state_dict, load_weights

LINEAR_CONFIG = """
model:
  target: torch.nn.Linear
  params:
    in_features: 3
    out_features: 2
"""


def _write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_create_model(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = _write(tmp_path, LINEAR_CONFIG)
    with caplog.at_level(logging.INFO, logger="cldm.model"):
        model = create_model(config)
    assert isinstance(model, torch.nn.Linear) and model.weight.shape == (2, 3)
    assert f"Loaded model config from [{config}]" in caplog.messages


@pytest.mark.parametrize(
    "text,error,match",
    [
        ("model: [unclosed\n", ValueError, "is not valid YAML"),
        ("first_stage_config: {}\n", ValueError, "has no top-level 'model' section"),
        ("- a\n- b\n", ValueError, "has no top-level 'model' section"),
        ("model:\n  params: {}\n", ValueError, "is incomplete"),
        ("model:\n  target: cldm.no_such_module.ControlLDM\n", ValueError, "cldm.no_such_module.ControlLDM"),
        ("model:\n  target: torch.nn.NoSuchLayer\n", ValueError, "torch.nn.NoSuchLayer"),
    ],
    ids=["bad-yaml", "no-model", "list", "no-target", "bad-module", "bad-class"],
)
def test_create_model_config_errors(tmp_path: Path, text: str, error: type, match: str) -> None:
    config = _write(tmp_path, text)
    with pytest.raises(error, match=match) as raised:
        create_model(config)
    assert str(config) in str(raised.value)
    assert "\n" not in str(raised.value)


def test_create_model_missing_or_binary_config(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.yaml' does not exist"):
        create_model(tmp_path / "missing.yaml")
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(b"\x80\x81\xfe\xff" * 4)
    with pytest.raises(ValueError, match="weights.yaml' is not valid YAML"):
        create_model(binary)


def test_load_state_dict_unwraps_and_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    weights = {"weight": torch.ones(2, 3), "bias": torch.zeros(2)}
    torch.save({"state_dict": {"state_dict": weights}, "epoch": 1}, tmp_path / "wrapped.ckpt")
    with caplog.at_level(logging.INFO, logger="cldm.model"):
        loaded = load_state_dict(tmp_path / "wrapped.ckpt", location="cpu")
    assert sorted(loaded) == ["bias", "weight"]
    assert torch.equal(loaded["weight"], weights["weight"])
    assert f"Loaded state_dict from [{tmp_path / 'wrapped.ckpt'}]" in caplog.messages


def test_get_state_dict() -> None:
    inner = {"a": 1}
    assert get_state_dict({"state_dict": inner}) is inner
    assert get_state_dict(inner) is inner


def test_load_weights_strict_success() -> None:
    model = torch.nn.Linear(3, 2)
    weights = {"weight": torch.full((2, 3), 0.5), "bias": torch.ones(2)}
    load_weights(model, weights, source="w.ckpt")
    assert torch.equal(model.weight.detach(), weights["weight"])


def test_load_weights_reports_missing_and_unexpected() -> None:
    model = torch.nn.Linear(3, 2)
    sd1_unet_key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    weights = {"weight": torch.zeros(2, 3), sd1_unet_key: torch.zeros(4, 768), "model_ema.num_updates": torch.ones(())}
    with pytest.raises(ValueError) as raised:
        load_weights(model, weights, source="sd15.ckpt", config="models/cldm_v15.yaml")
    message = str(raised.value)
    assert message.startswith("checkpoint 'sd15.ckpt' does not fit config 'models/cldm_v15.yaml'")
    assert "1 keys missing (bias)" in message
    assert f"2 unexpected ({sd1_unet_key}, model_ema.num_updates)" in message
    assert message.endswith("looks like a Stable Diffusion 1.x model")


def test_load_weights_reports_shape_mismatch_before_loading() -> None:
    model = torch.nn.Linear(3, 2)
    before = model.weight.detach().clone()
    weights = {"weight": torch.zeros(2, 4), "bias": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"1 with another shape \(weight \[2, 4\] vs \[2, 3\]\)"):
        load_weights(model, weights, source="other.ckpt")
    assert torch.equal(model.weight.detach(), before)
