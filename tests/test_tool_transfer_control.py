"""tool_transfer_control.py end to end on synthetic SD1.x / ControlNet checkpoints."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import tool_transfer_control
from ldm import checkpoint as checkpoint_io
from cldm.checkpoints.random_weights import random_base_state_dict
from cldm.checkpoints.saving import save_state_dict
from cldm.checkpoints.surgery import transfer_control
from cldm.cli import run
from cldm.model import create_model
from ldm.checkpoint import read_state_dict
from tests.helpers.paths import TINY_CONFIG
from tests.helpers.random_weights import randomize_

UNET_TO_K = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
CONTROL_TO_K = UNET_TO_K.replace("model.diffusion_model.", "control_model.")
ZERO_CONV = "control_model.zero_convs.0.0.weight"
FIRST_STAGE = "first_stage_model.quant_conv.weight"
COND_STAGE = "cond_stage_model.transformer.text_model.final_layer_norm.weight"
UNET_OUT = "model.diffusion_model.out.2.weight"


def _sd1(seed: int, context_dim: int = 768) -> dict[str, torch.Tensor]:
    """A Stable Diffusion 1.x checkpoint in miniature (context width 768 marks it as SD1.x)."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "betas": torch.linspace(1e-4, 2e-2, 8),
        UNET_TO_K: torch.randn(2, context_dim, generator=generator),
        UNET_OUT: torch.randn(4, 2, 3, 3, generator=generator),
        FIRST_STAGE: torch.randn(8, 8, 1, 1, generator=generator),
        COND_STAGE: torch.randn(4, generator=generator),
    }


def _controlnet(seed: int, context_dim: int = 768) -> dict[str, torch.Tensor]:
    """A trained ControlNet checkpoint: a full SD1.x plus control_model.* weights."""
    generator = torch.Generator().manual_seed(seed + 100)
    return {
        **_sd1(seed, context_dim),
        CONTROL_TO_K: torch.randn(2, context_dim, generator=generator),
        ZERO_CONV: torch.randn(2, 2, 1, 1, generator=generator),
    }


@pytest.fixture
def inputs(tmp_path: Path) -> dict[str, Path]:
    """The three input checkpoints, under the original's file names, and an output folder."""
    paths = {
        "sd15": tmp_path / "v1-5-pruned.ckpt",
        "control": tmp_path / "control_sd15_openpose.pth",
        "input": tmp_path / "anything-v3-full.safetensors",
    }
    torch.save({"state_dict": _sd1(seed=0), "global_step": 840000}, paths["sd15"])
    torch.save(_controlnet(seed=1), paths["control"])
    save_state_dict(_sd1(seed=2), paths["input"])
    (tmp_path / "out").mkdir()
    return paths


