"""Crash safety and graceful stops of the training job, with real processes and real signals.

One run of 8 steps is interrupted five times, each time resumed with `--resume_from_checkpoint last`:
SIGKILL mid-step, SIGTERM mid-step, SIGKILL while a checkpoint is half written, Ctrl-C (SIGINT) mid-step and
SIGKILL while image grids are sampled. The final weights must equal those of an uninterrupted run with the same
seed (prompt dropout on: the dropped prompts must match too), and every checkpoint file on disk must load at every
moment in between.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from cldm.checkpoints.atomic import stale_temporary_files
from ldm.checkpoint import read_checkpoint

from tiny_training import (HELPERS, REPO_ROOT, make_data, make_initial_weights, run_python, subprocess_env,
                           train_args)

pytestmark = pytest.mark.slow  # every test shares the set-up of killed and resumed training runs

MAX_STEPS = 8
# 8 items at batch 2: 4 batches per epoch. Checkpoints every 2 steps; grids at batch_idx 0 and 3 (steps 1, 4, 5, 8).
COMMON = ("--max_steps", str(MAX_STEPS), "--checkpoint_every_n_steps", "2", "--logger_freq", "3",
          "--keep_last_k", "10", "--prompt_dropout", "0.5")
# (where, global step, signal): the interruptions, in order; each run resumes from the last.ckpt the previous left.
INTERRUPTIONS = [("step", 2, "KILL"), ("step", 2, "TERM"), ("save", 4, "KILL"), ("step", 4, "INT"),
                 ("log", 8, "KILL")]
TIMEOUT_S = 300


@dataclass
class Interrupted:
    """What one interrupted run left behind."""

    where: str
    signal_name: str
    returncode: int
    output: str
    checkpoints: dict[str, int]  # file name -> global step, for every *.ckpt in checkpoints/
    temporary_files: list[str]


def _loadable_checkpoints(folder: Path) -> dict[str, int]:
    """Global step of every checkpoint file in `folder`; fails if any of them does not load completely."""
    steps = {}
    for path in sorted(folder.glob("*.ckpt")):
        checkpoint = read_checkpoint(path, mmap=False)
        assert all(torch.isfinite(value).all() for value in checkpoint["state_dict"].values()), path
        steps[path.name] = checkpoint["global_step"]
    return steps


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The uninterrupted reference run (in parallel) and the interrupted chain; timings for the report."""
    tmp = tmp_path_factory.mktemp("crash")
    initial = make_initial_weights(tmp / "control_tiny_ini.ckpt")
    data = make_data(tmp / "fill8", 8)
    started = time.perf_counter()
    reference_root = tmp / "reference"
    reference = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "tutorial_train.py"), *train_args(initial, data, reference_root, *COMMON)],
        cwd=REPO_ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    root = tmp / "interrupted"
    checkpoints = root / "checkpoints"
    interrupted = []
    for index, (where, step, signal_name) in enumerate(INTERRUPTIONS):
        resume = ["--resume_from_checkpoint", "last"] if index else []
        argv = [str(HELPERS / "interrupting_train.py"), where, str(step), signal_name, "--",
                *train_args(initial, data, root, *COMMON, *resume)]
        result = run_python(argv)
        interrupted.append(Interrupted(where, signal_name, result.returncode, result.stdout + result.stderr,
                                       _loadable_checkpoints(checkpoints),
                                       [path.name for path in stale_temporary_files(checkpoints)]))
    final = run_python([str(REPO_ROOT / "tutorial_train.py"),
                  *train_args(initial, data, root, *COMMON, "--resume_from_checkpoint", "last")])
    reference_output = reference.communicate(timeout=TIMEOUT_S)[0]
    return dict(reference=(reference.returncode, reference_output, reference_root), final=final, root=root,
                interrupted=interrupted, seconds=time.perf_counter() - started)


def test_sigkill_mid_step_leaves_the_last_checkpoint(runs) -> None:
    run = runs["interrupted"][0]
    assert run.returncode == -signal.SIGKILL, run.output[-3000:]
    assert run.checkpoints == {"last.ckpt": 2, "step-0000002.ckpt": 2}
    assert run.temporary_files == []


@pytest.mark.parametrize("index,stopped_at", [(1, 3), (3, 5)], ids=["SIGTERM", "SIGINT"])
def test_sigterm_and_ctrl_c_save_a_resumable_checkpoint_and_exit_130(runs, index: int, stopped_at: int) -> None:
    run = runs["interrupted"][index]
    assert run.returncode == 130, run.output[-3000:]
    assert f"Stopped early at step {stopped_at}; continue with --resume_from_checkpoint last" in run.output
    assert "Traceback" not in run.output
    # The step under way when the signal came was finished, then saved.
    assert run.checkpoints["last.ckpt"] == stopped_at
    assert run.checkpoints[f"step-{stopped_at:07d}.ckpt"] == stopped_at


def test_sigkill_while_saving_keeps_the_previous_last_checkpoint_intact(runs) -> None:
    run = runs["interrupted"][2]
    assert run.returncode == -signal.SIGKILL, run.output[-3000:]
    assert run.checkpoints["last.ckpt"] == 3  # still the link to step 3: the half-written step 4 never appeared
    assert "step-0000004.ckpt" not in run.checkpoints
    assert len(run.temporary_files) == 1 and run.temporary_files[0].startswith(".step-0000004.ckpt.")
    # The next run removes the partial file of the interrupted save.
    assert runs["interrupted"][3].temporary_files == []
    assert "the temporary file of a write whose process was killed" in runs["interrupted"][3].output


def test_sigkill_during_image_logging(runs) -> None:
    run = runs["interrupted"][4]
    assert run.returncode == -signal.SIGKILL, run.output[-3000:]
    assert run.checkpoints["last.ckpt"] == 6  # step 8 is logged before it is saved
    grids = sorted(path.name for path in (runs["root"] / "image_log" / "train").iterdir())
    assert grids and not any(name.startswith(".") for name in grids), grids  # no partial grid left behind


def test_resumed_run_reaches_the_weights_of_an_uninterrupted_run(runs) -> None:
    code, output, reference_root = runs["reference"]
    assert code == 0, output[-3000:]
    final = runs["final"]
    assert final.returncode == 0, (final.stdout + final.stderr)[-3000:]
    want = read_checkpoint(reference_root / "checkpoints" / "last.ckpt", mmap=False)
    last = runs["root"] / "checkpoints" / "last.ckpt"
    assert last.is_symlink() and last.resolve().name == f"step-{MAX_STEPS:07d}.ckpt"  # a link, not a second copy
    got = read_checkpoint(last, mmap=False)
    assert got["global_step"] == want["global_step"] == MAX_STEPS
    assert got["state_dict"].keys() == want["state_dict"].keys()
    worst = max(float((got["state_dict"][key] - value).abs().max()) for key, value in want["state_dict"].items())
    print(f"\n5 interruptions + 6 runs vs 1 uninterrupted run: max weight difference {worst:.3g} "
          f"({runs['seconds']:.0f} s for all runs)")
    assert worst <= 1e-6, f"max weight difference {worst:.3g}"
    for state in (got, want):  # the optimizer state is the same too: training goes on identically
        assert len(state["optimizer_states"]) == 1
    for key, value in want["optimizer_states"][0]["state"].items():
        for name, tensor in value.items():
            torch.testing.assert_close(got["optimizer_states"][0]["state"][key][name], tensor, rtol=0, atol=1e-6)
