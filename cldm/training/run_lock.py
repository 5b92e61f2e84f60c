"""One training run per `--default_root_dir`: a lock file in the folder, held through an open file descriptor with
`flock`, so the operating system releases it when the process ends, however it ends (SIGKILL included)."""
from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from datetime import datetime
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

logger = logging.getLogger(__name__)

LOCK_NAME = ".controlnet_run.lock"
# The global rank as the launchers of a distributed run give it: Lightning's DDP launcher re-runs the script for
# ranks 1..N-1 with LOCAL_RANK (and NODE_RANK on other nodes) set; torchrun sets RANK, LOCAL_RANK and GROUP_RANK;
# SLURM sets SLURM_PROCID.
RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")


class FolderInUseError(OSError):
    """The run folder is locked by another training run."""


def is_launching_process(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether this process is global rank 0 of its run: every rank that a launcher set is 0 (a process started
    without a launcher has none)."""
    return all(environ.get(name, "0").strip() in ("", "0") for name in RANK_VARIABLES)


@contextmanager
def run_lock(folder: str | os.PathLike, flag: str = "--default_root_dir") -> Iterator[None]:
    """Hold the lock of the run folder `folder` while the body runs; raise `FolderInUseError`, naming `flag`, the
    folder and the holder's process, if another run holds it. A missing folder is created, and removed again if the
    run left it empty. The other ranks of a distributed run skip the lock: rank 0 holds it for them."""
    if not is_launching_process():
        logger.debug("not rank 0 of the run: the run lock of %s is rank 0's", folder)
        yield
        return
    if fcntl is None:
        logger.debug("no fcntl on this platform: %s is not locked against a second run", folder)
        yield
        return
    target = Path(folder).absolute()
    created = [part for part in (target, *target.parents) if not part.exists()]  # the deepest first
    target.mkdir(parents=True, exist_ok=True)
    path = target / LOCK_NAME
    fd = _acquire(path, flag, folder)
    try:
        yield
    finally:
        # The name goes first, while the file is still locked: a run that opened the file meanwhile finds, once it
        # gets the lock, that the name no longer points to it, and locks a new file (`_acquire`).
        with suppress(OSError):
            os.unlink(path)
        if fd is not None:
            os.close(fd)
        _remove_if_empty(created)


def _remove_if_empty(folders: list[Path]) -> None:
    """Remove the folders made for a run that wrote nothing into them (one that failed its checks), the deepest
    first."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:  # not empty
            return


def _acquire(path: Path, flag: str, folder: str | os.PathLike) -> int | None:
    """The descriptor of `path`, locked and holding this process's record; None on a file system without locks."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise FolderInUseError(f"{flag} {folder} is in use by {holder}; wait for it to finish, stop it, or choose "
                                   f"another {flag}") from None
        except OSError as error:  # e.g. Lustre mounted without flock: ENOSYS
            os.close(fd)
            logger.warning("%s cannot be locked (%s): a second run in this folder would not be detected",
                           path, error.strerror)
            return None
        if _is_current(fd, path):
            break
        os.close(fd)  # the holder removed the file between our open and lock: lock the new one
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")}
    # Written in place, not through an atomic rename: the lock belongs to this file, not to its name.
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(record).encode(), 0)
    return fd


def _is_current(fd: int, path: Path) -> bool:
    """Whether `fd` is the file that `path` names now."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _holder(fd: int) -> str:
    """The run that holds the lock, as its record in the file says."""
    try:
        record = json.loads(os.pread(fd, 4096, 0))
        return (f"the training run with process {record['pid']} on host {record['host']} "
                f"(started {record['started']})")
    except (ValueError, KeyError, TypeError):  # the holder has not written its record yet
        return "another training run that is just starting"
