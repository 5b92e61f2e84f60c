"""One atomic writer for files and folders: write under a temporary name in the same folder, fsync, rename."""
from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from cldm.processes import ProcessIdentity
from ldm.checkpoint import PathLike

logger = logging.getLogger(__name__)

# `atomic_path` writes `.<name>.<writer>.<8 hex digits>.tmp` next to the target, <writer> being the writing process's
# `ProcessIdentity.tag`; a folder it replaces is first renamed to the same name ending in `.old`.
_TEMPORARY_SUFFIX = ".tmp"
_TEMPORARY_NAME = re.compile(r"^\..+\.(?P<writer>\d+-\d+-[0-9a-f]{8})\.[0-9a-f]{8}\.(?:tmp|old)$")
# Earlier versions wrote `.<name>.<8 hex digits>.tmp`, without the writer.
_UNATTRIBUTED_TEMPORARY_NAME = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")
# A temporary file whose writer cannot be asked (on another host, or unnamed) is stale once unchanged for this long.
UNCHECKABLE_STALE_AFTER_S = 24 * 3600


def _fsync_path(path: Path) -> None:
    """Flush `path` (a file or a folder) to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# Errors of a write that ran out of space; torch and safetensors report them without an errno.
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_OS_ERROR_CODE = re.compile(r"\(os error (\d+)\)")  # safetensors' (Rust's) wording
_NEARLY_FULL_BYTES = 16 * 2**20


def _ran_out_of_space(error: Exception, folder: Path) -> bool:
    """Whether a failed write failed for lack of disk space (or quota)."""
    code = getattr(error, "errno", None)
    if code is None:
        match = _OS_ERROR_CODE.search(str(error))
        code = int(match.group(1)) if match else None
    if code is not None:
        return code in _DISK_FULL_ERRNOS
    if not isinstance(error, RuntimeError):
        return False
    try:  # torch.save reports a failed write as a RuntimeError without the cause: look at the disk itself
        return shutil.disk_usage(folder).free < _NEARLY_FULL_BYTES
    except OSError:
        return False


def _disk_full_error(target: Path) -> OSError:
    error = OSError(f"No space left on device while writing '{target}'; free some space or choose another folder "
                    f"(nothing was written)")
    error.errno = errno.ENOSPC
    return error


def _reserve(temp: Path, folder: bool) -> None:
    """Create the empty temporary file or folder, failing if the name is taken; the umask applies."""
    if folder:
        temp.mkdir()
    else:
        os.close(os.open(temp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))


def _remove(path: Path) -> None:
    """Delete a temporary file or folder, whatever it holds."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _replace(temp: Path, target: Path) -> None:
    """Rename `temp` to `target`; an existing target folder is moved aside first and deleted once replaced."""
    if not (temp.is_dir() and target.is_dir()):
        os.replace(temp, target)
        return
    old = temp.with_suffix(".old")
    os.replace(target, old)
    try:
        os.replace(temp, target)
    except BaseException:
        os.replace(old, target)
        raise
    _remove(old)


@contextmanager
def atomic_path(path: PathLike, folder: bool = False) -> Iterator[Path]:
    """Yield a temporary file (or, with `folder`, folder) next to `path`; on success it is fsync'd and renamed to
    `path`, replacing what was there, on failure removed.

    The temporary names hold the writing process's identity, so that the first write into a folder removes the
    temporary files that killed processes left there (`remove_stale_temporary_files`) and no other's. A write that
    runs out of disk space raises an OSError (errno ENOSPC) that names `path`.
    """
    target = Path(path).absolute() if folder else Path(path)
    remove_stale_temporary_files(target.parent)
    writer = ProcessIdentity.current().tag
    temp = target.with_name(f".{target.name}.{writer}.{secrets.token_hex(4)}{_TEMPORARY_SUFFIX}")
    _reserve(temp, folder)
    permissions = temp.stat().st_mode & 0o777
    try:
        yield temp
        os.chmod(temp, permissions)  # writers that recreate the file (safetensors) would leave it private (0600)
        _fsync_path(temp)
        _replace(temp, target)
    except Exception as error:
        out_of_space = _ran_out_of_space(error, target.parent)  # asked before the partial file frees its space
        _remove(temp)
        if out_of_space:
            raise _disk_full_error(target) from error
        raise
    except BaseException:  # KeyboardInterrupt, SystemExit: never leave a partial file behind either
        _remove(temp)
        raise
    try:
        _fsync_path(target.parent)  # make the rename itself durable
    except OSError:
        logger.debug("could not fsync folder %s (not supported on this platform)", target.parent)


def _last_change(path: Path) -> float:
    """When `path`, or for a folder anything directly in it, last changed (mtime)."""
    entries = [path, *path.iterdir()] if path.is_dir() and not path.is_symlink() else [path]
    return max(entry.lstat().st_mtime for entry in entries)


def _is_stale(path: Path, now: float) -> bool:
    """Whether `path` is a temporary file or folder of `atomic_path` whose writer died before finishing."""
    match = _TEMPORARY_NAME.match(path.name)
    if match:
        running = ProcessIdentity.parse(match["writer"]).is_running()
        if running is not None:
            return not running
    elif not _UNATTRIBUTED_TEMPORARY_NAME.match(path.name):
        return False
    try:  # its writer cannot be asked: judge by age
        return now - _last_change(path) > UNCHECKABLE_STALE_AFTER_S
    except OSError:  # it went away meanwhile
        return False


def stale_temporary_files(folder: PathLike) -> list[Path]:
    """Temporary files and folders that `atomic_path` left in `folder` when its process was killed mid-write: those
    of writers on this host that no longer run, and those whose writer cannot be asked (on another host, or named
    by an earlier version) unchanged for `UNCHECKABLE_STALE_AFTER_S`. Another process's write under way is never
    among them."""
    now = time.time()
    try:
        candidates = [path for path in Path(folder).iterdir() if path.name.startswith(".")]
    except OSError:  # a missing or unreadable folder
        return []
    return sorted(path for path in candidates if _is_stale(path, now))


def _size(path: Path) -> int:
    """Bytes in the file, or in the files of the folder, `path`."""
    files = path.rglob("*") if path.is_dir() and not path.is_symlink() else [path]
    return sum(file.lstat().st_size for file in files)


def remove_stale_temporary_files(folder: PathLike) -> list[Path]:
    """Delete `stale_temporary_files(folder)`, logging each one with its size; returns them."""
    removed = stale_temporary_files(folder)
    for path in removed:
        try:
            size = _size(path)
        except OSError:
            size = 0
        _remove(path)
        logger.info("Removed %s (%.1f MB), the temporary file of a write whose process was killed", path,
                    size / 1e6)
    return removed


@contextmanager
def atomic_write(path: PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a file for writing that appears at `path` complete, or not at all."""
    if mode not in ("w", "wb", "wt"):
        raise ValueError(f"atomic_write supports the modes 'w', 'wt' and 'wb', not '{mode}'")
    with atomic_path(path) as temp, open(temp, mode) as file:
        yield file
