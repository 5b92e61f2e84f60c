"""Reading checkpoints: round trips, real-world layouts, safe unpickling, damaged and missing files."""
from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from cldm.checkpoints.saving import save_state_dict
from ldm.checkpoint import open_state_dict, read_state_dict
from tests.helpers.state_dicts import assert_same, sample_state_dict


@pytest.mark.parametrize("name", ["weights.safetensors", "weights.ckpt", "weights.pth"])
def test_round_trip(tmp_path: Path, name: str) -> None:
    state_dict = sample_state_dict()
    save_state_dict(state_dict, tmp_path / name)
    assert_same(read_state_dict(tmp_path / name), state_dict)
    assert os.listdir(tmp_path) == [name]  # no temporary file left behind


def test_saved_files_get_the_usual_permissions(tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    reference.write_bytes(b"")  # what the umask gives any new file
    for name in ("a.safetensors", "a.ckpt"):
        save_state_dict(sample_state_dict(), tmp_path / name)
        assert (tmp_path / name).stat().st_mode == reference.stat().st_mode, name


def test_safetensors_save_handles_views_and_shared_storage(tmp_path: Path) -> None:
    base = torch.arange(12.0)
    state_dict = {"a": base, "b": base, "c": base.view(3, 4).t(), "d": base[:4]}
    save_state_dict(state_dict, tmp_path / "shared.safetensors")
    assert_same(read_state_dict(tmp_path / "shared.safetensors"), {k: v.contiguous() for k, v in state_dict.items()})


def test_lightning_checkpoint_loads_and_ignores_training_state(tmp_path: Path) -> None:
    state_dict = sample_state_dict()
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
    assert_same(read_state_dict(tmp_path / "last.ckpt"), state_dict)


def test_state_dict_is_unwrapped_twice_and_non_tensor_entries_dropped(tmp_path: Path) -> None:
    state_dict = sample_state_dict()
    torch.save({"state_dict": {"state_dict": {**state_dict, "global_step": 7}}}, tmp_path / "nested.ckpt")
    assert_same(read_state_dict(tmp_path / "nested.ckpt"), state_dict)


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
    state_dict = sample_state_dict()
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
    assert_same(read_state_dict(tmp_path / "sd-v1-4.ckpt"), state_dict)


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
    payload = {"state_dict": sample_state_dict(), "x": _WritesMarkerFile(marker, via_shell)}
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
    save_state_dict(sample_state_dict(), path)
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


# Reading one tensor at a time ----------------------------------------------------------------------------------


def _layouts() -> dict[str, torch.Tensor]:
    """Tensors as torch files hold them: a view into another's storage, a transposed view, half, a 0-d and an
    empty tensor."""
    base = torch.arange(20.0).reshape(4, 5)
    return {"base": base, "rows": base[1:3], "transposed": base.t(), "half": torch.randn(3).half(),
            "scalar": torch.tensor(7), "empty": torch.empty(0)}


@pytest.mark.parametrize("name", ["release.ckpt", "legacy.pth", "weights.safetensors"])
def test_open_state_dict_reads_what_read_state_dict_reads(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    if name == "release.ckpt":
        torch.save({"state_dict": _layouts(), "global_step": 7}, path)
    elif name == "legacy.pth":
        torch.save(_layouts(), path, _use_new_zipfile_serialization=False)
    else:
        save_state_dict(_layouts(), path)
    whole, reader = read_state_dict(path), open_state_dict(path)
    assert list(reader) == list(whole) and len(reader) == len(whole) and "base" in reader and "x" not in reader
    for key, tensor in whole.items():
        assert reader.meta[key].is_meta and reader.meta[key].shape == tensor.shape, key
        read = reader[key]
        assert read.dtype == tensor.dtype and read.stride() == tensor.stride() and torch.equal(read, tensor), key
    with pytest.raises(KeyError):
        reader["x"]


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_each_lookup_reads_the_file_into_memory_of_its_own(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"model{suffix}"
    save_state_dict(sample_state_dict(), path)
    reader = open_state_dict(path)
    key = "model.diffusion_model.out.2.weight"
    first = reader[key]
    first.zero_()  # writable, and changing it changes neither the file nor the next read
    assert torch.equal(reader[key], sample_state_dict()[key])
    assert first.untyped_storage().nbytes() == first.numel() * first.element_size()


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_damaged_files_are_reported_when_opened(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"model{suffix}"
    save_state_dict(sample_state_dict(), path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated or not a checkpoint") as error:
        open_state_dict(path)
    assert str(path) in str(error.value)


def test_a_torch_file_cut_short_after_opening_is_reported_when_read(tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"
    torch.save({"big": torch.zeros(10_000)}, path)
    reader = open_state_dict(path)
    with open(path, "r+b") as file:  # cut inside the tensor's data: the zip directory is already read
        file.truncate(reader.meta["big"].untyped_storage()._checkpoint_offset + 100)
    with pytest.raises(ValueError, match=r"truncated or not a checkpoint \(the file ends inside the data of a tensor "
                                         r"of shape \[10000\]\)"):
        reader["big"]
