"""Where `--resume_from_checkpoint last` finds the newest checkpoint of a run; who handles SIGTERM during fit."""
from __future__ import annotations

import signal
from pathlib import Path

from cldm.training.callbacks import GracefulStop, newest_checkpoint


def _touch(folder: Path, *names: str) -> None:
    for name in names:
        (folder / name).write_bytes(b"checkpoint")


def test_last_ckpt_is_the_newest_whether_a_link_or_a_file(tmp_path):
    _touch(tmp_path, "step-0000002.ckpt", "step-0000004.ckpt")
    (tmp_path / "last.ckpt").symlink_to("step-0000004.ckpt")
    assert newest_checkpoint(tmp_path) == tmp_path / "last.ckpt"

    (tmp_path / "last.ckpt").unlink()
    _touch(tmp_path, "last.ckpt")  # a run that ended before its first scheduled save writes last.ckpt itself
    assert newest_checkpoint(tmp_path) == tmp_path / "last.ckpt"


def test_without_last_ckpt_the_highest_step_wins(tmp_path):
    # A run killed between removing the old link and making the new one; the temporary file of a save that was
    # killed is not a checkpoint.
    _touch(tmp_path, "step-0000998.ckpt", "step-0001000.ckpt", "step-0000999.ckpt", ".step-0001001.ckpt.0badc0de.tmp")
    assert newest_checkpoint(tmp_path) == tmp_path / "step-0001000.ckpt"


def test_a_dangling_link_is_skipped(tmp_path):
    _touch(tmp_path, "step-0000002.ckpt")
    (tmp_path / "last.ckpt").symlink_to("step-0000004.ckpt")  # its target was deleted by hand
    assert newest_checkpoint(tmp_path) == tmp_path / "step-0000002.ckpt"


def test_an_empty_or_missing_folder_has_none(tmp_path):
    assert newest_checkpoint(tmp_path) is None
    assert newest_checkpoint(tmp_path / "missing") is None


def test_graceful_stop_leaves_sigterm_to_lightning_during_fit():
    # Lightning's signal connector, installed after `setup`, calls the SIGTERM handler it finds as well as its own:
    # cldm.cli.run's would end the process mid-step instead of after it, with a checkpoint.
    def callers_handler(signum, frame):
        raise AssertionError("not to be called")

    previous = signal.signal(signal.SIGTERM, callers_handler)
    try:
        stop = GracefulStop()
        stop.setup(None, None, "fit")
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        stop.teardown(None, None, "fit")
        assert signal.getsignal(signal.SIGTERM) is callers_handler
    finally:
        signal.signal(signal.SIGTERM, previous)
