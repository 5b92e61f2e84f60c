"""tool_add_control.py / tool_add_control_sd21.py end to end: refusals always, the full run on the tiny config."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import tool_add_control
import tool_add_control_sd21
from cldm.checkpoints.saving import save_state_dict
from ldm.checkpoint import read_state_dict
from cldm.cli import run
from cldm.model import create_model, load_weights
from cldm.checkpoints.surgery import add_control, control_source_key
from tests.helpers.paths import TINY_CONFIG


needs_tiny_config = pytest.mark.skipif(
    not TINY_CONFIG.exists(), reason="models/cldm_tiny.yaml (tiny ControlLDM config) is not there yet"
)
NEWLY_ADDED_PREFIXES = (
    "control_model.input_hint_block.",
    "control_model.zero_convs.",
    "control_model.middle_block_out.",
)

# Key names that make a state dict look like a given model (tiny tensors; see detect_base_model).
_UNET_TO_K = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
_CLIP_NORM = "cond_stage_model.transformer.text_model.final_layer_norm.weight"
SD1 = {_UNET_TO_K: torch.zeros(2, 768), _CLIP_NORM: torch.ones(2)}
SD2 = {_UNET_TO_K: torch.zeros(2, 1024), "cond_stage_model.model.ln_final.weight": torch.ones(2)}
CONTROLNET_SD1 = {**SD1, "control_model.input_hint_block.0.weight": torch.zeros(16, 3, 3, 3)}
CONTROLNET_ONLY = {"control_model.zero_convs.0.0.weight": torch.zeros(2, 2, 1, 1)}
DIFFUSERS_UNET = {"conv_in.weight": torch.zeros(2, 4, 3, 3), "down_blocks.0.resnets.0.conv1.weight": torch.zeros(2)}
VAE_ONLY = {"first_stage_model.encoder.conv_in.weight": torch.zeros(2, 3, 3, 3)}


def _invoke(main, argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """Exit code and stderr of `run(main, argv)`."""
    code = run(main, [str(arg) for arg in argv])
    return code, capsys.readouterr().err


@pytest.fixture
def dummy_config(tmp_path: Path) -> Path:
    """A config that exists but cannot be built: a refusal test that gets as far as building fails loudly."""
    path = tmp_path / "never_built.yaml"
    path.write_text("model:\n  target: refusal_tests.should.not.BuildThis\n")
    return path


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


def _saved(tmp_path: Path, state_dict: dict, name: str = "input.ckpt") -> Path:
    path = tmp_path / name
    save_state_dict(state_dict, path)
    return path


# ---------------------------------------------------------------------------------------------
# Refusals: nothing is written, exit code 2, one clear line
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "main,state_dict,expected",
    [
        (tool_add_control.main, SD2, "looks like a Stable Diffusion 2.x model; use tool_add_control_sd21.py"),
        (tool_add_control_sd21.main, SD1, "looks like a Stable Diffusion 1.x model; use tool_add_control.py"),
        (tool_add_control.main, CONTROLNET_SD1, "with a ControlNet; pass the plain Stable Diffusion checkpoint"),
        (tool_add_control.main, CONTROLNET_ONLY, "ControlNet weights without a base model; pass the plain"),
        (tool_add_control.main, DIFFUSERS_UNET, "diffusers-format model; pass the original single-file"),
        (tool_add_control.main, VAE_ONLY, "no known Stable Diffusion layout; expected a Stable Diffusion 1.x model"),
    ],
    ids=["sd2-to-sd1-tool", "sd1-to-sd2-tool", "controlnet", "controlnet-only", "diffusers-file", "vae-only"],
)
def test_refuses_wrong_model(tmp_path, out_dir, dummy_config, capsys, main, state_dict, expected) -> None:
    source = _saved(tmp_path, state_dict)
    code, err = _invoke(main, [source, out_dir / "control.ckpt", "--config", dummy_config], capsys)
    assert code == 2
    assert err.startswith(f"error: input checkpoint '{source}' looks like") or err.startswith(f"error: '{source}'")
    assert expected in err and err.count("\n") == 1
    assert os.listdir(out_dir) == []


def test_refuses_diffusers_folder(tmp_path, out_dir, dummy_config, capsys) -> None:
    folder = tmp_path / "stable-diffusion-v1-5"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    code, err = _invoke(tool_add_control.main, [folder, out_dir / "c.ckpt", "--config", dummy_config], capsys)
    assert code == 2 and "is a diffusers folder; pass the original single-file" in err
    assert os.listdir(out_dir) == []


def test_refuses_existing_output(tmp_path, out_dir, dummy_config, capsys) -> None:
    source = _saved(tmp_path, SD1)
    existing = out_dir / "control_sd15_ini.ckpt"
    existing.write_bytes(b"user's precious file")
    code, err = _invoke(tool_add_control.main, [source, existing, "--config", dummy_config], capsys)
    assert code == 2 and "already exists" in err and str(existing) in err
    assert existing.read_bytes() == b"user's precious file"
    assert os.listdir(out_dir) == [existing.name]


def test_refuses_missing_output_folder(tmp_path, dummy_config, capsys) -> None:
    source = _saved(tmp_path, SD1)
    code, err = _invoke(tool_add_control.main, [source, tmp_path / "nope" / "c.ckpt", "--config", dummy_config], capsys)
    assert code == 2 and "output folder" in err and "does not exist" in err
    assert not (tmp_path / "nope").exists()


def test_refuses_unwritable_output_folder(tmp_path, out_dir, dummy_config, capsys, monkeypatch) -> None:
    source = _saved(tmp_path, SD1)
    out_dir.chmod(0o500)
    try:
        if os.access(out_dir, os.W_OK):  # root ignores chmod: make os.access answer as for a normal user
            monkeypatch.setattr(os, "access", lambda path, mode: False)
        code, err = _invoke(tool_add_control.main, [source, out_dir / "c.ckpt", "--config", dummy_config], capsys)
    finally:
        out_dir.chmod(0o700)
    assert code == 2 and "is not writable" in err
    assert os.listdir(out_dir) == []


@pytest.mark.parametrize("what", ["input", "config", "extension"])
def test_refuses_bad_paths(tmp_path, out_dir, dummy_config, capsys, what: str) -> None:
    source = _saved(tmp_path, SD1)
    argv = {
        "input": [tmp_path / "v1-5-pruned.ckpt", out_dir / "c.ckpt", "--config", dummy_config],
        "config": [source, out_dir / "c.ckpt", "--config", tmp_path / "cldm_v15.yaml"],
        "extension": [source, out_dir / "c.onnx", "--config", dummy_config],
    }[what]
    expected = {
        "input": "input checkpoint '{}' does not exist".format(tmp_path / "v1-5-pruned.ckpt"),
        "config": "config file '{}' does not exist".format(tmp_path / "cldm_v15.yaml"),
        "extension": "extension '.onnx'",
    }[what]
    code, err = _invoke(tool_add_control.main, argv, capsys)
    assert code == 2 and expected in err and err.count("\n") == 1
    assert os.listdir(out_dir) == []


def test_refuses_malicious_input(tmp_path, out_dir, dummy_config, capsys) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")

    torch.save({"state_dict": SD1, "evil": Payload()}, tmp_path / "evil.ckpt")
    argv = [tmp_path / "evil.ckpt", out_dir / "c.ckpt", "--config", dummy_config]
    code, err = _invoke(tool_add_control.main, argv, capsys)
    assert code == 2 and "convert it to .safetensors" in err
    assert not marker.exists() and os.listdir(out_dir) == []


def test_debug_shows_the_traceback(tmp_path, out_dir, dummy_config) -> None:
    source = _saved(tmp_path, SD2)
    with pytest.raises(ValueError, match="use tool_add_control_sd21.py"):
        run(tool_add_control.main, [str(source), str(out_dir / "c.ckpt"), "--config", str(dummy_config), "--debug"])


def test_help_and_usage_errors(capsys) -> None:
    assert run(tool_add_control_sd21.main, ["--help"]) == 0
    assert "./models/cldm_v21.yaml" in capsys.readouterr().out
    assert run(tool_add_control.main, ["only_one_path.ckpt"]) == 2
    assert "required: output_path" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The real run on the tiny ControlLDM
# ---------------------------------------------------------------------------------------------


def _random_like(state_dict: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Same keys and shapes, seeded random floats: copies are then distinguishable from fresh weights."""
    generator = torch.Generator().manual_seed(seed)
    return {
        key: torch.randn(value.shape, generator=generator).to(value.dtype) if value.is_floating_point() else value
        for key, value in state_dict.items()
    }


