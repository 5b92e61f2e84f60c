"""cldm.model: building from yaml, loading checkpoints, strict weight loading with clear errors."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from cldm.model import create_model, get_state_dict, load_config, load_state_dict, load_weights, read_control_stage_config
from ldm.modules.diffusionmodules.model import Upsample
from tests.helpers.paths import REPO_ROOT

UPSAMPLE_CONFIG = """
model:
  target: ldm.modules.diffusionmodules.model.Upsample
  params:
    in_channels: 3
    with_conv: true
"""


def _write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_create_model(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = _write(tmp_path, UPSAMPLE_CONFIG)
    with caplog.at_level(logging.INFO, logger="cldm.model"):
        model = create_model(config)
    assert isinstance(model, Upsample) and model.conv.weight.shape == (3, 3, 3, 3)
    assert f"Loaded model config from [{config}]" in caplog.messages


@pytest.mark.parametrize(
    "text,error,match",
    [
        ("model: [unclosed\n", ValueError, "is not valid YAML"),
        ("first_stage_config: {}\n", ValueError, "has no top-level 'model' section"),
        ("- a\n- b\n", ValueError, "has no top-level 'model' section"),
        ("model:\n  params: {}\n", ValueError, "is incomplete"),
        ("model:\n  target: cldm.no_such_module.ControlLDM\n", ValueError, "cldm.no_such_module.ControlLDM"),
        ("model:\n  target: ldm.util.NoSuchLayer\n", ValueError, "ldm.util.NoSuchLayer"),
        ("model:\n  target: torch.nn.Linear\n", ValueError, "model.target names 'torch.nn.Linear', which a config"),
        ("model:\n  target: cldm.cldm.ControlLDM\n  params:\n    first_stage_config: ${nowhere}\n", ValueError,
         "has a reference that cannot be resolved"),
    ],
    ids=["bad-yaml", "no-model", "list", "no-target", "bad-module", "bad-class", "torch-class", "bad-reference"],
)
def test_create_model_config_errors(tmp_path: Path, text: str, error: type, match: str) -> None:
    config = _write(tmp_path, text)
    with pytest.raises(error, match=match) as raised:
        create_model(config)
    assert str(config) in str(raised.value)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("config", sorted((REPO_ROOT / "models").glob("*.yaml")), ids=lambda path: path.name)
def test_every_config_of_the_project_passes_the_config_check(config: Path) -> None:
    assert load_config(config).model.target == "cldm.cldm.ControlLDM"


def _tiny_with(tmp_path: Path, key: str, value: object) -> Path:
    """The tiny config with `key` (a dotted path) set to `value`, written to a file."""
    config = OmegaConf.load(REPO_ROOT / "models" / "cldm_tiny.yaml")
    OmegaConf.update(config, key, value, merge=False)
    path = tmp_path / "config.yaml"
    OmegaConf.save(config, path)
    return path


def test_a_command_in_a_nested_target_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    config = _tiny_with(tmp_path, "model.params.control_stage_config",
                        {"target": "os.system", "params": {"command": f"touch {marker}"}})
    for load in (create_model, read_control_stage_config):
        with pytest.raises(ValueError, match=rf"^config file '{config}': model.params.control_stage_config.target "
                                             r"names 'os.system', which a config may not use"):
            load(config)
    assert not marker.exists()


def test_a_misspelt_param_is_named_with_the_closest_valid_names(tmp_path: Path) -> None:
    config = _tiny_with(tmp_path, "model.params.linear_strat", 0.00085)
    with pytest.raises(ValueError, match=rf"^config file '{config}': model.params.linear_strat is not a parameter "
                                         r"of cldm.cldm.ControlLDM; did you mean linear_start or "):
        create_model(config)


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
