"""Checkpoint reading (safe unpickling), atomic writing, output checks and model detection."""
from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from cldm.checkpoints import saving
from cldm.checkpoints.atomic import atomic_path, atomic_write
from cldm.checkpoints.kinds import describe_key_mismatch, detect_base_model
from cldm.checkpoints.paths import check_output_path, checkpoint_format
from cldm.checkpoints.saving import save_state_dict
from ldm.checkpoint import detect_path_kind, read_state_dict
from tests.helpers.paths import FIXTURES


def _sample_state_dict() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "model.diffusion_model.out.2.weight": torch.randn(4, 8, 3, 3, generator=generator),
        "first_stage_model.quant_conv.bias": torch.randn(8, generator=generator).half(),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None],
    }


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)  # safetensors files store keys sorted
    for key, tensor in want.items():
        assert got[key].dtype == tensor.dtype, key
        assert torch.equal(got[key], tensor), key


# ---------------------------------------------------------------------------------------------
# Round trips and real-world checkpoint layouts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["weights.safetensors", "weights.ckpt", "weights.pth"])
def test_round_trip(tmp_path: Path, name: str) -> None:
    state_dict = _sample_state_dict()
    save_state_dict(state_dict, tmp_path / name)
    _assert_same(read_state_dict(tmp_path / name), state_dict)
    assert os.listdir(tmp_path) == [name]  # no temporary file left behind


