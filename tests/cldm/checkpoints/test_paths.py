"""The one output-path check, for files and folders, and what an input path is."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from cldm.checkpoints.paths import check_output_path, check_run_folder
from ldm.checkpoint import detect_path_kind


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


def test_check_output_path_replaces_only_a_folder_with_its_marker(tmp_path: Path) -> None:
    def check(folder: Path) -> None:
        check_output_path(folder, overwrite=True, folder=True, marker="made_by.json", kind="tool's folder",
                          marker_fields={"tool": "ours"})

    (tmp_path / "empty").mkdir()
    check(tmp_path / "empty")
    for name, marker in {"ours": '{"tool": "ours", "version": 2}', "theirs": '{"tool": "theirs"}',
                         "broken": "{", "a list": "[]", "none": None}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "data.bin").write_bytes(b"x")
        if marker is not None:
            (tmp_path / name / "made_by.json").write_text(marker)
    check(tmp_path / "ours")
    for name in ("theirs", "broken", "a list"):
        with pytest.raises(FileExistsError, match=f"'{tmp_path / name}' holds a made_by.json that is not a tool's "
                                                  "folder's, so it is not replaced even with --overwrite"):
            check(tmp_path / name)
    with pytest.raises(FileExistsError, match="is not empty and holds no made_by.json; it is not a tool's folder, so"):
        check(tmp_path / "none")


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


def test_check_output_path_for_a_folder(tmp_path: Path) -> None:
    check_output_path(tmp_path / "new", folder=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="output folder '.*file' is a file; give the name of a folder"):
        check_output_path(tmp_path / "file", folder=True)
    with pytest.raises(FileExistsError, match="already exists; choose another name or pass --overwrite"):
        check_output_path(tmp_path, folder=True)
    check_output_path(tmp_path, overwrite=True, folder=True)
    with pytest.raises(FileNotFoundError, match="output folder '.*missing' does not exist; create it first"):
        check_output_path(tmp_path / "missing" / "model", folder=True)


def test_check_run_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    check_run_folder(tmp_path, "--root")
    check_run_folder(tmp_path / "new" / "run", "--root")  # created by the run
    (tmp_path / "notes").write_text("x")
    with pytest.raises(NotADirectoryError, match=f"^--root {tmp_path}/notes is a file; choose a folder$"):
        check_run_folder(tmp_path / "notes", "--root")
    with pytest.raises(NotADirectoryError, match=f"^--root {tmp_path}/notes/run cannot be created: {tmp_path}/notes "
                                                 f"is a file; choose a folder$"):
        check_run_folder(tmp_path / "notes" / "run", "--root")

    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)  # as for a normal user
    with pytest.raises(PermissionError, match=f"^--root {tmp_path} is not writable \\(permission denied\\); choose a "
                                              f"folder you can write to$"):
        check_run_folder(tmp_path, "--root")
    real = os.statvfs(tmp_path)
    read_only = os.statvfs_result((*real[:8], real.f_flag | os.ST_RDONLY, real.f_namemax))
    monkeypatch.setattr(os, "statvfs", lambda path: read_only)
    with pytest.raises(PermissionError, match=f"^--root {tmp_path}/run cannot be created: {tmp_path} is not writable "
                                              f"\\(read-only file system\\)"):
        check_run_folder(tmp_path / "run", "--root")