def _sd_checkpoint_of(config: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """A synthetic Stable Diffusion checkpoint for `config`: its ControlLDM without control_model.*, randomised."""
    model_state = create_model(config).state_dict()
    return _random_like({k: v for k, v in model_state.items() if not k.startswith("control_model.")}, seed)


@pytest.fixture(scope="module")
def tiny_sd() -> dict[str, torch.Tensor]:
    return _sd_checkpoint_of(TINY_CONFIG)


@pytest.fixture(scope="module")
def tiny_inputs(tiny_sd, tmp_path_factory) -> dict[str, Path]:
    """The tiny SD checkpoint as a Lightning-style .ckpt (with model_ema.* and training state) and .safetensors."""
    folder = tmp_path_factory.mktemp("tiny_sd")
    # LitEma's names: the UNet parameter name without dots.
    unet = {key: value for key, value in tiny_sd.items() if key.startswith("model.")}
    ema = {"model_ema." + key.removeprefix("model.").replace(".", ""): value for key, value in unet.items()}
    training_state = {"epoch": 4, "global_step": 1000, "optimizer_states": [], "lr_schedulers": []}
    torch.save({"state_dict": {**tiny_sd, **ema}, **training_state}, folder / "v1-5-pruned.ckpt")
    save_state_dict(tiny_sd, folder / "v1-5-pruned.safetensors")
    return {".ckpt": folder / "v1-5-pruned.ckpt", ".safetensors": folder / "v1-5-pruned.safetensors"}


def _check_control_checkpoint(output: Path, base: dict[str, torch.Tensor], config: Path) -> dict[str, torch.Tensor]:
    """The tool's output: control = copied UNet, everything else from the base, zero layers zero; loads strictly."""
    saved = read_state_dict(output)
    fresh = create_model(config)
    assert sorted(saved) == sorted(fresh.state_dict())
    for key, tensor in saved.items():
        source = control_source_key(key)
        if source in base:
            assert torch.equal(tensor, base[source]), key
        else:
            assert key.startswith(NEWLY_ADDED_PREFIXES), key
    zero_layers = [key for key in saved if key.startswith(NEWLY_ADDED_PREFIXES[1:])]
    last_hint = max((k for k in saved if k.startswith(NEWLY_ADDED_PREFIXES[0])), key=lambda k: int(k.split(".")[2]))
    assert zero_layers and all(torch.count_nonzero(saved[k]) == 0 for k in [*zero_layers, last_hint])
    load_weights(fresh, saved, source=output, config=config)
    return saved


@needs_tiny_config
@pytest.mark.parametrize("in_suffix,out_suffix", [(".ckpt", ".safetensors"), (".safetensors", ".ckpt")])
def test_adds_control_to_tiny_sd(tiny_sd, tiny_inputs, out_dir, capsys, caplog, in_suffix, out_suffix) -> None:
    output = out_dir / f"control_sd15_ini{out_suffix}"
    with caplog.at_level(logging.INFO):
        code, err = _invoke(tool_add_control.main, [tiny_inputs[in_suffix], output, "--config", TINY_CONFIG], capsys)
    assert code == 0, err
    assert os.listdir(out_dir) == [output.name]
    _check_control_checkpoint(output, tiny_sd, TINY_CONFIG)
    summary = "\n".join(caplog.messages)
    assert "newly added" in summary and "control_model.zero_convs (" in summary
    assert "control_model.input_hint_block (16)" in summary


@needs_tiny_config
def test_newly_added_keys_are_hint_block_zero_convs_and_middle_block_out(tiny_sd) -> None:
    model_state = create_model(TINY_CONFIG).state_dict()
    _, newly_added = add_control(model_state, tiny_sd)
    assert sorted(newly_added) == sorted(key for key in model_state if key.startswith(NEWLY_ADDED_PREFIXES))


@needs_tiny_config
def test_seed_makes_new_weights_reproducible(tiny_inputs, out_dir, capsys) -> None:
    hint_blocks = []
    for name, seed in [("a.ckpt", 3), ("b.ckpt", 3), ("c.ckpt", 4)]:
        argv = [tiny_inputs[".ckpt"], out_dir / name, "--config", TINY_CONFIG, "--seed", seed]
        assert _invoke(tool_add_control.main, argv, capsys)[0] == 0
        saved = read_state_dict(out_dir / name)
        hint_blocks.append(torch.cat([v.flatten() for k, v in sorted(saved.items()) if "input_hint_block" in k]))
    assert torch.equal(hint_blocks[0], hint_blocks[1])
    assert not torch.equal(hint_blocks[0], hint_blocks[2])


@needs_tiny_config
def test_shape_mismatch_is_reported(tiny_sd, tmp_path, out_dir, capsys) -> None:
    key = "model.diffusion_model.out.2.weight"
    broken = {**tiny_sd, key: torch.zeros(3, 5)}
    source = _saved(tmp_path, broken, "broken.safetensors")
    code, err = _invoke(tool_add_control.main, [source, out_dir / "c.ckpt", "--config", TINY_CONFIG], capsys)
    assert code == 2 and f"'{key}' has shape [3, 5] in the checkpoint" in err
    assert os.listdir(out_dir) == []


@needs_tiny_config
def test_sd21_tool_on_a_linear_projection_tiny_config(tmp_path, out_dir, capsys) -> None:
    # SD2.x UNets use linear proj_in/proj_out (use_linear_in_transformer); that is what marks the tiny model as SD2.
    config = OmegaConf.load(TINY_CONFIG)
    for part in ("unet_config", "control_stage_config"):
        config.model.params[part].params.use_linear_in_transformer = True
    sd2_config = tmp_path / "cldm_tiny_sd21.yaml"
    OmegaConf.save(config, sd2_config)
    base = _sd_checkpoint_of(sd2_config, seed=1)
    source = _saved(tmp_path, base, "v2-1_512-ema-pruned.safetensors")

    code, err = _invoke(tool_add_control.main, [source, out_dir / "x.ckpt", "--config", sd2_config], capsys)
    assert code == 2 and "use tool_add_control_sd21.py" in err

    output = out_dir / "control_sd21_ini.ckpt"
    code, err = _invoke(tool_add_control_sd21.main, [source, output, "--config", sd2_config], capsys)
    assert code == 0, err
    _check_control_checkpoint(output, base, sd2_config)


@needs_tiny_config
def test_half_precision_input_gives_the_models_dtypes_in_separate_storages(tiny_sd, tmp_path, out_dir, capsys) -> None:
    half = {key: value.half() if value.is_floating_point() else value for key, value in tiny_sd.items()}
    source = _saved(tmp_path, half, "v1-5-fp16.safetensors")
    output = out_dir / "control_fp16.ckpt"
    assert _invoke(tool_add_control.main, [source, output, "--config", TINY_CONFIG], capsys)[0] == 0
    saved = torch.load(output, weights_only=True)  # no mmap: shared storages would show as equal data pointers
    fresh = create_model(TINY_CONFIG).state_dict()
    assert {key: value.dtype for key, value in saved.items()} == {key: value.dtype for key, value in fresh.items()}
    for key, tensor in saved.items():
        if control_source_key(key) in half:
            assert torch.equal(tensor, half[control_source_key(key)].to(tensor.dtype)), key
    pointers = [tensor.untyped_storage().data_ptr() for tensor in saved.values() if tensor.numel()]
    assert len(set(pointers)) == len(pointers)


@needs_tiny_config
def test_keys_the_input_lacks_outside_the_controlnet_are_newly_added(tiny_sd, tmp_path, out_dir, capsys,
                                                                     caplog) -> None:
    key = "first_stage_model.quant_conv.weight"
    source = _saved(tmp_path, {k: v for k, v in tiny_sd.items() if k != key}, "no_quant_conv.safetensors")
    output = out_dir / "control.safetensors"
    with caplog.at_level(logging.INFO):
        assert _invoke(tool_add_control.main, [source, output, "--config", TINY_CONFIG], capsys)[0] == 0
    saved = read_state_dict(output)
    assert sorted(saved) == sorted(create_model(TINY_CONFIG).state_dict())
    assert "first_stage_model.quant_conv (1)" in "\n".join(caplog.messages)
