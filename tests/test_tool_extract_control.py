"""tool_extract_control.py: control-only weights out of a training checkpoint, and back in next to a base model."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tool_extract_control
from cldm.checkpoints.kinds import CONTROL_PREFIX
from cldm.checkpoints.saving import save_state_dict
from cldm.cli import run
from cldm.model import create_model, load_weights
from cldm.sampling import load_control_ldm, merge_base_and_control
from tests.helpers.random_weights import model_without_zero_layers
from tests.helpers.paths import REPO_ROOT, TINY_CONFIG


TINY = str(TINY_CONFIG)
V15 = str(REPO_ROOT / "models" / "cldm_v15.yaml")


@pytest.fixture(scope="module")
def full_state_dict() -> dict[str, torch.Tensor]:
    """A tiny ControlLDM with seeded weights, the zero-initialised ones made random (as after training)."""
    model = model_without_zero_layers(TINY)
    return {key: tensor.clone() for key, tensor in model.state_dict().items()}


@pytest.fixture
def training_ckpt(tmp_path: Path, full_state_dict) -> Path:
    """A Lightning-style training checkpoint: the weights under "state_dict", plus loop state."""
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": full_state_dict, "epoch": 3, "global_step": 1200}, path)
    return path


def test_extracts_control_model_keys_as_safetensors_by_default(tmp_path, training_ckpt, full_state_dict) -> None:
    assert tool_extract_control.main([str(training_ckpt), "--config", TINY]) == 0
    output = tmp_path / "last_control.safetensors"
    weights = load_file(output)
    expected = {key: t for key, t in full_state_dict.items() if key.startswith(CONTROL_PREFIX)}
    assert sorted(weights) == sorted(expected)
    assert all(torch.equal(weights[key], expected[key]) for key in expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "last_control.safetensors"]  # no temp files


def test_half_and_torch_format(tmp_path, training_ckpt, full_state_dict) -> None:
    output = tmp_path / "control_fp16.pth"
    assert tool_extract_control.main([str(training_ckpt), str(output), "--half"]) == 0
    weights = torch.load(output, weights_only=True)
    assert all(t.dtype == torch.float16 for t in weights.values())
    key = "control_model.middle_block_out.0.weight"
    assert torch.equal(weights[key], full_state_dict[key].half())


def test_base_plus_control_loads_strictly_back_to_the_same_model(tmp_path, training_ckpt, full_state_dict) -> None:
    control_path = tmp_path / "control.safetensors"
    assert tool_extract_control.main([str(training_ckpt), str(control_path)]) == 0
    base = {key: t for key, t in full_state_dict.items() if not key.startswith(CONTROL_PREFIX)}
    base["model_ema.decay"] = torch.tensor(0.9999)  # SD checkpoints carry keys the model does not use
    base_path = tmp_path / "base.safetensors"
    save_state_dict(base, base_path)

    # as tool_sample.py loads it
    model = load_control_ldm(TINY, base=base_path, control=control_path)
    assert all(torch.equal(t, full_state_dict[key]) for key, t in model.state_dict().items())

    # as initial training weights: merged, then a strict load
    fresh = create_model(TINY)
    merged, ignored = merge_base_and_control(fresh.state_dict(), base, load_file(control_path))
    assert ignored == ["model_ema.decay"]
    load_weights(fresh, merged, source="base + control")
    assert all(torch.equal(t, full_state_dict[key]) for key, t in fresh.state_dict().items())


def test_incomplete_control_weights_fail_the_strict_load(full_state_dict) -> None:
    base = {key: t for key, t in full_state_dict.items() if not key.startswith(CONTROL_PREFIX)}
    control = {key: t for key, t in full_state_dict.items() if key.startswith(CONTROL_PREFIX)}
    control.pop("control_model.zero_convs.0.0.bias")
    model = create_model(TINY)
    merged, _ = merge_base_and_control(model.state_dict(), base, control)
    with pytest.raises(ValueError, match="1 keys missing .control_model.zero_convs.0.0.bias"):
        load_weights(model, merged, source="base + control")
    with pytest.raises(ValueError, match="outside 'control_model"):
        merge_base_and_control(model.state_dict(), base, full_state_dict)


def _fails(argv: list[str], capsys) -> str:
    assert run(tool_extract_control.main, argv) == 2
    return capsys.readouterr().err


def test_bad_inputs_give_a_clear_message_and_write_nothing(tmp_path, training_ckpt, full_state_dict, capsys) -> None:
    sd_only = tmp_path / "sd.safetensors"
    save_state_dict({key: t for key, t in full_state_dict.items() if not key.startswith(CONTROL_PREFIX)}, sd_only)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(training_ckpt.read_bytes()[:1000])
    exists = tmp_path / "exists.safetensors"
    exists.write_bytes(b"keep")
    before = sorted(tmp_path.iterdir())

    assert "does not exist" in _fails([str(tmp_path / "missing.ckpt")], capsys)
    assert "no 'control_model.*' weights" in _fails([str(sd_only)], capsys)
    assert "truncated or not a checkpoint" in _fails([str(truncated)], capsys)
    assert "already exists" in _fails([str(training_ckpt), str(exists)], capsys)
    assert "cannot tell the checkpoint format" in _fails([str(training_ckpt), str(tmp_path / "out.bin")], capsys)
    output = str(tmp_path / "c.safetensors")
    assert "does not fit config" in _fails([str(training_ckpt), output, "--config", V15], capsys)
    assert sorted(tmp_path.iterdir()) == before
    assert exists.read_bytes() == b"keep"

    assert tool_extract_control.main([str(training_ckpt), str(exists), "--overwrite"]) == 0
    assert len(load_file(exists)) == sum(key.startswith(CONTROL_PREFIX) for key in full_state_dict)
