"""Checks of the paths a tool writes to, before any heavy work: one function, one message style."""
from __future__ import annotations

import os
from pathlib import Path

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


def check_output_path(path: PathLike, overwrite: bool = False, folder: bool = False,
                      overwrite_flag: str = "--overwrite", marker: str | None = None, kind: str = "") -> None:
    """Refuse an output that exists (unless `overwrite`), is of the other kind (a file where a folder is written, or
    the reverse), or whose parent folder is missing or not writable; `overwrite_flag` is the flag a folder-writing
    tool replaces an existing folder with. With `marker`, an existing non-empty folder is replaced only if it holds
    that file, which makes it a `kind` (a model folder, a latent cache) rather than a folder of the user's."""
    target = Path(path)
    what = "output folder" if folder else "output"
    if target.exists() and target.is_dir() != folder:
        if folder:
            raise FileExistsError(f"{what} '{path}' is a file; give the name of a folder")
        raise IsADirectoryError(f"{what} '{path}' is a folder; give a file name inside it")
    if target.exists() and not overwrite:
        remedy = f"pass {overwrite_flag}" if folder else "delete it first"
        raise FileExistsError(f"{what} '{path}' already exists; choose another name or {remedy}")
    if marker is not None and target.is_dir() and any(target.iterdir()) and not (target / marker).is_file():
        raise FileExistsError(f"{what} '{path}' is not empty and holds no {marker}; it is not a {kind}, so it is not "
                              f"replaced even with {overwrite_flag}")
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
