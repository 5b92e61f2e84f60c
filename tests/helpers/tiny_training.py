"""Tiny training set-ups for the reliability tests: initial weights, a Fill50K-format data set, arguments."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

import tool_make_fill50k
import tutorial_train
from cldm.model import create_model
from cldm.checkpoints.surgery import add_control
from cldm.checkpoints.random_weights import random_base_state_dict
from ldm.checkpoint import read_checkpoint
from tests.helpers.paths import REPO_ROOT, TINY_CONFIG


HELPERS = Path(__file__).resolve().parent


def make_initial_weights(path: Path, config: Path = TINY_CONFIG) -> Path:
    """What tool_add_control.py makes from a random, non-degenerate tiny "Stable Diffusion" checkpoint."""
    model = create_model(config)
    merged, _ = add_control(model.state_dict(), random_base_state_dict(str(config), seed=0))
    torch.save(merged, path)
    return path


def make_data(folder: Path, count: int) -> Path:
    """A Fill50K-format data set of `count` 64 px pairs."""
    argv = ["--out", str(folder), "--count", str(count), "--size", "64", "--workers", "1", "--quiet"]
    assert tool_make_fill50k.main(argv) == 0
    return folder


def as_image_folder(folder: Path, image: str = "image", conditioning_image: str = "conditioning_image",
                    caption: str = "text") -> Path:
    """The Fill50K-format data set `folder` turned into the image-folder layout: its prompt.json rewritten as a
    metadata.jsonl with these column names (the images stay where they are)."""
    lines = (folder / "prompt.json").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    rows = [{image: record["target"], conditioning_image: record["source"], caption: record["prompt"]}
            for record in records]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    (folder / "prompt.json").unlink()
    return folder


def config_with_model(folder: Path, target: str, **params) -> Path:
    """The tiny config with another (test) model class and extra constructor parameters."""
    config = OmegaConf.load(TINY_CONFIG)
    config.model.target = target
    for name, value in params.items():
        config.model.params[name] = value
    path = folder / f"{target.rpartition('.')[2]}.yaml"
    OmegaConf.save(config, path)
    return path


def train_args(initial: Path, data: Path, root: Path, *extra: str, config: Path = TINY_CONFIG,
               data_flag: str = "--data_root") -> list[str]:
    """tutorial_train.py arguments of a short, seeded CPU run with cheap image logs; `data` is passed with
    `data_flag` (`--data_shards` for shards)."""
    return ["--config", str(config), "--resume_path", str(initial), data_flag, str(data), "--batch_size", "2",
            "--accelerator", "cpu", "--default_root_dir", str(root), "--seed", "3", "--log_ddim_steps", "1",
            "--log_max_images", "1", *extra]


def subprocess_env() -> dict[str, str]:
    """Environment of training subprocesses: the repository and the helpers importable, one thread each
    (the same numerics in every process, and two processes can share two cores)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(HELPERS)]), "OMP_NUM_THREADS": "1"}


def run_python(argv: list[str], timeout_s: float = 300) -> subprocess.CompletedProcess:
    """`python argv` in the repository root with `subprocess_env`, its output captured as text."""
    return subprocess.run([sys.executable, *argv], cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True,
                          timeout=timeout_s)


def killed_and_resumed(train_argv: list[str], step: int,
                       root: Path) -> tuple[subprocess.CompletedProcess, int, subprocess.CompletedProcess]:
    """tutorial_train.py with `train_argv` (its --default_root_dir `root`), SIGKILLed mid-step at global step `step`
    (interrupting_train.py), then resumed with `--resume_from_checkpoint last` in a new process: the killed process,
    the global step of the last.ckpt it left, and the resumed process."""
    killed = run_python([str(HELPERS / "interrupting_train.py"), "step", str(step), "KILL", "--", *train_argv])
    left = read_checkpoint(root / "checkpoints" / "last.ckpt", mmap=False)["global_step"]
    resumed = run_python([str(REPO_ROOT / "tutorial_train.py"), *train_argv, "--resume_from_checkpoint", "last"])
    return killed, left, resumed


def train_in_stops(initial: Path, data: Path, root: Path, stops: list[int], *extra: str) -> dict:
    """Train with `--max_steps` set to each of `stops` in turn, each run resuming the previous one's last.ckpt; the
    last checkpoint."""
    for index, max_steps in enumerate(stops):
        resume = ("--resume_from_checkpoint", "last") if index else ()
        argv = train_args(initial, data, root, "--max_steps", str(max_steps), "--logger_freq", "1000", *resume, *extra)
        assert tutorial_train.main(argv) == 0
    return read_checkpoint(root / "checkpoints" / "last.ckpt", mmap=False)


def differing_tensors(got: dict, want: dict) -> list[str]:
    """The weights and optimizer-state tensors of two training checkpoints that are not exactly equal."""
    weights = [key for key, value in want["state_dict"].items() if not torch.equal(got["state_dict"][key], value)]
    (got_state,), (want_state,) = got["optimizer_states"], want["optimizer_states"]
    moments = [f"optimizer {key}.{name}" for key, state in want_state["state"].items() for name, value in state.items()
               if not torch.equal(got_state["state"][key][name], value)]
    return weights + moments


def recorded_ddp_batches(tmp: Path, *data_flags: str) -> list[dict]:
    """The batches (rank, prompts, size) that two DDP ranks on the CPU train on in one epoch of the tiny config at
    batch 2 (tutorial_train_dist.py, without image logs), from the data of `data_flags`."""
    record = tmp / "batches.jsonl"
    config = config_with_model(tmp, "recording_controlldm.BatchRecordingControlLDM", record_path=str(record))
    argv = ["--config", str(config), "--resume_path", str(make_initial_weights(tmp / "init.ckpt")), *data_flags,
            "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp", "--batch_size", "2", "--max_epochs", "1",
            "--log_max_images", "0", "--seed", "1", "--default_root_dir", str(tmp / "run")]
    done = subprocess.run([sys.executable, str(REPO_ROOT / "tutorial_train_dist.py"), *argv], cwd=REPO_ROOT,
                          env={**subprocess_env(), "CONTROLNET_TRUSTED_MODULES": "recording_controlldm"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in record.read_text().splitlines()]
