"""Which process wrote something, recorded so that a later process can tell whether the writer still runs."""
from __future__ import annotations

import os
import re
import socket
import zlib
from dataclasses import dataclass
from pathlib import Path

# `ProcessIdentity.tag`: "<pid>-<start>-<host>".
_TAG = re.compile(r"^(\d+)-(\d+)-([0-9a-f]{8})$")


def _host() -> str:
    """8 hex digits naming this host and its process-id namespace: process ids compare only within one."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:  # not Linux
        namespace = ""
    return f"{zlib.crc32(f'{socket.gethostname()}/{namespace}'.encode()):08x}"


def _start_ticks(pid: int) -> int:
    """When process `pid` started, in clock ticks after boot (Linux); 0 where that cannot be told."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat.rpartition(")")[2].split()[19])  # field 22 of proc(5); the name before ")" may hold spaces


def process_exists(pid: int) -> bool:
    """Whether a process with id `pid` runs on this host (under any user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    except OverflowError:  # beyond the platform's pid range
        return False
    return True


@dataclass(frozen=True)
class ProcessIdentity:
    """A process: its id, its start time (a later process given the same id is another one) and its host."""

    pid: int
    start: int
    host: str

    @classmethod
    def current(cls) -> ProcessIdentity:
        """This process."""
        pid = os.getpid()
        return cls(pid, _start_ticks(pid), _host())

    @classmethod
    def parse(cls, tag: str) -> ProcessIdentity | None:
        """The identity written as `tag`, or None if `tag` is not one."""
        match = _TAG.match(tag)
        return cls(int(match[1]), int(match[2]), match[3]) if match else None

    @property
    def tag(self) -> str:
        """The identity as a short string for file names: "<pid>-<start>-<host>"."""
        return f"{self.pid}-{self.start}-{self.host}"

    def is_running(self) -> bool | None:
        """Whether the process still runs; None on another host, whose processes cannot be asked."""
        if self.host != _host():
            return None
        if not process_exists(self.pid):
            return False
        return self.start == 0 or _start_ticks(self.pid) in (0, self.start)
