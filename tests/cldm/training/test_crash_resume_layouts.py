"""SIGKILL mid-epoch and resume for the other two data sources: the image-folder layout (`metadata.jsonl`) and
shards (`--data_shards`). As in test_crash_resume.py, a run is killed mid-step at step 2 (its last checkpoint is
step 2's, in the middle of the first epoch) and resumed with `--resume_from_checkpoint last`; its final weights and
optimizer state must equal those of an uninterrupted run exactly. For shards the kill is at a shard boundary (shards
of 2 items, batches of 2, no shuffle buffer), where resuming is exact.
"""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cldm.data.shards import make_shards
from ldm.checkpoint import read_checkpoint

from tiny_training import (REPO_ROOT, as_image_folder, differing_tensors, killed_and_resumed, make_data,
                           make_initial_weights, subprocess_env, train_args)

pytestmark = pytest.mark.slow  # training subprocesses

MAX_STEPS, KILLED_AT = 4, 2  # 8 items at batch 2: 4 steps per epoch
COMMON = ("--max_steps", str(MAX_STEPS), "--checkpoint_every_n_steps", "2", "--logger_freq", "1000",
          "--prompt_dropout", "0.5")


def _data(tmp: Path, layout: str) -> tuple[Path, tuple[str, ...]]:
    """The 8-item data of `layout` and the flags that read it (besides its path)."""
    fill50k = make_data(tmp / "fill50k", 8)
    if layout == "image_folder":
        return as_image_folder(fill50k), ("--data_root",)
    make_shards(str(fill50k), tmp / "shards", 2)
    return tmp / "shards", ("--data_shards", "--shuffle_buffer", "1")


@pytest.fixture(scope="module", params=["image_folder", "shards"])
def runs(request, tmp_path_factory) -> dict:
    """An uninterrupted run (in parallel) and a run killed at step `KILLED_AT` and resumed, from the same data."""
    tmp = tmp_path_factory.mktemp(request.param)
    initial = make_initial_weights(tmp / "initial.ckpt")
    data, (data_flag, *data_extra) = _data(tmp, request.param)

    def argv(root: Path) -> list[str]:
        return train_args(initial, data, root, *COMMON, *data_extra, data_flag=data_flag)

    whole = subprocess.Popen([sys.executable, str(REPO_ROOT / "tutorial_train.py"), *argv(tmp / "whole")],
                             cwd=REPO_ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    killed, left, resumed = killed_and_resumed(argv(tmp / "interrupted"), KILLED_AT, tmp / "interrupted")
    whole_output = whole.communicate(timeout=300)[0]
    assert whole.returncode == 0, whole_output[-3000:]
    return dict(killed=killed, left=left, resumed=resumed, root=tmp / "interrupted",
                whole=read_checkpoint(tmp / "whole" / "checkpoints" / "last.ckpt", mmap=False))


def test_killed_mid_epoch_leaves_the_checkpoint_of_step_2(runs) -> None:
    killed = runs["killed"]
    assert killed.returncode == -signal.SIGKILL, (killed.stdout + killed.stderr)[-3000:]
    assert runs["left"] == KILLED_AT


def test_resumed_run_reaches_the_weights_of_an_uninterrupted_run(runs) -> None:
    resumed = runs["resumed"]
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    got = read_checkpoint(runs["root"] / "checkpoints" / "last.ckpt", mmap=False)
    assert got["global_step"] == runs["whole"]["global_step"] == MAX_STEPS
    assert differing_tensors(got, runs["whole"]) == []
