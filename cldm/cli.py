"""How every script reports user errors: `error: ...` on stderr and exit code 2; tracebacks only with --debug."""
from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

# Errors that describe a problem with the user's input or environment (files, folders, values), not a bug.
USER_ERRORS = (OSError, ValueError)

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130

# The fix for a system error on a path, by its errno; others get "check the path".
SYSTEM_ERROR_FIXES = {
    errno.EACCES: "check its permissions or choose another path",
    errno.EPERM: "check its permissions or choose another path",
    errno.EROFS: "choose a folder you can write to",
    errno.ENOSPC: "free some space or choose another folder",
    errno.EDQUOT: "free some space or choose another folder",
    errno.ENOTDIR: "check the path: a part of it is a file, not a folder",
    errno.EISDIR: "give a file, not a folder",
    errno.EEXIST: "move it away or choose another path",
}


def add_debug_argument(parser: argparse.ArgumentParser) -> None:
    """The `--debug` flag that `run` looks for."""
    parser.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")


def _exit_code(error: SystemExit) -> int:
    """The integer exit status of a SystemExit (argparse uses 0 for --help and 2 for bad arguments)."""
    if error.code is None or isinstance(error.code, int):
        return error.code or 0
    print(error.code, file=sys.stderr)
    return 1


def describe_error(error: Exception) -> str:
    """The one sentence of a user error: its message, or for a system error (which Python words as
    `[Errno N] <reason>: '<path>'`) the reason, the path and a fix."""
    if not isinstance(error, OSError) or error.errno is None or not error.strerror:
        return str(error)
    paths = " -> ".join(f"'{name}'" for name in (error.filename, error.filename2) if name is not None)
    where = f": {paths}" if paths else ""
    return f"{error.strerror}{where}; {SYSTEM_ERROR_FIXES.get(error.errno, 'check the path')}"


def run(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Call `main(argv)` and turn user errors into `error: <message>` with exit code 2 (130 on Ctrl-C, 143 on
    SIGTERM, both after unwinding, so that no temporary file is left behind)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(message)s")
    try:
        with _sigterm_unwinds():
            return main(args) or 0
    except SystemExit as error:
        return _exit_code(error)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except USER_ERRORS as error:
        if debug:
            raise
        print(f"error: {describe_error(error)}", file=sys.stderr)
        return EXIT_USER_ERROR


# ---------------------------------------------------------------------------------------------
# SIGTERM
# ---------------------------------------------------------------------------------------------

EXIT_TERMINATED = 128 + signal.SIGTERM  # 143, as a shell reports a process that SIGTERM ended


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is so that it unwinds as after Ctrl-C (temporary files are removed)."""


@contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """For the duration, SIGTERM raises `Terminated` in this process, which ends in `terminated` on stderr and exit
    code 143; a second SIGTERM, and SIGTERM in processes forked meanwhile (DataLoader workers), get the previous
    handler."""
    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or previous is None:
        yield  # only the main thread may set handlers; None: a handler not set from Python, which is left alone
        return
    owner = os.getpid()

    def terminate(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, previous)
        if os.getpid() != owner:
            signal.raise_signal(signum)
            return
        raise Terminated

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    except Terminated:
        print("terminated", file=sys.stderr)
        raise SystemExit(EXIT_TERMINATED) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
