"""tool_export_diffusers.py end to end: the folder loads with diffusers and gives our ControlNet's residuals."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tool_export_diffusers
from cldm.checkpoints.saving import save_state_dict
from cldm.cldm import ControlNet
from cldm.cli import run
from tests.helpers.random_weights import control_params, random_control_net
from tests.helpers.paths import REPO_ROOT, TINY_CONFIG


TINY = str(TINY_CONFIG)
V15 = str(REPO_ROOT / "models" / "cldm_v15.yaml")


def control_weights(net: ControlNet) -> dict[str, torch.Tensor]:
    """The released files' layout: `control_model.*` keys."""
    return {f"control_model.{key}": tensor for key, tensor in net.state_dict().items()}


def max_relative_error(net: ControlNet, folder: Path, latent_size: int, context_dim: int) -> float:
    """Largest max|ours - theirs| / max|theirs| over the residuals, diffusers loading `folder` itself."""
    diffusers = pytest.importorskip("diffusers")
    theirs_model = diffusers.ControlNetModel.from_pretrained(folder).eval()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, latent_size, latent_size, generator=generator)
    hint = torch.rand(1, 3, 8 * latent_size, 8 * latent_size, generator=generator)
    context = torch.randn(1, 77, context_dim, generator=generator)
    t = torch.tensor([321])
    with torch.no_grad():
        ours = net(x, hint, t, context)
        down, mid = theirs_model(x, t, context, hint, return_dict=False)
    theirs = [*down, mid]
    assert len(ours) == len(theirs) == len(net.zero_convs) + 1
    assert all(float(r.abs().max()) > 1e-3 for r in theirs)
    return max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(ours, theirs, strict=True))


@pytest.fixture(scope="module")
def tiny_net() -> ControlNet:
    return random_control_net(control_params(TINY))


@pytest.fixture
def tiny_control_file(tmp_path: Path, tiny_net: ControlNet) -> Path:
    path = tmp_path / "control.safetensors"
    save_state_dict(control_weights(tiny_net), path)
    return path


def test_tiny_export_loads_in_diffusers_with_the_same_residuals(tmp_path, tiny_net, tiny_control_file) -> None:
    pytest.importorskip("diffusers")
    out = tmp_path / "exported"
    assert tool_export_diffusers.main([str(tiny_control_file), str(out), "--config", TINY]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert json.loads((out / "config.json").read_text())["_class_name"] == "ControlNetModel"
    assert max_relative_error(tiny_net, out, latent_size=8, context_dim=32) < 1e-4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["control.safetensors", "exported"]  # no temp folder left


@pytest.mark.slow
def test_sd15_architecture_export_has_the_same_residuals(tmp_path) -> None:
    pytest.importorskip("diffusers")
    net = random_control_net(control_params(V15))
    source = tmp_path / "control_sd15.safetensors"
    save_state_dict(control_weights(net), source)
    out = tmp_path / "controlnet-sd15"
    assert tool_export_diffusers.main([str(source), str(out), "--config", V15]) == 0
    source.unlink()  # free the disk early; the folder alone must be enough
    error = max_relative_error(net, out, latent_size=16, context_dim=768)
    print(f"SD1.5 architecture: max relative residual error {error:.3g}")
    assert error < 1e-4


def test_full_checkpoint_and_half_precision(tmp_path, tiny_net) -> None:
    pytest.importorskip("diffusers")
    full = {**control_weights(tiny_net), "model.diffusion_model.out.2.weight": torch.randn(4, 32, 3, 3)}
    source = tmp_path / "full.ckpt"
    torch.save({"state_dict": full, "global_step": 7}, source)  # a Lightning-style training checkpoint
    out = tmp_path / "exported"
    assert tool_export_diffusers.main([str(source), str(out), "--config", TINY, "--half"]) == 0
    weights = load_file(out / "diffusion_pytorch_model.safetensors")
    assert len(weights) == len(tiny_net.state_dict())
    assert all(t.dtype == torch.float16 for t in weights.values())
    expected = tiny_net.state_dict()["middle_block_out.0.weight"].half()
    assert torch.equal(weights["controlnet_mid_block.weight"], expected)


def test_overwrite_replaces_the_folder(tmp_path, tiny_control_file) -> None:
    pytest.importorskip("diffusers")
    out = tmp_path / "exported"
    out.mkdir()
    (out / "config.json").write_text('{"_class_name": "ControlNetModel"}')  # a ControlNet exported before
    (out / "stale.txt").write_text("old")
    assert tool_export_diffusers.main([str(tiny_control_file), str(out), "--config", TINY, "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert json.loads((out / "config.json").read_text())["_class_name"] == "ControlNetModel"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["control.safetensors", "exported"]


def test_overwrite_never_replaces_a_folder_that_is_not_a_model(tmp_path, tiny_control_file, capsys) -> None:
    pytest.importorskip("diffusers")
    out = tmp_path / "documents"
    out.mkdir()
    (out / "notes.txt").write_text("keep")
    argv = [str(tiny_control_file), str(out), "--config", TINY, "--overwrite"]
    assert "not a ControlNet model folder" in _fails(argv, capsys)
    assert (out / "notes.txt").read_text() == "keep"


def _fails(argv: list[str], capsys) -> str:
    """Run the tool as the command line does; return its one-line error."""
    assert run(tool_export_diffusers.main, argv) == 2
    return capsys.readouterr().err


def test_bad_inputs_give_a_clear_message_and_write_nothing(tmp_path, tiny_control_file, capsys) -> None:
    pytest.importorskip("diffusers")
    out = tmp_path / "exported"
    before = sorted(tmp_path.iterdir())

    assert "does not exist" in _fails([str(tmp_path / "missing.safetensors"), str(out), "--config", TINY], capsys)
    assert "does not fit config" in _fails([str(tiny_control_file), str(out), "--config", V15], capsys)
    assert "config file" in _fails([str(tiny_control_file), str(out), "--config", str(tmp_path / "no.yaml")], capsys)
    sd_only = tmp_path / "sd.safetensors"
    save_state_dict({"model.diffusion_model.out.2.weight": torch.zeros(4, 32, 3, 3)}, sd_only)
    before.append(sd_only)
    assert "no 'control_model.*' weights" in _fails([str(sd_only), str(out), "--config", TINY], capsys)
    assert sorted(tmp_path.iterdir()) == sorted(before)

    out.mkdir()
    assert "already exists" in _fails([str(tiny_control_file), str(out), "--config", TINY], capsys)
    assert list(out.iterdir()) == []


def test_missing_diffusers_is_explained(tmp_path, tiny_control_file, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `import diffusers` fail
    message = _fails([str(tiny_control_file), str(tmp_path / "exported"), "--config", TINY], capsys)
    assert "pip install diffusers" in message
    assert not (tmp_path / "exported").exists()
