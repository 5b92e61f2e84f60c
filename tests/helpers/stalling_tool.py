"""Run tool_add_control.py with its output stalled just before it is renamed into place, for the crash-safety tests.

    python tests/helpers/stalling_tool.py <tool_add_control.py arguments>

The output is written completely to its temporary file and fsync'd; then the tool prints `stalled <temporary file>`
and waits for a signal instead of renaming it, so that a test can kill it with the temporary file on disk.
"""
from __future__ import annotations

import signal
import sys
from pathlib import Path

import tool_add_control
from cldm.checkpoints import atomic
from cldm.cli import run

_fsync_path = atomic._fsync_path


def _fsync_and_stall(path: Path) -> None:
    _fsync_path(path)
    if path.name.endswith(".tmp"):
        print(f"stalled {path}", flush=True)
        while True:
            signal.pause()


if __name__ == "__main__":
    atomic._fsync_path = _fsync_and_stall
    sys.exit(run(tool_add_control.main))
