"""The atomic writer's temporary files: named after their writer, and removed once the writer is dead, never before."""
from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path

import pytest

from cldm.checkpoints.atomic import (
    UNCHECKABLE_STALE_AFTER_S, atomic_path, atomic_write, remove_stale_temporary_files, stale_temporary_files,
)
from cldm.processes import ProcessIdentity

ME = ProcessIdentity.current()
DEAD = ProcessIdentity(2**22 + 1, 0, ME.host)  # above Linux's largest pid: no such process
OTHER_HOST = ProcessIdentity(ME.pid, ME.start, f"{(int(ME.host, 16) + 1) % 2**32:08x}")
DAY_AND_AN_HOUR_AGO = time.time() - UNCHECKABLE_STALE_AFTER_S - 3600


def _temporary(folder: Path, name: str, writer: ProcessIdentity | None, *, is_folder: bool = False,
               age_of: float | None = None, ending: str = "tmp") -> Path:
    """A temporary file (or folder) of `atomic_path` for `name`, as `writer` (None: an earlier version) names it."""
    path = folder / (f".{name}.{writer.tag}.0123abcd.{ending}" if writer else f".{name}.0123abcd.{ending}")
    if is_folder:
        (path / "source").mkdir(parents=True)
        (path / "prompt.json").write_text("{}\n")
    else:
        path.write_bytes(b"x" * 1000)
    if age_of is not None:
        for entry in [path, *path.iterdir()] if is_folder else [path]:
            os.utime(entry, (age_of, age_of))
    return path


def test_only_temporary_files_of_dead_writers_are_stale(tmp_path: Path) -> None:
    stale = [
        _temporary(tmp_path, "last.ckpt", DEAD),
        _temporary(tmp_path, "fill50k", DEAD, is_folder=True),
        _temporary(tmp_path, "fill50k", DEAD, is_folder=True, ending="old"),  # an old folder being replaced
        _temporary(tmp_path, "a.ckpt", ProcessIdentity(ME.pid, ME.start + 1, ME.host)),  # its pid, reused since
        _temporary(tmp_path, "b.ckpt", OTHER_HOST, age_of=DAY_AND_AN_HOUR_AGO),
        _temporary(tmp_path, "c.ckpt", None, age_of=DAY_AND_AN_HOUR_AGO),  # named by an earlier version
    ]
    kept = [
        _temporary(tmp_path, "d.ckpt", ME),  # a write under way in this process
        _temporary(tmp_path, "e.ckpt", ProcessIdentity.parse(f"{os.getppid()}-0-{ME.host}")),  # ... in another one
        _temporary(tmp_path, "f.ckpt", OTHER_HOST),  # cannot be asked, and recent
        _temporary(tmp_path, "g.ckpt", None),
        _temporary(tmp_path, "h", None, is_folder=True, age_of=time.time() - 60),
    ]
    for name in ("last.ckpt", ".hidden", "x.tmp", ".last.ckpt.tmp", ".last.ckpt.0123abcd.tmp.old"):
        (tmp_path / name).write_bytes(b"")
        os.utime(tmp_path / name, (DAY_AND_AN_HOUR_AGO, DAY_AND_AN_HOUR_AGO))
    assert stale_temporary_files(tmp_path) == sorted(stale)
    assert stale_temporary_files(tmp_path / "missing") == []
    assert remove_stale_temporary_files(tmp_path) == sorted(stale)
    assert not any(path.exists() for path in stale) and all(path.exists() for path in kept)


def test_a_write_removes_what_dead_writers_left_in_its_folder(tmp_path: Path, caplog) -> None:
    left = _temporary(tmp_path, "model.ckpt", DEAD)
    with caplog.at_level(logging.INFO), atomic_write(tmp_path / "other.ckpt") as file:
        names = os.listdir(tmp_path)
        file.write(b"new")
    assert len(names) == 1 and re.fullmatch(rf"\.other\.ckpt\.{ME.tag}\.[0-9a-f]{{8}}\.tmp", names[0])  # its writer
    assert os.listdir(tmp_path) == ["other.ckpt"]
    assert f"Removed {left} (0.0 MB), the temporary file of a write whose process was killed" in caplog.text


def test_a_folder_write_sweeps_the_folder_above(tmp_path: Path) -> None:
    left = _temporary(tmp_path, "cache", DEAD, is_folder=True)
    with atomic_path(tmp_path / "cache", folder=True) as folder:
        (folder / "manifest.json").write_text("{}")
    assert not left.exists() and os.listdir(tmp_path) == ["cache"]


def test_a_replaced_folder_that_is_a_link_is_unlinked(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "keep.txt").write_text("x")
    (tmp_path / "out").symlink_to(tmp_path / "real")
    with atomic_path(tmp_path / "out", folder=True) as folder:
        (folder / "new.txt").write_text("y")
    assert sorted(os.listdir(tmp_path)) == ["out", "real"] and os.listdir(tmp_path / "out") == ["new.txt"]
    assert os.listdir(tmp_path / "real") == ["keep.txt"]


@pytest.mark.parametrize("error", [RuntimeError("bug"), KeyboardInterrupt()])
def test_a_failed_write_leaves_nothing(tmp_path: Path, error: BaseException) -> None:
    with pytest.raises(type(error)), atomic_path(tmp_path / "x.ckpt") as temp:
        temp.write_bytes(b"partial")
        raise error
    assert os.listdir(tmp_path) == []