def test_saved_files_get_the_usual_permissions(tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    reference.write_bytes(b"")  # what the umask gives any new file
    for name in ("a.safetensors", "a.ckpt"):
        save_state_dict(_sample_state_dict(), tmp_path / name)
        assert (tmp_path / name).stat().st_mode == reference.stat().st_mode, name


def test_safetensors_save_handles_views_and_shared_storage(tmp_path: Path) -> None:
    base = torch.arange(12.0)
    state_dict = {"a": base, "b": base, "c": base.view(3, 4).t(), "d": base[:4]}
    save_state_dict(state_dict, tmp_path / "shared.safetensors")
    _assert_same(read_state_dict(tmp_path / "shared.safetensors"), {k: v.contiguous() for k, v in state_dict.items()})


def test_lightning_checkpoint_loads_and_ignores_training_state(tmp_path: Path) -> None:
    state_dict = _sample_state_dict()
    checkpoint = {
        "epoch": 3,
        "global_step": 1200,
        "pytorch-lightning_version": "1.5.0",
        "state_dict": state_dict,
        "optimizer_states": [{"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 1e-5}]}],
        "lr_schedulers": [],
        "callbacks": {"ModelCheckpoint{'monitor': None}": {"best_model_score": torch.tensor(0.5)}},
        "loops": {"fit_loop": {"state_dict": {}}},
    }
    torch.save(checkpoint, tmp_path / "last.ckpt")
    _assert_same(read_state_dict(tmp_path / "last.ckpt"), state_dict)


def test_state_dict_is_unwrapped_twice_and_non_tensor_entries_dropped(tmp_path: Path) -> None:
    state_dict = _sample_state_dict()
    torch.save({"state_dict": {"state_dict": {**state_dict, "global_step": 7}}}, tmp_path / "nested.ckpt")
    _assert_same(read_state_dict(tmp_path / "nested.ckpt"), state_dict)


def _fake_lightning_modules(monkeypatch: pytest.MonkeyPatch) -> type:
    """A ModelCheckpoint class picklable under its real name, without importing Lightning."""
    model_checkpoint = type("ModelCheckpoint", (), {"__module__": "pytorch_lightning.callbacks.model_checkpoint"})
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    for name in names:
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules[names[0]].callbacks = sys.modules[names[1]]
    sys.modules[names[1]].model_checkpoint = sys.modules[names[2]]
    sys.modules[names[2]].ModelCheckpoint = model_checkpoint
    return model_checkpoint


def test_allow_listed_globals_load_as_inert_placeholders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # SD1.x .ckpt files key their callback state by the ModelCheckpoint class and hold numpy values.
    state_dict = _sample_state_dict()
    with monkeypatch.context() as patch:
        model_checkpoint = _fake_lightning_modules(patch)
        torch.save(
            {
                "state_dict": state_dict,
                "callbacks": {model_checkpoint: {"best_model_score": np.float64(0.25), "history": np.zeros(3)}},
                "dtype": np.dtype("float32"),
            },
            tmp_path / "sd-v1-4.ckpt",
        )
    # Loading must not import Lightning: a None entry in sys.modules makes any such import fail.
    monkeypatch.setitem(sys.modules, "pytorch_lightning", None)
    _assert_same(read_state_dict(tmp_path / "sd-v1-4.ckpt"), state_dict)


class _WritesMarkerFile:
    """Unpickling this object creates `marker` (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path, via_shell: bool) -> None:
        self.marker, self.via_shell = marker, via_shell

    def __reduce__(self):
        if self.via_shell:
            return os.system, (f"touch '{self.marker}'",)
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("via_shell", [False, True], ids=["builtins.open", "os.system"])
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path: Path, via_shell: bool, zip_format: bool) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    payload = {"state_dict": _sample_state_dict(), "x": _WritesMarkerFile(marker, via_shell)}
    torch.save(payload, path, _use_new_zipfile_serialization=zip_format)

    with pytest.raises(ValueError) as error:
        read_state_dict(path)
    message = str(error.value)
    assert str(path) in message and ".safetensors" in message
    assert ("system" if via_shell else "open") in message
    assert not marker.exists()

    # Control: the file really is malicious when loaded the unsafe way.
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
@pytest.mark.parametrize("damage", ["empty", "truncated", "text"])
def test_damaged_files_are_reported(tmp_path: Path, suffix: str, damage: str) -> None:
    path = tmp_path / f"model{suffix}"
    save_state_dict(_sample_state_dict(), path)
    data = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "text": b"model: not weights\n"}[damage])
    with pytest.raises(ValueError, match="truncated or not a checkpoint") as error:
        read_state_dict(path)
    assert str(path) in str(error.value)


def test_checkpoint_without_tensors_is_refused(tmp_path: Path) -> None:
    torch.save({"epoch": 1}, tmp_path / "empty_dict.ckpt")
    torch.save([torch.zeros(1)], tmp_path / "list.ckpt")
    with pytest.raises(ValueError, match="contains no tensors"):
        read_state_dict(tmp_path / "empty_dict.ckpt")
    with pytest.raises(ValueError, match="holds a list"):
        read_state_dict(tmp_path / "list.ckpt")


def test_missing_file_and_folders_are_reported(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        read_state_dict(tmp_path / "missing.ckpt")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        read_state_dict(tmp_path)
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(ValueError, match="diffusers folder"):
        read_state_dict(tmp_path)


# ---------------------------------------------------------------------------------------------
# Atomic writing
# ---------------------------------------------------------------------------------------------


def _half_then_fail(error: BaseException):
    def writer(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise error

    return writer


@pytest.mark.parametrize("name,writer", [("out.ckpt", "torch.save"), ("out.safetensors", "save_file")])
@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_failed_save_leaves_no_file(tmp_path: Path, monkeypatch, name: str, writer: str, error) -> None:
    if writer == "torch.save":
        monkeypatch.setattr(saving.torch, "save", _half_then_fail(error))
    else:
        monkeypatch.setattr(saving, "save_file", _half_then_fail(error))
    with pytest.raises(type(error)):
        save_state_dict(_sample_state_dict(), tmp_path / name)
    assert os.listdir(tmp_path) == []


def test_failed_overwrite_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "grid.png"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_write(target) as file:
        file.write(b"new but incomplete")
        raise RuntimeError("crash while writing")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["grid.png"]


def test_atomic_write_and_path(tmp_path: Path) -> None:
    with atomic_write(tmp_path / "notes.txt", "w") as file:
        file.write("hello")
        assert not (tmp_path / "notes.txt").exists()  # only visible once complete
    with atomic_path(tmp_path / "data.bin") as temp:
        assert temp.parent == tmp_path and temp.name.startswith(".data.bin.")
        temp.write_bytes(b"\x00\x01")
    assert (tmp_path / "notes.txt").read_text() == "hello"
    assert (tmp_path / "data.bin").read_bytes() == b"\x00\x01"
    assert sorted(os.listdir(tmp_path)) == ["data.bin", "notes.txt"]
    with pytest.raises(ValueError, match="'a'"):
        with atomic_write(tmp_path / "log.txt", "a"):
            pass


def test_save_refuses_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'\.bin'"):
        save_state_dict(_sample_state_dict(), tmp_path / "model.bin")
    with pytest.raises(ValueError, match="'epoch'"):
        save_state_dict({"epoch": 3}, tmp_path / "model.ckpt")
    with pytest.raises(ValueError, match="meta device"):
        save_state_dict({"w": torch.empty(2, device="meta")}, tmp_path / "model.safetensors")
    assert os.listdir(tmp_path) == []


def test_checkpoint_format() -> None:
    assert checkpoint_format("a/b.SafeTensors") == "safetensors"
    assert [checkpoint_format(f"m{s}") for s in (".ckpt", ".pth", ".pt")] == ["torch"] * 3
    with pytest.raises(ValueError, match="extension ''"):
        checkpoint_format("model")


# ---------------------------------------------------------------------------------------------
# Output and input path checks
# ---------------------------------------------------------------------------------------------


def test_check_output_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    check_output_path(tmp_path / "new.ckpt")
    (tmp_path / "old.ckpt").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="old.ckpt' already exists"):
        check_output_path(tmp_path / "old.ckpt")
    check_output_path(tmp_path / "old.ckpt", overwrite=True)
    with pytest.raises(FileNotFoundError, match="output folder .*nowhere' does not exist"):
        check_output_path(tmp_path / "nowhere" / "new.ckpt")
    with pytest.raises(IsADirectoryError):
        check_output_path(tmp_path)
    with pytest.raises(NotADirectoryError):
        check_output_path(tmp_path / "old.ckpt" / "new.ckpt")
    monkeypatch.chdir(tmp_path)
    check_output_path("bare_name.ckpt")  # the original refused a path without a folder part


def test_check_output_path_unwritable_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.access(folder, os.W_OK):  # root ignores chmod: make os.access answer as for a normal user
            monkeypatch.setattr(os, "access", lambda path, mode: False)
        with pytest.raises(PermissionError, match="read_only' is not writable"):
            check_output_path(folder / "out.ckpt")
    finally:
        folder.chmod(0o700)


def test_detect_path_kind(tmp_path: Path) -> None:
    (tmp_path / "model.ckpt").write_bytes(b"x")
    for marker in ("model_index.json", "config.json", "unet"):
        folder = tmp_path / marker.replace(".", "_")
        folder.mkdir()
        (folder / marker).mkdir() if marker == "unet" else (folder / marker).write_text("{}")
        assert detect_path_kind(folder) == "diffusers"
    (tmp_path / "plain").mkdir()
    assert detect_path_kind(tmp_path / "plain") == "folder"
    assert detect_path_kind(tmp_path / "model.ckpt") == "file"
    assert detect_path_kind(tmp_path / "absent.ckpt") == "missing"


# ---------------------------------------------------------------------------------------------
# Which model does a state dict hold?
# ---------------------------------------------------------------------------------------------

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
