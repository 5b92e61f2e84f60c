"""cldm.training.run_lock: one training run per --default_root_dir, released by the OS when the holder dies."""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cldm.training import run_lock as run_lock_module
from cldm.training.run_lock import LOCK_NAME, FolderInUseError, is_launching_process, run_lock

from tiny_training import REPO_ROOT, make_data, make_initial_weights, subprocess_env, train_args

# A process that holds the lock of argv[2] until it is killed; it loads the module from its file (argv[1]) alone,
# without the training package around it, so that it starts in a fraction of a second.
HOLD = """import importlib.util, sys
spec = importlib.util.spec_from_file_location("run_lock", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
with module.run_lock(sys.argv[2]):
    print("locked", flush=True)
    sys.stdin.read()
"""


def _in_use_message(folder: Path, pid: int) -> str:
    return (f"--default_root_dir {folder} is in use by the training run with process {pid} on host "
            f"{socket.gethostname()} (started ")


def _files(folder: Path) -> dict[Path, tuple[int, int, int, bytes]]:
    """(inode, size, mtime, bytes) of every file under `folder`."""
    return {path: (path.stat().st_ino, path.stat().st_size, path.stat().st_mtime_ns, path.read_bytes())
            for path in folder.rglob("*") if path.is_file()}


def test_a_second_run_is_refused_and_the_lock_goes_with_the_first(tmp_path: Path) -> None:
    folder = tmp_path / "new" / "run"
    with run_lock(folder):  # the folder is created, as Lightning would
        held = _files(folder)
        assert list(held) == [folder / LOCK_NAME]
        with pytest.raises(FolderInUseError) as refused:
            with run_lock(folder):
                pytest.fail("the second run got the lock")
        assert str(refused.value).startswith(_in_use_message(folder, os.getpid()))
        assert str(refused.value).endswith("); wait for it to finish, stop it, or choose another --default_root_dir")
        assert _files(folder) == held  # the refused run wrote nothing
    assert not (tmp_path / "new").exists()  # released, the lock file removed, and the folders made for it too
    with run_lock(folder):
        (folder / "metrics.csv").write_text("step\n")
    assert list(folder.iterdir()) == [folder / "metrics.csv"]


def test_a_killed_holder_does_not_block_the_next_run(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, run_lock_module.__file__, str(tmp_path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(FolderInUseError, match=f"with process {holder.pid} on host"):
            with run_lock(tmp_path):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    assert (tmp_path / LOCK_NAME).exists()  # a SIGKILLed run leaves its file, but not its lock
    with run_lock(tmp_path):
        assert str(os.getpid()) in (tmp_path / LOCK_NAME).read_text()


@pytest.mark.parametrize("environ, launching", [
    ({}, True),
    ({"LOCAL_RANK": "0", "NODE_RANK": "0", "WORLD_SIZE": "2"}, True),  # Lightning's launcher, in rank 0
    ({"LOCAL_RANK": "1", "NODE_RANK": "0"}, False),  # a process that Lightning's DDP launcher started
    ({"NODE_RANK": "1"}, False),  # rank 0 of another node, which starts that node's ranks
    ({"RANK": "0", "LOCAL_RANK": "0", "GROUP_RANK": "0"}, True),  # torchrun
    ({"RANK": "9", "LOCAL_RANK": "1", "GROUP_RANK": "1"}, False),
    ({"SLURM_PROCID": "0"}, True),  # a job step of SLURM
    ({"SLURM_PROCID": "3"}, False),
])
def test_only_global_rank_zero_takes_the_lock(environ: dict[str, str], launching: bool) -> None:
    assert is_launching_process(environ) == launching


def test_the_other_ranks_of_a_run_do_not_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with run_lock(tmp_path):  # held by rank 0
        monkeypatch.setenv("LOCAL_RANK", "1")
        with run_lock(tmp_path):
            pass
    with run_lock(tmp_path / "fresh"):
        assert not (tmp_path / "fresh").exists()


def test_without_fcntl_the_folder_is_not_locked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    monkeypatch.setattr(run_lock_module, "fcntl", None)  # as on Windows
    with caplog.at_level(logging.DEBUG, logger=run_lock_module.__name__), run_lock(tmp_path), run_lock(tmp_path):
        pass
    assert "is not locked against a second run" in caplog.text
    assert list(tmp_path.iterdir()) == []


def test_a_training_process_refuses_a_folder_in_use(tmp_path: Path) -> None:
    """tutorial_train.py, started while this process holds the lock: one sentence, exit 2, nothing written."""
    root = tmp_path / "run"
    (root / "checkpoints").mkdir(parents=True)
    (root / "checkpoints" / "step-0000001.ckpt").write_bytes(b"the first run's checkpoint")
    argv = train_args(make_initial_weights(tmp_path / "init.ckpt"), make_data(tmp_path / "fill", 2), root,
                      "--max_steps", "1")
    with run_lock(root):
        before = _files(root)
        second = subprocess.run([sys.executable, str(REPO_ROOT / "tutorial_train.py"), *argv], cwd=REPO_ROOT,
                                env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        errors = [line for line in second.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and errors[0].startswith("error: " + _in_use_message(root, os.getpid())), errors
        assert "Traceback" not in second.stderr
        assert _files(root) == before
