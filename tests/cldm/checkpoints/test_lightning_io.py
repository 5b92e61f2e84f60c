"""AtomicCheckpointIO (Lightning's checkpoint plugin) and the crash-safety helpers of cldm.checkpoints.atomic."""
from __future__ import annotations

import errno
import os
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from cldm.checkpoints import atomic as checkpoint_io
from cldm.checkpoints.lightning_io import AtomicCheckpointIO
from cldm.checkpoints.atomic import atomic_path, atomic_write
from ldm.checkpoint import read_checkpoint

TRAINING_CHECKPOINT = {"state_dict": {"w": torch.arange(4.0)}, "global_step": 7, "epoch": 1,
                       "loops": {"fit_loop": {"epoch_progress": {"total": {"completed": 1}}}},
                       "optimizer_states": [{"state": {0: {"exp_avg": torch.ones(4)}}, "param_groups": []}],
                       "callbacks": {"RandomStateCheckpoint": {"python": (3, tuple(range(5)), None)}}}


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    plugin = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"  # the folder is created
    plugin.save_checkpoint(TRAINING_CHECKPOINT, path)
    loaded = plugin.load_checkpoint(path)
    assert loaded["global_step"] == 7 and torch.equal(loaded["state_dict"]["w"], torch.arange(4.0))
    assert loaded["callbacks"] == TRAINING_CHECKPOINT["callbacks"]
    assert os.listdir(path.parent) == ["last.ckpt"]


@pytest.mark.parametrize("error", [OSError(errno.EIO, "Input/output error"), KeyboardInterrupt()])
def test_a_failed_save_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch, error) -> None:
    plugin = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    plugin.save_checkpoint(TRAINING_CHECKPOINT, path)
    before = path.read_bytes()

    def fail_halfway(obj, target, *args, **kwargs):
        Path(target).write_bytes(before[: len(before) // 2])
        raise error

    monkeypatch.setattr(torch, "save", fail_halfway)
    with pytest.raises(type(error)):
        plugin.save_checkpoint({**TRAINING_CHECKPOINT, "global_step": 8}, path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["last.ckpt"]


def test_storage_options_are_refused(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="storage_options"):
        AtomicCheckpointIO().save_checkpoint(TRAINING_CHECKPOINT, tmp_path / "x.ckpt", storage_options={})


def test_load_refuses_what_would_run_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class RunsCode:
        def __reduce__(self):
            return os.system, (f"touch '{marker}'",)

    torch.save({**TRAINING_CHECKPOINT, "callbacks": {"x": RunsCode()}}, tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match="would import 'posix.system'"):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "evil.ckpt")
    assert not marker.exists()


def test_load_names_a_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(TRAINING_CHECKPOINT, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"checkpoint '{path}' is truncated or not a checkpoint"):
        AtomicCheckpointIO().load_checkpoint(path)


def test_read_checkpoint_mmap_reads_lazily_the_same_values(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    torch.save(TRAINING_CHECKPOINT, path)
    mapped, read = read_checkpoint(path, mmap=True), read_checkpoint(path, mmap=False)
    assert torch.equal(mapped["state_dict"]["w"], read["state_dict"]["w"]) and mapped["global_step"] == 7


# ---------------------------------------------------------------------------------------------
# Disk full, however the writer reports it
# ---------------------------------------------------------------------------------------------

_DiskUsage = namedtuple("_DiskUsage", "total used free")


@pytest.mark.parametrize("error,free", [
    (OSError(errno.ENOSPC, "No space left on device"), 10**12),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), 10**12),
    (RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"), 10**12),  # safetensors
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"), 1000),  # torch.save
], ids=["ENOSPC", "EDQUOT", "safetensors", "torch-on-a-full-disk"])
def test_running_out_of_space_is_named(tmp_path: Path, monkeypatch, error: Exception, free: int) -> None:
    monkeypatch.setattr(checkpoint_io.shutil, "disk_usage", lambda path: _DiskUsage(10**12, 10**12 - free, free))
    target = tmp_path / "model.ckpt"
    with pytest.raises(OSError) as raised, atomic_path(target) as temp:
        temp.write_bytes(b"partial")
        raise error
    assert str(raised.value) == (f"No space left on device while writing '{target}'; free some space or choose "
                                 f"another folder (nothing was written)")
    assert raised.value.errno == errno.ENOSPC and raised.value.__cause__ is error
    assert os.listdir(tmp_path) == []


def test_other_write_errors_pass_through(tmp_path: Path) -> None:
    error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    with pytest.raises(RuntimeError) as raised, atomic_write(tmp_path / "model.ckpt") as file:
        file.write(b"partial")
        raise error  # plenty of space on the test machine's disk: not reported as a full disk
    assert raised.value is error and os.listdir(tmp_path) == []
