"""Checks of the paths a tool writes to, before any heavy work: one function, one message style."""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ldm.checkpoint import SAFETENSORS_SUFFIX, TORCH_SUFFIXES, PathLike

def checkpoint_format(path: PathLike) -> str:
    """"safetensors" or "torch", chosen by the file extension of an output path."""
    suffix = Path(path).suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        return "safetensors"
    if suffix in TORCH_SUFFIXES:
        return "torch"
    raise ValueError(
        f"cannot tell the checkpoint format of '{path}' from its extension '{suffix}'; "
        f"use one of {', '.join((SAFETENSORS_SUFFIX, *TORCH_SUFFIXES))}"
    )


def _read_json_object(path: Path) -> dict[str, Any] | None:
    """The JSON object in the file `path`, or None if it cannot be read as one."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing, unreadable, not UTF-8, not JSON
        return None
    return value if isinstance(value, dict) else None


def check_output_path(path: PathLike, overwrite: bool = False, folder: bool = False,
                      overwrite_flag: str = "--overwrite", marker: str | None = None, kind: str = "",
                      marker_fields: Mapping[str, Any] | None = None) -> None:
    """Refuse an output that exists (unless `overwrite`), is of the other kind (a file where a folder is written, or
    the reverse), or whose parent folder is missing or not writable; `overwrite_flag` is the flag a folder-writing
    tool replaces an existing folder with. With `marker`, an existing non-empty folder is replaced only if it holds
    that JSON file, with the values `marker_fields`, which makes it a `kind` (a model folder, a latent cache) that a
    tool made rather than a folder of the user's."""
    target = Path(path)
    what = "output folder" if folder else "output"
    if target.exists() and target.is_dir() != folder:
        if folder:
            raise FileExistsError(f"{what} '{path}' is a file; give the name of a folder")
        raise IsADirectoryError(f"{what} '{path}' is a folder; give a file name inside it")
    if target.exists() and not overwrite:
        remedy = f"pass {overwrite_flag}" if folder else "delete it first"
        raise FileExistsError(f"{what} '{path}' already exists; choose another name or {remedy}")
    if marker is not None and target.is_dir() and any(target.iterdir()):
        kept = f"so it is not replaced even with {overwrite_flag}"
        if not (target / marker).is_file():
            raise FileExistsError(f"{what} '{path}' is not empty and holds no {marker}; it is not a {kind}, {kept}")
        fields = _read_json_object(target / marker)
        if fields is None or any(fields.get(key) != value for key, value in (marker_fields or {}).items()):
            raise FileExistsError(f"{what} '{path}' holds a {marker} that is not a {kind}'s, {kept}")
    parent = target.absolute().parent if folder else target.parent
    if not parent.exists():
        raise FileNotFoundError(f"output folder '{parent}' does not exist; create it first")
    if not parent.is_dir():
        raise NotADirectoryError(f"output folder '{parent}' is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"output folder '{parent}' is not writable; choose another folder")


def check_run_folder(path: PathLike, flag: str) -> None:
    """Refuse a folder that a run writes into, and creates when missing, if it is a file or cannot be written: the
    nearest part of the path that exists decides."""
    target = Path(path).absolute()
    existing = next(part for part in (target, *target.parents) if part.exists())
    subject = f"{flag} {path}" if existing == target else f"{flag} {path} cannot be created: {existing}"
    if not existing.is_dir():
        raise NotADirectoryError(f"{subject} is a file; choose a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        reason = "read-only file system" if os.statvfs(existing).f_flag & os.ST_RDONLY else "permission denied"
        raise PermissionError(f"{subject} is not writable ({reason}); choose a folder you can write to")
