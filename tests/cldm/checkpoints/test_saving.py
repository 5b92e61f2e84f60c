"""Saving state dicts atomically: a failed write leaves nothing, or the old file; formats by extension."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from cldm.checkpoints import saving
from cldm.checkpoints.atomic import atomic_path, atomic_write
from cldm.checkpoints.paths import checkpoint_format
from cldm.checkpoints.saving import save_state_dict
from tests.helpers.state_dicts import sample_state_dict


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
        save_state_dict(sample_state_dict(), tmp_path / name)
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
        save_state_dict(sample_state_dict(), tmp_path / "model.bin")
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


def test_atomic_folder_appears_complete_and_replaces_the_old_one(tmp_path: Path) -> None:
    target = tmp_path / "model"
    with atomic_path(target, folder=True) as folder:
        (folder / "config.json").write_text("{}")
        assert not target.exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model"]
    with pytest.raises(KeyboardInterrupt), atomic_path(target, folder=True) as folder:
        (folder / "config.json").write_text('{"new": 1}')
        raise KeyboardInterrupt
    assert (target / "config.json").read_text() == "{}" and os.listdir(tmp_path) == ["model"]
    with atomic_path(target, folder=True) as folder:
        (folder / "weights").write_bytes(b"1")
    assert os.listdir(target) == ["weights"] and os.listdir(tmp_path) == ["model"]
