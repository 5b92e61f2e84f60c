"""cldm.cli.run: user errors become one line and exit code 2; --debug shows the traceback; Ctrl-C exits 130."""
from __future__ import annotations

import argparse

import pytest

from cldm.cli import add_debug_argument, run


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
        OSError(28, "No space left on device"),
    ],
)
def test_user_errors_are_one_line(capsys: pytest.CaptureFixture, error: Exception) -> None:
    assert run(_main_raising(error), []) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: {error}\n" and captured.out == ""


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