def _invoke(argv: list, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    code = run(tool_transfer_control.main, [str(arg) for arg in argv])
    return code, capsys.readouterr().err


def _check_transferred(output: Path, inputs: dict[str, Path]) -> None:
    """control + finetuned - base for every tensor with a UNet counterpart; VAE/text from the fine-tune."""
    base, control, finetuned = (read_state_dict(inputs[name]) for name in ("sd15", "control", "input"))
    saved = read_state_dict(output)
    assert sorted(saved) == sorted(control)
    for key, unet_key in [(UNET_TO_K, UNET_TO_K), (UNET_OUT, UNET_OUT), (CONTROL_TO_K, UNET_TO_K), ("betas", "betas")]:
        torch.testing.assert_close(saved[key], control[key] + finetuned[unet_key] - base[unet_key], rtol=0, atol=0)
    assert not torch.allclose(saved[CONTROL_TO_K], control[CONTROL_TO_K])  # the offset is really applied
    assert torch.equal(saved[ZERO_CONV], control[ZERO_CONV])
    for key in (FIRST_STAGE, COND_STAGE):
        assert torch.equal(saved[key], finetuned[key])


def test_transfer_with_flags(inputs, tmp_path, capsys) -> None:
    output = tmp_path / "out" / "control_any3_openpose.pth"
    argv = ["--sd15", inputs["sd15"], "--control", inputs["control"], "--input", inputs["input"], "--output", output]
    assert _invoke(argv, capsys) == (0, "")
    assert os.listdir(output.parent) == [output.name]
    _check_transferred(output, inputs)


def test_transfer_with_positionals_to_safetensors(inputs, tmp_path, capsys) -> None:
    output = tmp_path / "out" / "control_any3_openpose.safetensors"
    assert _invoke([inputs["sd15"], inputs["control"], inputs["input"], output], capsys) == (0, "")
    _check_transferred(output, inputs)


def test_defaults_are_the_original_paths(inputs, tmp_path, capsys, monkeypatch) -> None:
    models = tmp_path / "models"
    models.mkdir()
    for path in inputs.values():
        path.rename(models / path.name)
    monkeypatch.chdir(tmp_path)
    assert _invoke([], capsys) == (0, "")
    assert (models / "control_any3_openpose.pth").is_file()


@pytest.mark.parametrize("missing", ["sd15", "control", "input"])
def test_refuses_missing_input(inputs, tmp_path, capsys, missing: str) -> None:
    inputs[missing].unlink()
    output = tmp_path / "out" / "c.pth"
    argv = [inputs["sd15"], inputs["control"], inputs["input"], output]
    code, err = _invoke(argv, capsys)
    assert code == 2 and err == f"error: --{missing} checkpoint '{inputs[missing]}' does not exist; check the path\n"
    assert os.listdir(output.parent) == []


@pytest.mark.parametrize(
    "replace,state_dict,expected",
    [
        ("control", _sd1(seed=5), "--control '{}' looks like a Stable Diffusion 1.x model; pass a ControlNet"),
        ("control", _controlnet(seed=5, context_dim=1024), "--control '{}' looks like a Stable Diffusion 2.x model"),
        ("input", _sd1(seed=5, context_dim=1024), "--input '{}' looks like a Stable Diffusion 2.x model; pass a"),
        ("input", _controlnet(seed=5), "--input '{}' looks like a Stable Diffusion 1.x model with a ControlNet"),
        ("sd15", _controlnet(seed=5), "--sd15 '{}' looks like a Stable Diffusion 1.x model with a ControlNet; pass"),
    ],
    ids=["control-is-plain-sd", "control-for-sd2", "input-is-sd2", "input-is-controlnet", "base-is-controlnet"],
)
def test_refuses_wrong_models(inputs, tmp_path, capsys, replace: str, state_dict: dict, expected: str) -> None:
    inputs[replace].unlink()
    save_state_dict(state_dict, inputs[replace])
    output = tmp_path / "out" / "c.pth"
    code, err = _invoke([inputs["sd15"], inputs["control"], inputs["input"], output], capsys)
    assert code == 2 and expected.format(inputs[replace]) in err and err.count("\n") == 1
    assert os.listdir(output.parent) == []


def test_refuses_diffusers_folder(inputs, tmp_path, capsys) -> None:
    folder = tmp_path / "anything-v3"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    code, err = _invoke([inputs["sd15"], inputs["control"], folder, tmp_path / "out" / "c.pth"], capsys)
    assert code == 2 and "is a diffusers folder" in err


def test_refuses_bad_outputs(inputs, tmp_path, capsys) -> None:
    sources = [inputs["sd15"], inputs["control"], inputs["input"]]
    existing = tmp_path / "out" / "keep.pth"
    existing.write_bytes(b"keep me")
    assert "already exists" in _invoke([*sources, existing], capsys)[1]
    assert existing.read_bytes() == b"keep me"
    assert "output folder" in _invoke([*sources, tmp_path / "missing" / "c.pth"], capsys)[1]
    assert "extension '.txt'" in _invoke([*sources, tmp_path / "out" / "c.txt"], capsys)[1]
    assert os.listdir(tmp_path / "out") == ["keep.pth"]


def test_disk_full_while_saving_leaves_nothing(inputs, tmp_path, capsys, monkeypatch) -> None:
    def fill_disk(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_io.torch, "save", fill_disk)
    code, err = _invoke([inputs["sd15"], inputs["control"], inputs["input"], tmp_path / "out" / "c.pth"], capsys)
    assert code == 2 and "No space left on device" in err
    assert os.listdir(tmp_path / "out") == []


def test_usage_errors(inputs, capsys) -> None:
    assert run(tool_transfer_control.main, [str(inputs["sd15"]), "--sd15", str(inputs["sd15"])]) == 2
    assert "given both as a positional and as --sd15" in capsys.readouterr().err
    assert run(tool_transfer_control.main, ["a", "b", "c", "d", "e"]) == 2
    assert "expected at most 4 paths" in capsys.readouterr().err
    assert run(tool_transfer_control.main, ["--help"]) == 0
    assert "./models/control_sd15_openpose.pth" in capsys.readouterr().out


@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory) -> dict[str, Path]:
    """The three inputs at the tiny config's full layout: a base in the release layout (`state_dict` wrapper), a
    trained ControlNet (every weight random) and a fine-tune, as .safetensors."""
    folder = tmp_path_factory.mktemp("tiny")
    paths = {"sd15": folder / "base.ckpt", "control": folder / "control.safetensors",
             "input": folder / "fine.safetensors"}
    torch.save({"state_dict": random_base_state_dict(str(TINY_CONFIG), seed=0), "global_step": 1}, paths["sd15"])
    save_state_dict(randomize_(create_model(TINY_CONFIG), seed=1).state_dict(), paths["control"])
    save_state_dict(random_base_state_dict(str(TINY_CONFIG), seed=2), paths["input"])
    return paths


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_streamed_transfer_equals_the_whole_state_dict_transfer(tiny_inputs, tmp_path, capsys, suffix: str) -> None:
    # Before streaming, the tool read the three files whole and saved transfer_control's result: that is the
    # reference, byte for byte (a .ckpt holds a random serialization id, so there: the same tensors in order).
    output, reference = tmp_path / f"streamed{suffix}", tmp_path / f"whole{suffix}"
    assert _invoke([*tiny_inputs.values(), output], capsys) == (0, "")
    whole = {name: read_state_dict(path) for name, path in tiny_inputs.items()}
    save_state_dict(transfer_control(whole["control"], whole["sd15"], whole["input"]), reference)
    if suffix == ".safetensors":
        assert output.read_bytes() == reference.read_bytes()
    saved, expected = read_state_dict(output), read_state_dict(reference)
    assert list(saved) == list(expected)
    for key, tensor in expected.items():
        assert saved[key].dtype == tensor.dtype and torch.equal(saved[key], tensor), key
    create_model(TINY_CONFIG).load_state_dict(saved, strict=True)
