"""cldm.cli.run: user errors become one line and exit code 2; --debug shows the traceback; Ctrl-C exits 130, SIGTERM
143, after unwinding."""
from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path

import pytest

from cldm.checkpoints.atomic import atomic_path
from cldm.cli import Terminated, add_debug_argument, run


def _main_raising(error: BaseException):
    def main(argv: list[str]) -> int:
        parser = argparse.ArgumentParser(prog="tool")
        add_debug_argument(parser)
        parser.parse_args(argv)
        raise error

    return main


@pytest.mark.parametrize(
    "error",
    [
        ValueError("input 'a.ckpt' looks like an SD2.x model"),
        FileNotFoundError("config file 'x.yaml' does not exist"),
        FileExistsError("output 'b.ckpt' already exists"),
        PermissionError("output folder 'out' is not writable"),
        IsADirectoryError("checkpoint 'models' is a folder"),
    ],
)
def test_user_errors_are_one_line(capsys: pytest.CaptureFixture, error: Exception) -> None:
    assert run(_main_raising(error), []) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: {error}\n" and captured.out == ""


@pytest.mark.parametrize(
    "error, message",
    [
        (PermissionError(13, "Permission denied", "/data/run"),
         "Permission denied: '/data/run'; check its permissions or choose another path"),
        (OSError(30, "Read-only file system", "/data/run/lightning_logs"),
         "Read-only file system: '/data/run/lightning_logs'; choose a folder you can write to"),
        (NotADirectoryError(20, "Not a directory", "/data/notes.txt/run"),
         "Not a directory: '/data/notes.txt/run'; check the path: a part of it is a file, not a folder"),
        (OSError(28, "No space left on device"), "No space left on device; free some space or choose another folder"),
        (OSError(18, "Invalid cross-device link", "/a", None, "/b"),
         "Invalid cross-device link: '/a' -> '/b'; check the path"),
    ],
)
def test_system_errors_name_the_path_and_a_fix(capsys: pytest.CaptureFixture, error: OSError, message: str) -> None:
    assert "[Errno" in str(error)  # Python's own wording, which the user does not see
    assert run(_main_raising(error), []) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


def test_debug_reraises_with_traceback() -> None:
    with pytest.raises(ValueError, match="bad value"):
        run(_main_raising(ValueError("bad value")), ["--debug"])


def test_bugs_are_not_hidden() -> None:
    with pytest.raises(ZeroDivisionError):
        run(_main_raising(ZeroDivisionError("a bug")), [])


def test_interrupt_and_exit_codes(capsys: pytest.CaptureFixture) -> None:
    assert run(_main_raising(KeyboardInterrupt()), []) == 130
    assert capsys.readouterr().err == "interrupted\n"
    assert run(lambda argv: None, []) == 0
    assert run(lambda argv: 3, []) == 3
    assert run(_main_raising(ValueError("x")), ["--no-such-flag"]) == 2  # argparse usage error
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# SIGTERM unwinds as Ctrl-C does
# ---------------------------------------------------------------------------------------------


def _terminate_self() -> None:
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(60)  # the handler's exception ends the sleep at once
    raise AssertionError("SIGTERM did not stop the tool")


def test_sigterm_removes_the_temporary_file_and_exits_143(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    def main(argv: list[str]) -> int:
        with atomic_path(tmp_path / "model.ckpt") as temp:
            temp.write_bytes(b"half a checkpoint")
            _terminate_self()
        return 0

    before = signal.getsignal(signal.SIGTERM)
    assert run(main, []) == 143
    assert capsys.readouterr().err == "terminated\n"
    assert os.listdir(tmp_path) == [] and signal.getsignal(signal.SIGTERM) == before


def _wait_for(seen: list) -> None:
    deadline = time.monotonic() + 60
    while not seen and time.monotonic() < deadline:
        time.sleep(0.001)


def test_forked_processes_and_a_second_sigterm_get_the_previous_handler() -> None:
    seen: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))

    def main(argv: list[str]) -> int:
        child = os.fork()
        if child == 0:  # a forked worker (a DataLoader's): its SIGTERM goes to the handler from before `run`
            code = 1
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                _wait_for(seen)
                code = 0 if seen == [signal.SIGTERM] else 1
            finally:
                os._exit(code)
        assert os.waitpid(child, 0)[1] == 0 and seen == []
        with pytest.raises(Terminated):
            _terminate_self()
        os.kill(os.getpid(), signal.SIGTERM)  # the second SIGTERM
        _wait_for(seen)
        return 0

    try:
        assert run(main, []) == 0
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert seen == [signal.SIGTERM]
