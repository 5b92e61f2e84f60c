"""One test per row of docs/bad_inputs.md: every user-facing input, given wrong.

Each error row runs the script's `main` through `cldm.cli.run`, as the command line does, and checks: exit code
2, exactly one `error:` line that contains the expected sentence, no traceback, and that no file that existed
before was changed or replaced and nothing new was written (rows that fail inside training may write the run's own
log folder, never a checkpoint). The rows where a doubtful input is accepted have their own tests below.
"""
from __future__ import annotations

import builtins
import importlib.util
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from PIL import Image

import tool_add_control
import tool_add_control_sd21
import tool_cache_latents
import tool_eval_control
import tool_export_diffusers
import tool_extract_control
import tool_make_fill50k
import tool_make_random_sd
import tool_make_shards
import tool_plot_run
import tool_pretrain_tiny_sd
import tool_sample
import tool_transfer_control
import tutorial_train
import tutorial_train_dist
from ldm import checkpoint as checkpoint_io
from ldm.util import instantiate_from_config
from cldm.checkpoints.saving import save_state_dict
from cldm.data.fill50k import MARKER_NAME as FILL50K_MARKER
from cldm.data.latent_cache import MOMENTS_NAME
from cldm.cli import run
from cldm.model import create_model
from cldm.checkpoints.surgery import add_control
from cldm.sampling import prepare_hint
from cldm.training.job import build_callbacks, check_dataset
from cldm.training.resume import run_settings
from cldm.training.run_lock import run_lock
from cldm.training.arguments import SINGLE_DEVICE_DEFAULTS, build_parser
from cldm.data.data_order import ResumableRandomSampler
from cldm.logger import ImageLogger
from cldm.checkpoints.random_weights import random_base_state_dict
from cldm.data.dataset import MyDataset
from cldm.data.shards import make_shards

from run_logs import training_rows, write_log
from tiny_training import (
    HELPERS, TINY_CONFIG, as_image_folder, differing_tensors, make_data, make_initial_weights, subprocess_env,
    train_in_stops,
)
from tests.helpers.paths import REPO_ROOT


CATALOGUE = REPO_ROOT / "docs" / "bad_inputs.md"
TINY = str(TINY_CONFIG)

# Key names that make a state dict look like a given model (see detect_base_model).
_UNET_TO_K = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
_CLIP_NORM = "cond_stage_model.transformer.text_model.final_layer_norm.weight"
SD1 = {_UNET_TO_K: torch.zeros(2, 768), _CLIP_NORM: torch.ones(2)}
SD2 = {_UNET_TO_K: torch.zeros(2, 1024), "cond_stage_model.model.ln_final.weight": torch.ones(2)}
CONTROLNET_SD1 = {**SD1, "control_model.input_hint_block.0.weight": torch.zeros(16, 3, 3, 3)}


class _RunsShellCommand:
    """Unpickling this object would run a shell command that creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


@dataclass
class Inputs:
    """The user's files, made once: checkpoints of every kind (good and broken) and data sets."""

    root: Path
    sd1: Path  # a tiny random "Stable Diffusion 1.x" checkpoint (real layout of the tiny config)
    sd1_keys: Path  # SD1.x key layout only
    sd2_keys: Path
    controlnet: Path
    diffusers: Path
    evil: Path
    marker: Path  # what the evil checkpoint would create
    truncated_ckpt: Path
    truncated_safetensors: Path
    empty: Path
    text: Path
    initial: Path  # tiny initial ControlLDM weights (what tool_add_control.py makes)
    wide_initial: Path  # initial weights of a wider tiny ControlLDM
    data: Path  # a good 64 px Fill50K-format data set of 4 pairs
    hint: Path  # a good hint image


def _truncated(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Inputs:
    root = tmp_path_factory.mktemp("user")
    sd1 = root / "tiny-sd.ckpt"
    save_state_dict(random_base_state_dict(TINY, seed=0), sd1)
    for name, state_dict in {"sd1_keys": SD1, "sd2_keys": SD2, "controlnet": CONTROLNET_SD1}.items():
        save_state_dict(state_dict, root / f"{name}.ckpt")
    (root / "diffusers_model").mkdir()
    (root / "diffusers_model" / "model_index.json").write_text("{}")
    marker = root / "pwned"
    torch.save({"state_dict": SD1, "x": _RunsShellCommand(marker)}, root / "evil.ckpt")
    save_state_dict(SD1, root / "truncated.ckpt")
    save_state_dict(SD1, root / "truncated.safetensors")
    (root / "empty.ckpt").write_bytes(b"")
    (root / "notes.ckpt").write_text("these are not weights\n")
    wide = OmegaConf.load(TINY_CONFIG)
    for branch in ("control_stage_config", "unet_config"):
        wide.model.params[branch].params.model_channels = 64
    OmegaConf.save(wide, root / "wide.yaml")
    hint = root / "edges.png"
    cv2.imwrite(str(hint), np.zeros((64, 64, 3), np.uint8))
    return Inputs(
        root=root, sd1=sd1, sd1_keys=root / "sd1_keys.ckpt", sd2_keys=root / "sd2_keys.ckpt",
        controlnet=root / "controlnet.ckpt", diffusers=root / "diffusers_model", evil=root / "evil.ckpt",
        marker=marker, truncated_ckpt=_truncated(root / "truncated.ckpt"),
        truncated_safetensors=_truncated(root / "truncated.safetensors"), empty=root / "empty.ckpt",
        text=root / "notes.ckpt", initial=make_initial_weights(root / "control_tiny_ini.ckpt"),
        wide_initial=make_initial_weights(root / "control_wide_ini.ckpt", root / "wide.yaml"),
        data=make_data(root / "fill", 4), hint=hint,
    )


@pytest.fixture(scope="module")
def run_checkpoint(inputs: Inputs, tmp_path_factory) -> Path:
    """The last.ckpt of a one-step tiny run on `inputs.data` (batch 2, seed 3, precision 32)."""
    root = tmp_path_factory.mktemp("trained")
    argv = ["--config", TINY, "--resume_path", inputs.initial, "--data_root", inputs.data, "--batch_size", "2",
            "--accelerator", "cpu", "--default_root_dir", root, "--max_steps", "1", "--seed", "3",
            "--log_max_images", "0"]
    assert tutorial_train.main([str(arg) for arg in argv]) == 0
    return root / "checkpoints" / "last.ckpt"


# ---------------------------------------------------------------------------------------------
# The error rows
# ---------------------------------------------------------------------------------------------


@dataclass
class Case:
    """How to give one wrong input, and the sentence that must answer it."""

    main: Callable
    argv: list
    expected: str
    in_training: bool = False  # fails inside `fit`: the run folder may get logs (never checkpoints)
    work_dir: str | None = None  # a folder under the test's folder where the tool keeps finished work (may get files)
    check: Callable[[], None] = field(default=lambda: None)


CASES: dict[str, Callable[[Inputs, Path, pytest.MonkeyPatch], Case]] = {}


def row(row_id: str):
    def register(builder):
        CASES[row_id] = builder
        return builder
    return register


def _add(source, output, *extra) -> list:
    return [source, output, "--config", TINY, *extra]


def _fill_disk(obj, path, *args, **kwargs) -> None:
    Path(path).write_bytes(b"partial")
    raise OSError(28, "No space left on device")


def _nothing_created(inputs: Inputs) -> Callable[[], None]:
    def check() -> None:
        assert not inputs.marker.exists(), "the malicious checkpoint ran code"
    return check


def _no_checkpoints(folder: Path) -> Callable[[], None]:
    def check() -> None:
        assert not folder.exists() or list(folder.iterdir()) == [], list(folder.iterdir())
    return check


# tool_add_control.py / tool_add_control_sd21.py ------------------------------------------------

@row("add-missing-input")
def _(inputs, tmp, monkeypatch):
    return Case(tool_add_control.main, _add(tmp / "v1-5-pruned.ckpt", tmp / "out.ckpt"),
                "input checkpoint '{tmp}/v1-5-pruned.ckpt' does not exist; check the path")


@row("add-input-is-a-folder")
def _(inputs, tmp, monkeypatch):
    return Case(tool_add_control.main, _add(tmp, tmp / "out.ckpt"),
                "is a folder; pass a .ckpt, .pth or .safetensors file")


@row("add-empty-input")
def _(inputs, tmp, monkeypatch):
    return Case(tool_add_control.main, _add(inputs.empty, tmp / "out.ckpt"),
                "is truncated or not a checkpoint (the file is empty); re-download or re-export it")


@row("add-truncated-ckpt")
def _(inputs, tmp, monkeypatch):
    return Case(tool_add_control.main, _add(inputs.truncated_ckpt, tmp / "out.ckpt"),
                f"checkpoint '{inputs.truncated_ckpt}' is truncated or not a checkpoint")


@row("add-truncated-safetensors")
def _(inputs, tmp, monkeypatch):
    return Case(tool_add_control.main, _add(inputs.truncated_safetensors, tmp / "out.ckpt"),
                f"checkpoint '{inputs.truncated_safetensors}' is truncated or not a checkpoint")


@row("add-not-a-checkpoint")
def _(inputs, tmp, monkeypatch):
    return Case(tool_add_control.main, _add(inputs.text, tmp / "out.ckpt"),
                f"checkpoint '{inputs.text}' is truncated or not a checkpoint")


@row("add-unreadable-input")
def _(inputs, tmp, monkeypatch):
    locked = tmp / "locked.ckpt"
    shutil.copy(inputs.sd1_keys, locked)
    locked.chmod(0)

    def open_as_a_normal_user(path, *args, **kwargs):  # root can read anything: answer as for a normal user
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_io, "open", open_as_a_normal_user, raising=False)
    return Case(tool_add_control.main, _add(locked, tmp / "out.ckpt"),
                f"input checkpoint '{locked}' is not readable (permission denied); check its permissions")


@row("add-sd2-to-sd1-tool")
def _(inputs, tmp, monkeypatch):
    return Case(tool_add_control.main, _add(inputs.sd2_keys, tmp / "out.ckpt"),
                "looks like a Stable Diffusion 2.x model; use tool_add_control_sd21.py for it")


@row("add-sd1-to-sd2-tool")
def _(inputs, tmp, monkeypatch):
    return Case(tool_add_control_sd21.main, _add(inputs.sd1_keys, tmp / "out.ckpt"),
                "looks like a Stable Diffusion 1.x model; use tool_add_control.py for it")


@row("add-controlnet-as-base")
def _(inputs, tmp, monkeypatch):
    return Case(tool_add_control.main, _add(inputs.controlnet, tmp / "out.ckpt"),
                "with a ControlNet; pass the plain Stable Diffusion checkpoint the ControlNet should be added to")


@row("add-diffusers-folder")
def _(inputs, tmp, monkeypatch):
    return Case(tool_add_control.main, _add(inputs.diffusers, tmp / "out.ckpt"),
                "is a diffusers folder; pass the original single-file .ckpt or .safetensors checkpoint")


@row("add-malicious-pickle")
def _(inputs, tmp, monkeypatch):
    return Case(tool_add_control.main, _add(inputs.evil, tmp / "out.ckpt"),
                "was refused because it would import 'posix.system', which can run arbitrary code when loaded; if "
                "you trust the file, convert it to .safetensors", check=_nothing_created(inputs))


@row("add-output-exists")
def _(inputs, tmp, monkeypatch):
    existing = inputs.root / "control_sd15_ini.ckpt"
    existing.write_bytes(b"the user's only copy")
    return Case(tool_add_control.main, _add(inputs.sd1, existing),
                f"output '{existing}' already exists; choose another name or delete it first")


@row("add-output-folder-missing")
def _(inputs, tmp, monkeypatch):
    return Case(tool_add_control.main, _add(inputs.sd1, tmp / "models" / "out.ckpt"),
                f"output folder '{tmp}/models' does not exist; create it first")


@row("add-output-folder-read-only")
def _(inputs, tmp, monkeypatch):
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp and access(path, mode))
    return Case(tool_add_control.main, _add(inputs.sd1, tmp / "out.ckpt"),
                f"output folder '{tmp}' is not writable; choose another folder")


@row("add-output-unknown-extension")
def _(inputs, tmp, monkeypatch):
    return Case(tool_add_control.main, _add(inputs.sd1, tmp / "out.bin"),
                "cannot tell the checkpoint format of '{tmp}/out.bin' from its extension '.bin'; use one of "
                ".safetensors, .ckpt, .pth, .pt")


@row("add-missing-config")
def _(inputs, tmp, monkeypatch):
    return Case(tool_add_control.main, [inputs.sd1, tmp / "out.ckpt", "--config", tmp / "cldm_v15.yaml"],
                f"config file '{tmp}/cldm_v15.yaml' does not exist; check the path")


@row("add-disk-full")
def _(inputs, tmp, monkeypatch):
    monkeypatch.setattr(checkpoint_io.torch, "save", _fill_disk)
    return Case(tool_add_control.main, _add(inputs.sd1, tmp / "out.ckpt"),
                f"No space left on device while writing '{tmp}/out.ckpt'; free some space or choose another folder "
                f"(nothing was written)")


# tool_transfer_control.py -----------------------------------------------------------------------

def _transfer(inputs: Inputs, tmp: Path, **paths) -> list:
    chosen = {"sd15": inputs.sd1_keys, "control": inputs.controlnet, "input": inputs.sd1_keys,
              "output": tmp / "out.pth", **paths}
    return [item for name, path in chosen.items() for item in (f"--{name}", path)]


@row("transfer-missing-control")
def _(inputs, tmp, monkeypatch):
    return Case(tool_transfer_control.main, _transfer(inputs, tmp, control=tmp / "control_sd15_openpose.pth"),
                f"--control checkpoint '{tmp}/control_sd15_openpose.pth' does not exist; check the path")


@row("transfer-control-is-not-a-controlnet")
def _(inputs, tmp, monkeypatch):
    return Case(tool_transfer_control.main, _transfer(inputs, tmp, control=inputs.sd1_keys),
                f"--control '{inputs.sd1_keys}' looks like a Stable Diffusion 1.x model; pass a ControlNet for")


@row("transfer-input-other-sd-version")
def _(inputs, tmp, monkeypatch):
    return Case(tool_transfer_control.main, _transfer(inputs, tmp, input=inputs.sd2_keys),
                f"--input '{inputs.sd2_keys}' looks like a Stable Diffusion 2.x model; pass a fine-tune of")


@row("transfer-truncated-input")
def _(inputs, tmp, monkeypatch):
    return Case(tool_transfer_control.main, _transfer(inputs, tmp, input=inputs.truncated_safetensors),
                f"checkpoint '{inputs.truncated_safetensors}' is truncated or not a checkpoint")


@row("transfer-path-given-twice")
def _(inputs, tmp, monkeypatch):
    return Case(tool_transfer_control.main, [inputs.sd1_keys, "--sd15", inputs.sd1_keys],
                "the sd15 path is given both as a positional and as --sd15")


# tool_make_random_sd.py, tool_make_fill50k.py ------------------------------------------------------

@row("random-sd-output-exists")
def _(inputs, tmp, monkeypatch):
    return Case(tool_make_random_sd.main, [inputs.sd1, "--config", TINY],
                f"output '{inputs.sd1}' already exists; choose another name or delete it first")


@row("fill50k-output-exists")
def _(inputs, tmp, monkeypatch):
    return Case(tool_make_fill50k.main, ["--out", inputs.data, "--count", "2", "--size", "64", "--quiet"],
                f"output folder '{inputs.data}' already exists; choose another name or pass --force")


@row("fill50k-size-not-multiple-of-8")
def _(inputs, tmp, monkeypatch):
    return Case(tool_make_fill50k.main, ["--out", tmp / "fill", "--count", "2", "--size", "100", "--quiet"],
                "size must be a multiple of 8 and at least 64, got 100.")


@row("fill50k-output-parent-missing")
def _(inputs, tmp, monkeypatch):
    return Case(tool_make_fill50k.main, ["--out", tmp / "training" / "fill50k", "--count", "2", "--quiet"],
                f"output folder '{tmp}/training' does not exist; create it first")


@row("fill50k-count-zero")
def _(inputs, tmp, monkeypatch):
    return Case(tool_make_fill50k.main, ["--out", tmp / "fill", "--count", "0", "--quiet"],
                "count must be at least 1, got 0.")


@row("fill50k-force-other-folder")
def _(inputs, tmp, monkeypatch):
    out = tmp / "project"
    (out / "cldm" / "data").mkdir(parents=True)
    (out / "cldm" / "data" / "fill50k.py").write_text("the user's code")
    return Case(tool_make_fill50k.main, ["--out", out, "--count", "2", "--size", "64", "--force", "--quiet"],
                f"output folder '{out}' is not empty and holds no {FILL50K_MARKER}; it is not a data set made by "
                "tool_make_fill50k.py, so it is not replaced even with --force")


@row("fill50k-force-unzipped-data-set")
def _(inputs, tmp, monkeypatch):
    out = shutil.copytree(inputs.data, tmp / "fill50k")
    (out / FILL50K_MARKER).unlink()  # training/fill50k.zip has none
    return Case(tool_make_fill50k.main, ["--out", out, "--count", "2", "--size", "64", "--force", "--quiet"],
                f"output folder '{out}' holds a data set that tool_make_fill50k.py did not make (it has no "
                f"{FILL50K_MARKER}; the unzipped fill50k.zip, say), so it is not replaced even with --force; delete it "
                "by hand or choose another --out")


# tutorial_train.py (tutorial_train_sd21.py and tutorial_train_dist.py share its code) -------------

def _train(inputs: Inputs, tmp: Path, *extra, data: Path | None = None, initial: Path | None = None) -> list:
    return ["--config", TINY, "--resume_path", initial or inputs.initial, "--data_root", data or inputs.data,
            "--batch_size", "2", "--accelerator", "cpu", "--default_root_dir", tmp / "run", "--max_steps", "1",
            "--log_max_images", "0", *extra]


def _png(path: Path, size: int | tuple[int, int] = 64, data: bytes | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if data is not None:
        path.write_bytes(data)
        return
    height, width = (size, size) if isinstance(size, int) else size
    assert cv2.imwrite(str(path), np.full((height, width, 3), 128, np.uint8))


def _dataset(root: Path, count: int = 2, lines: list[str] | None = None,
             sizes: dict[str, int | tuple[int, int]] | None = None, skip: tuple[str, ...] = ()) -> Path:
    """`count` pairs of 64 px gray images, with other sizes, missing files or other prompt.json lines."""
    root.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        for kind in ("source", "target"):
            name = f"{kind}/{index}.png"
            if name not in skip:
                _png(root / name, (sizes or {}).get(name, 64))
    if lines is None:
        lines = [json.dumps({"source": f"source/{i}.png", "target": f"target/{i}.png", "prompt": f"circle {i}"})
                 for i in range(count)]
    (root / "prompt.json").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return root


@row("train-missing-config")
def _(inputs, tmp, monkeypatch):
    return Case(tutorial_train.main, _train(inputs, tmp, "--config", tmp / "cldm_v15.yaml"),
                f"--config: {tmp}/cldm_v15.yaml does not exist")


@row("train-config-not-yaml")
def _(inputs, tmp, monkeypatch):
    config = tmp / "broken.yaml"
    config.write_text("model:\n  target: cldm.cldm.ControlLDM\n  params: [unclosed\n")
    return Case(tutorial_train.main, _train(inputs, tmp, "--config", config),
                f"config file '{config}' is not valid YAML (")


@row("train-missing-initial-weights")
def _(inputs, tmp, monkeypatch):
    return Case(tutorial_train.main, _train(inputs, tmp, initial=tmp / "control_sd15_ini.ckpt"),
                f"--resume_path: {tmp}/control_sd15_ini.ckpt does not exist; make it with `python tool_add_control.py")


@row("train-initial-weights-without-controlnet")
def _(inputs, tmp, monkeypatch):
    return Case(tutorial_train.main, _train(inputs, tmp, initial=inputs.sd1),
                f"--resume_path {inputs.sd1} is a Stable Diffusion 1.x model without a ControlNet; make the initial "
                f"weights with `python tool_add_control.py {inputs.sd1} <output.ckpt>` and pass those")


@row("train-initial-weights-wrong-architecture")
def _(inputs, tmp, monkeypatch):
    return Case(tutorial_train.main, _train(inputs, tmp, initial=inputs.wide_initial),
                f"checkpoint '{inputs.wide_initial}' does not fit config '{TINY}': ")


@row("train-initial-weights-truncated")
def _(inputs, tmp, monkeypatch):
    return Case(tutorial_train.main, _train(inputs, tmp, initial=inputs.truncated_ckpt),
                f"checkpoint '{inputs.truncated_ckpt}' is truncated or not a checkpoint")


@row("train-initial-weights-malicious")
def _(inputs, tmp, monkeypatch):
    return Case(tutorial_train.main, _train(inputs, tmp, initial=inputs.evil),
                "was refused because it would import 'posix.system'", check=_nothing_created(inputs))


@row("train-data-folder-missing")
def _(inputs, tmp, monkeypatch):
    return Case(tutorial_train.main, _train(inputs, tmp, data=tmp / "fill50k"),
                f"Data set folder {tmp}/fill50k does not exist; make it with tool_make_fill50k.py")


@row("train-prompt-json-missing")
def _(inputs, tmp, monkeypatch):
    (tmp / "data").mkdir()
    return Case(tutorial_train.main, _train(inputs, tmp, data=tmp / "data"),
                f"{tmp}/data/prompt.json does not exist; the data set folder must hold a prompt.json (Fill50K "
                f"layout) or a metadata.jsonl (image-folder layout).")


@row("train-prompt-json-malformed-line")
def _(inputs, tmp, monkeypatch):
    good = json.dumps({"source": "source/0.png", "target": "target/0.png", "prompt": "red circle"})
    data = _dataset(tmp / "data", 1, lines=[good, good, '{"source": "source/0.png", "target": '])
    return Case(tutorial_train.main, _train(inputs, tmp, data=data),
                f"Line 3 of {data}/prompt.json is not valid JSON (")


@row("train-prompt-json-missing-key")
def _(inputs, tmp, monkeypatch):
    good = json.dumps({"source": "source/0.png", "target": "target/0.png", "prompt": "red circle"})
    data = _dataset(tmp / "data", 1, lines=[good, json.dumps({"source": "source/0.png", "target": "target/0.png"})])
    return Case(tutorial_train.main, _train(inputs, tmp, data=data),
                f"Line 2 of {data}/prompt.json lacks the text key 'prompt'.")


@row("train-prompt-json-not-utf8")
def _(inputs, tmp, monkeypatch):
    data = _dataset(tmp / "data", 2)
    record = '{"source": "source/1.png", "target": "target/1.png", "prompt": "caf\xe9 circle"}\n'
    with open(data / "prompt.json", "ab") as file:
        file.write(record.encode("latin-1"))
    return Case(tutorial_train.main, _train(inputs, tmp, data=data),
                f"Line 3 of {data}/prompt.json is not UTF-8 text; save the file as UTF-8.")


@row("train-empty-dataset")
def _(inputs, tmp, monkeypatch):
    data = _dataset(tmp / "data", 0, lines=[])
    return Case(tutorial_train.main, _train(inputs, tmp, data=data), f"{data}/prompt.json lists no items")


@row("train-image-missing")
def _(inputs, tmp, monkeypatch):
    data = _dataset(tmp / "data", 3, skip=("target/2.png",))
    return Case(tutorial_train.main, _train(inputs, tmp, data=data),
                f"1 of the 6 images listed in {data}/prompt.json do not exist (the first is "
                f"{data}/target/2.png); restore them or remove their lines")


def _huge_png(path: Path, size: tuple[int, int] = (12000, 12000)) -> Path:
    """A PNG whose header gives `size` (width, height): 1-bit black, a few KB on disk, gigabytes decoded."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("1", size).save(path)
    return path


OUTSIDE = "which is outside the data set folder; give a path inside it (relative, with no '..' or symlink leading out)."


@row("train-image-path-absolute")
def _(inputs, tmp, monkeypatch):
    elsewhere = tmp / "elsewhere" / "0.png"
    _png(elsewhere)
    lines = [json.dumps({"source": "source/0.png", "target": "target/0.png", "prompt": "circle"}),
             json.dumps({"source": "source/1.png", "target": str(elsewhere), "prompt": "circle"})]
    data = _dataset(tmp / "data", 2, lines=lines)
    return Case(tutorial_train.main, _train(inputs, tmp, data=data),
                f"Line 2 of {data}/prompt.json gives the target image '{elsewhere}', {OUTSIDE}")


@row("train-image-path-leaves-folder")
def _(inputs, tmp, monkeypatch):
    _png(tmp / "x.png")
    lines = [json.dumps({"source": "source/../source/0.png", "target": "target/0.png", "prompt": "circle"}),
             json.dumps({"source": "../../x.png", "target": "target/1.png", "prompt": "circle"})]
    data = _dataset(tmp / "users" / "data", 2, lines=lines)
    return Case(tutorial_train.main, _train(inputs, tmp, data=data),
                f"Line 2 of {data}/prompt.json gives the source image '../../x.png', {OUTSIDE}")


@row("train-image-symlink-leaves-folder")
def _(inputs, tmp, monkeypatch):
    data = _dataset(tmp / "data", 2)
    _png(tmp / "secret.png")
    (data / "source" / "0.png").unlink()
    (data / "source" / "0.png").symlink_to(data / "target" / "0.png")  # inside the folder: accepted
    (data / "target" / "1.png").unlink()
    (data / "target" / "1.png").symlink_to(tmp / "secret.png")
    return Case(tutorial_train.main, _train(inputs, tmp, data=data),
                f"Line 2 of {data}/prompt.json gives the target image 'target/1.png', {OUTSIDE}")


@row("train-image-too-many-pixels")
def _(inputs, tmp, monkeypatch):
    data = _dataset(tmp / "data", 2)
    _huge_png(data / "source" / "0.png")
    return Case(tutorial_train.main, _train(inputs, tmp, "--resolution", "64", data=data),
                f"Image {data}/source/0.png is 12000x12000 px, more than the 67108864 pixels allowed; shrink it, or "
                f"raise the limit with --max_image_pixels.")


@row("train-max-image-pixels-out-of-range")
def _(inputs, tmp, monkeypatch):
    return Case(tutorial_train.main, _train(inputs, tmp, "--max_image_pixels", "0"),
                "--max_image_pixels must be between 1 and 178956970 (the largest image Pillow opens), got 0")


@row("train-image-corrupt")
def _(inputs, tmp, monkeypatch):
    data = _dataset(tmp / "data", 2)
    _png(data / "source" / "0.png", data=b"\x89PNG\r\n\x1a\n truncated")
    return Case(tutorial_train.main, _train(inputs, tmp, data=data),
                f"Image {data}/source/0.png could not be read; it is not an image file OpenCV can decode.")


@row("train-image-corrupt-mid-run-in-a-worker")
def _(inputs, tmp, monkeypatch):
    data = _dataset(tmp / "data", 2)
    _png(data / "target" / "1.png", data=b"GIF89a not really")
    return Case(tutorial_train.main, _train(inputs, tmp, "--num_workers", "1", data=data),
                f"Image {data}/target/1.png could not be read; it is not an image file OpenCV can decode.",
                in_training=True, check=_no_checkpoints(tmp / "run" / "checkpoints"))


@row("train-source-target-aspect-differs")
def _(inputs, tmp, monkeypatch):
    data = _dataset(tmp / "data", 2, sizes={"target/0.png": (64, 128)})
    return Case(tutorial_train.main, _train(inputs, tmp, data=data),
                "Source source/0.png is 64x64 px but target target/0.png is 128x64 px; they must have the same aspect "
                "ratio (within 1 px), so that one crop fits both.")


@row("train-image-size-not-multiple-of-64")
def _(inputs, tmp, monkeypatch):
    data = _dataset(tmp / "data", 2, sizes={"source/0.png": (96, 80), "target/0.png": (96, 80)})
    return Case(tutorial_train.main, _train(inputs, tmp, data=data),
                f"the images in {data} are 80x96 px but the model needs sides that are multiples of 64; pass "
                f"--resolution 512 (or another multiple of 64) to resize them")


@row("train-image-sizes-differ-between-items")
def _(inputs, tmp, monkeypatch):
    data = _dataset(tmp / "data", 2, sizes={"source/1.png": 128, "target/1.png": 128})
    return Case(tutorial_train.main, _train(inputs, tmp, data=data),
                "one batch mixes images of different sizes (64x64, 128x128 px); pass --resolution 512 (or another "
                "multiple of 64) to resize them all",
                in_training=True, check=_no_checkpoints(tmp / "run" / "checkpoints"))


@row("train-resolution-not-multiple-of-64")
def _(inputs, tmp, monkeypatch):
    return Case(tutorial_train.main, _train(inputs, tmp, "--resolution", "100"),
                "--resolution must be a positive multiple of 64, got 100")


@row("train-batch-larger-than-dataset")
def _(inputs, tmp, monkeypatch):
    return Case(tutorial_train.main, _train(inputs, tmp, "--batch_size", "8"),
                f"--batch_size 8 is larger than the 4 samples in {inputs.data}; use a smaller batch size")


@row("train-batch-size-zero")
def _(inputs, tmp, monkeypatch):
    return Case(tutorial_train.main, _train(inputs, tmp, "--batch_size", "0"),
                "--batch_size must be a positive number, got 0")


@row("train-batch-size-max-on-cpu")
def _(inputs, tmp, monkeypatch):
    return Case(tutorial_train.main, _train(inputs, tmp, "--batch_size", "max"),
                "--batch_size max measures a GPU's memory and this run trains on the CPU; pass a number")


@row("train-unknown-precision")
def _(inputs, tmp, monkeypatch):
    return Case(tutorial_train.main, _train(inputs, tmp, "--precision", "fp8"),
                "--precision 'fp8' is not one of 32, bf16-mixed, 16-mixed")


@row("train-16-mixed-on-cpu")
def _(inputs, tmp, monkeypatch):
    return Case(tutorial_train.main, _train(inputs, tmp, "--precision", "16-mixed"),
                "--precision 16-mixed needs a GPU; use bf16-mixed or 32 on the CPU")


@row("train-unknown-strategy")
def _(inputs, tmp, monkeypatch):
    return Case(tutorial_train.main, _train(inputs, tmp, "--strategy", "horovod"),
                "--strategy 'horovod' is not one of auto, ddp, ")


@row("train-strategy-package-missing")
def _(inputs, tmp, monkeypatch):
    find_spec = importlib.util.find_spec  # as if deepspeed were not installed (it may be)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "deepspeed"
                        else find_spec(name, *args))
    return Case(tutorial_train.main, _train(inputs, tmp, "--strategy", "deepspeed_stage_2"),
                "--strategy deepspeed_stage_2 needs the 'deepspeed' package: pip install deepspeed")


@row("train-unknown-accelerator")
def _(inputs, tmp, monkeypatch):
    return Case(tutorial_train.main, _train(inputs, tmp, "--accelerator", "tpu"),
                "--accelerator 'tpu' is not one of auto, gpu, cuda, cpu")


@row("train-gpu-without-gpu")
def _(inputs, tmp, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return Case(tutorial_train.main, _train(inputs, tmp, "--accelerator", "gpu"),
                "--accelerator gpu needs a CUDA GPU and none is visible; use --accelerator cpu")


@row("train-frozen-dtype-without-mixed-precision")
def _(inputs, tmp, monkeypatch):
    return Case(tutorial_train.main, _train(inputs, tmp, "--frozen_dtype", "bfloat16", "--precision", "32"),
                "--frozen_dtype bfloat16 needs --precision bf16-mixed or 16-mixed")


@row("train-optimizer-in-backward-with-accumulation")
def _(inputs, tmp, monkeypatch):
    return Case(tutorial_train.main,
                _train(inputs, tmp, "--optimizer_in_backward", "--accumulate_grad_batches", "2"),
                "--optimizer_in_backward updates each parameter during backward, which cannot be combined with "
                "--accumulate_grad_batches > 1")


@row("train-optimizer-in-backward-on-several-devices")
def _(inputs, tmp, monkeypatch):
    return Case(tutorial_train.main, _train(inputs, tmp, "--optimizer_in_backward", "--devices", "2"),
                "cannot be combined with more than one device or node")


@row("train-devices-more-than-gpus")
def _(inputs, tmp, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    return Case(tutorial_train.main, _train(inputs, tmp, "--accelerator", "gpu", "--devices", "2"),
                "--devices 2 asks for more GPUs than the 1 visible")


@row("train-dist-defaults-without-gpu")
def _(inputs, tmp, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = _train(inputs, tmp)
    argv[argv.index("--accelerator") + 1] = "auto"
    return Case(tutorial_train_dist.main, argv,
                "--devices 8: no GPU is visible, so this would start 8 CPU processes; pass --accelerator cpu to do "
                "that on purpose, or --devices 1")


@row("train-resume-missing")
def _(inputs, tmp, monkeypatch):
    return Case(tutorial_train.main, _train(inputs, tmp, "--resume_from_checkpoint", tmp / "last.ckpt"),
                f"--resume_from_checkpoint: {tmp}/last.ckpt does not exist (check the path)")


@row("train-resume-last-without-a-run")
def _(inputs, tmp, monkeypatch):
    return Case(tutorial_train.main, _train(inputs, tmp, "--resume_from_checkpoint", "last"),
                f"--resume_from_checkpoint: {tmp}/run/checkpoints/last.ckpt does not exist (no checkpoint in "
                f"{tmp}/run/checkpoints yet; start without --resume_from_checkpoint)")


@row("train-resume-truncated")
def _(inputs, tmp, monkeypatch):
    return Case(tutorial_train.main, _train(inputs, tmp, "--resume_from_checkpoint", inputs.truncated_ckpt),
                f"--resume_from_checkpoint: checkpoint '{inputs.truncated_ckpt}' is truncated or not a checkpoint")


@row("train-resume-from-initial-weights")
def _(inputs, tmp, monkeypatch):
    return Case(tutorial_train.main, _train(inputs, tmp, "--resume_from_checkpoint", inputs.initial),
                f"--resume_from_checkpoint: {inputs.initial} is not a training checkpoint (it has no state_dict, "
                f"global_step, loops, optimizer_states); to start a new run from its weights pass it as --resume_path")


@row("train-resume-malicious")
def _(inputs, tmp, monkeypatch):
    return Case(tutorial_train.main, _train(inputs, tmp, "--resume_from_checkpoint", inputs.evil),
                f"--resume_from_checkpoint: checkpoint '{inputs.evil}' was refused because it would import "
                f"'posix.system'", check=_nothing_created(inputs))


@row("train-new-run-over-earlier-checkpoints")
def _(inputs, tmp, monkeypatch):
    earlier = tmp / "run" / "checkpoints" / "step-0000300.ckpt"
    earlier.parent.mkdir(parents=True)
    earlier.write_bytes(b"an earlier run's weights")
    def unchanged() -> None:
        assert earlier.read_bytes() == b"an earlier run's weights"
    return Case(tutorial_train.main, _train(inputs, tmp),
                f"--default_root_dir {tmp / 'run'} holds the checkpoints of an earlier run (the newest is {earlier}), "
                "which a new run would replace; continue that run with --resume_from_checkpoint last, or choose "
                "another --default_root_dir", check=unchanged)


@row("train-resume-other-config")
def _(inputs, tmp, monkeypatch):
    checkpoint = tmp / "tiny_run.ckpt"
    torch.save({"state_dict": create_model(TINY).state_dict(), "global_step": 1, "loops": {}, "optimizer_states": []},
               checkpoint)
    wide = inputs.root / "wide.yaml"
    return Case(tutorial_train.main, _train(inputs, tmp, "--resume_from_checkpoint", checkpoint, "--config", wide),
                f"--resume_from_checkpoint: checkpoint '{checkpoint}' does not fit config '{wide}': ")


@row("train-resume-other-buckets")
def _(inputs, tmp, monkeypatch):
    checkpoint = tmp / "run_without_buckets.ckpt"
    settings = {"batch_size": 2, "seed": None, "precision": "32-true", "learning_rate": 1e-5, "sd_locked": True,
                "resize": "crop", "crop": "center", "buckets": False, "items": 4, "prompt_json_sha256": ""}
    torch.save({"state_dict": {}, "global_step": 1, "loops": {}, "optimizer_states": [],
                "callbacks": {"RunSettings": settings}}, checkpoint)
    argv = _train(inputs, tmp, "--resume_from_checkpoint", checkpoint, "--buckets", "--resolution", "64")
    return Case(tutorial_train.main, argv,
                f"--buckets: the run in {checkpoint} trained without --buckets, and its position in the data order "
                f"counts samples, which this run cannot continue from; resume without --buckets, or start a new run "
                f"from its weights with --resume_path {checkpoint}")


@row("train-resume-other-sd-locked")
def _(inputs, tmp, monkeypatch):
    checkpoint = tmp / "locked_run.ckpt"
    settings = {"batch_size": 2, "seed": None, "precision": "32-true", "learning_rate": 1e-5, "sd_locked": True,
                "items": 4, "prompt_json_sha256": ""}
    torch.save({"state_dict": {}, "global_step": 1, "loops": {}, "optimizer_states": [],
                "callbacks": {"RunSettings": settings}}, checkpoint)
    return Case(tutorial_train.main, _train(inputs, tmp, "--resume_from_checkpoint", checkpoint, "--no-sd_locked"),
                f"--no-sd_locked trains other weights than the run in {checkpoint}, which trained with --sd_locked, so "
                f"its optimizer state does not fit; resume with --sd_locked, or start a new run from its weights with "
                f"--resume_path {checkpoint}")


@row("train-disk-full-while-saving")
def _(inputs, tmp, monkeypatch):
    monkeypatch.setattr(checkpoint_io.torch, "save", _fill_disk)
    checkpoints = tmp / "run" / "checkpoints"
    return Case(tutorial_train.main, _train(inputs, tmp, "--checkpoint_every_n_steps", "1"),
                f"No space left on device while writing '{checkpoints}/step-0000001.ckpt'; free some space or "
                f"choose another folder (nothing was written)", in_training=True, check=_no_checkpoints(checkpoints))


@row("train-root-dir-in-use")
def _(inputs, tmp, monkeypatch):
    root = tmp / "run"
    (root / "checkpoints").mkdir(parents=True)
    (root / "checkpoints" / "step-0000001.ckpt").write_bytes(b"the first run's checkpoint")

    def while_another_run_holds_the_folder(argv: list[str]) -> int:
        with run_lock(root):
            return tutorial_train.main(argv)
    return Case(while_another_run_holds_the_folder, _train(inputs, tmp),
                f"--default_root_dir {root} is in use by the training run with process {os.getpid()} on host "
                f"{socket.gethostname()} (started ")


@row("train-root-dir-is-a-file")
def _(inputs, tmp, monkeypatch):
    (tmp / "run").write_text("notes")
    return Case(tutorial_train.main, _train(inputs, tmp), f"--default_root_dir {tmp}/run is a file; choose a folder")


@row("train-root-dir-read-only")
def _(inputs, tmp, monkeypatch):
    (tmp / "run").mkdir()
    access = os.access  # root may write anywhere: answer as for a normal user
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp / "run" and access(path, mode))
    return Case(tutorial_train.main, _train(inputs, tmp),
                f"--default_root_dir {tmp}/run is not writable (permission denied); choose a folder you can write to")


@row("train-data-root-is-a-file")
def _(inputs, tmp, monkeypatch):
    (tmp / "fill50k.zip").write_bytes(b"PK")
    return Case(tutorial_train.main, _train(inputs, tmp, data=tmp / "fill50k.zip"),
                f"Data set folder {tmp}/fill50k.zip is a file; pass the folder that holds prompt.json, source/ and "
                f"target/.")


@row("train-system-error-in-set-up")
def _(inputs, tmp, monkeypatch):
    (tmp / "run").mkdir()
    (tmp / "run" / "lightning_logs").write_text("notes")
    return Case(tutorial_train.main, _train(inputs, tmp),
                f"File exists: '{tmp}/run/lightning_logs'; move it away or choose another path")


# tool_sample.py, tool_extract_control.py, tool_export_diffusers.py -------------------------------

def _sample(inputs: Inputs, tmp: Path, *extra) -> list:
    return ["--config", TINY, "--ckpt", inputs.initial, "--hint", inputs.hint, "--out", tmp / "bird.png",
            "--ddim_steps", "1", "--device", "cpu", *extra]


@row("sample-missing-hint")
def _(inputs, tmp, monkeypatch):
    return Case(tool_sample.main, _sample(inputs, tmp, "--hint", tmp / "edges.png"),
                f"hint image '{tmp}/edges.png' does not exist; check the path")


@row("sample-hint-not-an-image")
def _(inputs, tmp, monkeypatch):
    return Case(tool_sample.main, _sample(inputs, tmp, "--hint", inputs.text),
                f"hint image '{inputs.text}' cannot be read as an image; pass a PNG, JPEG or other common format")


@row("sample-hint-empty")
def _(inputs, tmp, monkeypatch):
    return Case(tool_sample.main, _sample(inputs, tmp, "--hint", inputs.empty),
                f"hint image '{inputs.empty}' cannot be read as an image; pass a PNG, JPEG or other common format")


@row("sample-hint-too-many-pixels")
def _(inputs, tmp, monkeypatch):
    hint = _huge_png(tmp / "huge.png")
    return Case(tool_sample.main, _sample(inputs, tmp, "--hint", hint),
                f"hint image '{hint}' is 12000x12000 px, more than the 67108864 pixels allowed; shrink it, or raise "
                f"the limit with --max_image_pixels")


@row("sample-hint-extreme-aspect-ratio")
def _(inputs, tmp, monkeypatch):
    hint = tmp / "thin.png"
    Image.new("L", (1, 5000)).save(hint)
    return Case(tool_sample.main, _sample(inputs, tmp, "--hint", hint),
                f"hint image '{hint}' is 1x5000 px, one side more than 4 times the other; crop or pad it to an "
                f"aspect ratio of at most 4:1")


@row("sample-output-exists")
def _(inputs, tmp, monkeypatch):
    existing = inputs.root / "bird.png"
    existing.write_bytes(b"last week's result")
    return Case(tool_sample.main, _sample(inputs, tmp, "--out", existing),
                f"output '{existing}' already exists; choose another name or delete it first")


@row("sample-missing-checkpoint")
def _(inputs, tmp, monkeypatch):
    return Case(tool_sample.main, _sample(inputs, tmp, "--ckpt", tmp / "control_sd15_canny.pth"),
                f"'{tmp}/control_sd15_canny.pth' does not exist; check the path")


@row("extract-input-without-controlnet")
def _(inputs, tmp, monkeypatch):
    return Case(tool_extract_control.main, [inputs.sd1_keys, tmp / "control.safetensors"],
                "the checkpoint has no 'control_model.*' weights; it looks like a Stable Diffusion 1.x model")


@row("extract-output-exists")
def _(inputs, tmp, monkeypatch):
    existing = inputs.root / "control.safetensors"
    existing.write_bytes(b"extracted yesterday")
    return Case(tool_extract_control.main, [inputs.initial, existing],
                f"output '{existing}' already exists; choose another name or delete it first")


@row("export-output-exists")
def _(inputs, tmp, monkeypatch):
    existing = inputs.root / "controlnet-diffusers"
    existing.mkdir(exist_ok=True)
    return Case(tool_export_diffusers.main, [inputs.initial, existing, "--config", TINY],
                f"output folder '{existing}' already exists; choose another name or pass --overwrite")


@row("export-overwrite-other-folder")
def _(inputs, tmp, monkeypatch):
    folder = tmp / "documents"
    folder.mkdir()
    (folder / "notes.txt").write_text("the user's notes")
    return Case(tool_export_diffusers.main, [inputs.initial, folder, "--config", TINY, "--overwrite"],
                f"output folder '{folder}' is not empty and holds no config.json; it is not a ControlNet model folder, "
                "so it is not replaced even with --overwrite")


@row("export-overwrite-foreign-config")
def _(inputs, tmp, monkeypatch):
    folder = tmp / "project"
    folder.mkdir()
    (folder / "config.json").write_text('{"learning_rate": 1e-5}')
    return Case(tool_export_diffusers.main, [inputs.initial, folder, "--config", TINY, "--overwrite"],
                f"output folder '{folder}' holds a config.json that is not a ControlNet model folder's, so it is not "
                "replaced even with --overwrite")


@row("export-input-is-a-diffusers-folder")
def _(inputs, tmp, monkeypatch):
    return Case(tool_export_diffusers.main, [inputs.diffusers, tmp / "exported", "--config", TINY],
                "is a diffusers folder; pass the original single-file .ckpt or .safetensors checkpoint")


def _cache(inputs: Inputs, data: Path, *extra) -> list:
    return ["--config", TINY, "--resume_path", inputs.initial, "--data_root", data, "--device", "cpu", *extra]


def _cached_data(inputs: Inputs, tmp: Path) -> Path:
    """A copy of the data set (file times kept) with a latent cache in <data>/latent_cache."""
    data = Path(shutil.copytree(inputs.data, tmp / "data"))
    assert tool_cache_latents.main([str(arg) for arg in _cache(inputs, data)]) == 0
    return data


REMAKE = ("rerun tool_cache_latents.py --overwrite with this run's --config, --resume_path, --data_root, --resolution "
          "and --resize")


@row("cache-output-exists")
def _(inputs, tmp, monkeypatch):
    data = _cached_data(inputs, tmp)
    return Case(tool_cache_latents.main, _cache(inputs, data),
                f"output folder '{data}/latent_cache' already exists; choose another name or pass --overwrite")


@row("cache-overwrite-other-folder")
def _(inputs, tmp, monkeypatch):
    photos = tmp / "photos"
    _png(photos / "holiday.png")
    return Case(tool_cache_latents.main, _cache(inputs, inputs.data, "--out", photos, "--overwrite"),
                f"output folder '{photos}' is not empty and holds no manifest.json; it is not a latent cache, so it is "
                f"not replaced even with --overwrite")


@row("cache-overwrite-foreign-manifest")
def _(inputs, tmp, monkeypatch):
    app = tmp / "app"
    app.mkdir()
    (app / "manifest.json").write_text('{"name": "a web app"}')
    return Case(tool_cache_latents.main, _cache(inputs, inputs.data, "--out", app, "--overwrite"),
                f"output folder '{app}' holds a manifest.json that is not a latent cache's, so it is not replaced even "
                f"with --overwrite")


@row("cache-resolution-not-multiple-of-64")
def _(inputs, tmp, monkeypatch):
    return Case(tool_cache_latents.main, _cache(inputs, inputs.data, "--out", tmp / "cache", "--resolution", "100"),
                "--resolution must be a positive multiple of 64, got 100")


@row("train-cache-missing")
def _(inputs, tmp, monkeypatch):
    return Case(tutorial_train.main, _train(inputs, tmp, "--latent_cache", tmp / "nowhere"),
                f"latent cache {tmp}/nowhere does not exist; make it with tool_cache_latents.py")


@row("train-cache-not-a-cache")
def _(inputs, tmp, monkeypatch):
    (tmp / "empty").mkdir()
    return Case(tutorial_train.main, _train(inputs, tmp, "--latent_cache", tmp / "empty"),
                f"{tmp}/empty holds no manifest.json, so it is not a latent cache; make one with tool_cache_latents.py")


@row("train-cache-prompt-json-changed")
def _(inputs, tmp, monkeypatch):
    data = _cached_data(inputs, tmp)
    prompts = data / "prompt.json"
    prompts.write_text(prompts.read_text().replace("circle", "disc", 1))
    return Case(tutorial_train.main, _train(inputs, tmp, "--latent_cache", data=data),
                f"latent cache {data}/latent_cache does not fit this run: the data set (prompt.json or a target image) "
                f"changed since it was made; {REMAKE}")


@row("train-cache-target-changed")
def _(inputs, tmp, monkeypatch):
    data = _cached_data(inputs, tmp)
    target = data / "target" / "1.png"
    target.write_bytes(target.read_bytes())  # the same bytes, rewritten: a new modification time
    return Case(tutorial_train.main, _train(inputs, tmp, "--latent_cache", data=data),
                "the data set (prompt.json or a target image) changed since it was made")


@row("train-cache-other-resolution")
def _(inputs, tmp, monkeypatch):
    data = _cached_data(inputs, tmp)
    return Case(tutorial_train.main, _train(inputs, tmp, "--latent_cache", "--resolution", "128", data=data),
                f"latent cache {data}/latent_cache does not fit this run: it was made with no --resolution and this run "
                f"has --resolution 128; {REMAKE}")


@row("train-cache-other-weights")
def _(inputs, tmp, monkeypatch):
    data = _cached_data(inputs, tmp)
    other = tmp / "other_ini.ckpt"
    model = create_model(TINY)
    save_state_dict(add_control(model.state_dict(), random_base_state_dict(TINY, seed=1))[0], other)
    return Case(tutorial_train.main, _train(inputs, tmp, "--latent_cache", data=data, initial=other),
                f"latent cache {data}/latent_cache does not fit this run: the VAE encoder's weights differ from those "
                f"it was made with; {REMAKE}")


@row("train-cache-truncated")
def _(inputs, tmp, monkeypatch):
    data = _cached_data(inputs, tmp)
    moments = data / "latent_cache" / MOMENTS_NAME
    moments.write_bytes(moments.read_bytes()[:-100])
    return Case(tutorial_train.main, _train(inputs, tmp, "--latent_cache", data=data),
                f"{moments} is missing, truncated or damaged")


# Configs (--config of every script) ------------------------------------------------------------

def _config(tmp: Path, key: str, value: object) -> Path:
    """The tiny config with `key` (a dotted path) set to `value`: a config file someone shared."""
    config = OmegaConf.load(TINY_CONFIG)
    OmegaConf.update(config, key, value, merge=False)
    path = tmp / "shared.yaml"
    OmegaConf.save(config, path)
    return path


def _never_created(path: Path) -> Callable[[], None]:
    def check() -> None:
        assert not path.exists(), "the config ran a command"
    return check


@row("config-target-runs-a-command")
def _(inputs, tmp, monkeypatch):
    marker = tmp / "ran"
    config = _config(tmp, "model", {"target": "subprocess.call", "params": {"args": ["touch", str(marker)]}})
    return Case(tutorial_train.main, _train(inputs, tmp, "--config", config),
                f"config file '{config}': model.target names 'subprocess.call', which a config may not use: a target "
                "must be a class of this project (ldm.* or cldm.*) or torch.nn.Identity; use a config from ./models/ "
                "or fix the target", check=_never_created(marker))


@row("config-nested-target-runs-a-command")
def _(inputs, tmp, monkeypatch):
    marker = tmp / "ran"
    config = _config(tmp, "model.params.control_stage_config",
                     {"target": "os.system", "params": {"command": f"touch '{marker}'"}})
    return Case(tool_extract_control.main, [inputs.initial, tmp / "control.safetensors", "--config", config],
                f"config file '{config}': model.params.control_stage_config.target names 'os.system', which a "
                "config may not use", check=_never_created(marker))


@row("config-target-outside-the-project")
def _(inputs, tmp, monkeypatch):
    folder = tmp / "photos"
    folder.mkdir()
    (folder / "holiday.png").write_bytes(b"the user's photo")
    config = _config(tmp, "model", {"target": "shutil.rmtree", "params": {"path": str(folder)}})

    def check() -> None:
        assert (folder / "holiday.png").read_bytes() == b"the user's photo"
    return Case(tool_make_random_sd.main, [tmp / "random.ckpt", "--config", config],
                f"config file '{config}': model.target names 'shutil.rmtree', which a config may not use", check=check)


@row("config-target-not-a-class")
def _(inputs, tmp, monkeypatch):
    config = _config(tmp, "model.target", "cldm.model.create_model")
    return Case(tool_add_control.main, _add(inputs.sd1, tmp / "out.ckpt", "--config", config),
                f"config file '{config}': model.target 'cldm.model.create_model' is not a class of this project; a "
                "target must be a class of this project (ldm.* or cldm.*) or torch.nn.Identity")


@row("config-target-misspelt-class")
def _(inputs, tmp, monkeypatch):
    config = _config(tmp, "model.target", "cldm.cldm.ControlLDN")
    return Case(tool_sample.main, _sample(inputs, tmp, "--config", config),
                f"config file '{config}': model.target 'cldm.cldm.ControlLDN' cannot be imported: module 'cldm.cldm' "
                "has no attribute 'ControlLDN'; fix the target")


@row("config-misspelt-param")
def _(inputs, tmp, monkeypatch):
    config = _config(tmp, "model.params.control_stage_config.params.model_chanels", 32)
    return Case(tool_add_control.main, _add(inputs.sd1, tmp / "out.ckpt", "--config", config),
                f"config file '{config}': model.params.control_stage_config.params.model_chanels is not a parameter "
                "of cldm.cldm.ControlNet; did you mean model_channels or num_head_channels or in_channels?")


@row("config-missing-param")
def _(inputs, tmp, monkeypatch):
    config = OmegaConf.load(TINY_CONFIG)
    del config.model.params.control_stage_config.params["hint_channels"]
    OmegaConf.save(config, tmp / "shared.yaml")
    return Case(tool_add_control.main, _add(inputs.sd1, tmp / "out.ckpt", "--config", tmp / "shared.yaml"),
                f"config file '{tmp / 'shared.yaml'}': cldm.cldm.ControlNet needs hint_channels, which its params do "
                "not set; add it (the configs in ./models/ show the values)")


@row("config-cond-stage-forward-not-a-method")
def _(inputs, tmp, monkeypatch):
    config = _config(tmp, "model.params.cond_stage_forward", "load_state_dict")
    return Case(tool_add_control.main, _add(inputs.sd1, tmp / "out.ckpt", "--config", config),
                "cond_stage_forward 'load_state_dict' is not a method of the text encoder FrozenCLIPEmbedder; use one "
                "of encode, features, forward, freeze, tokenize, or remove the key")


# tool_plot_run.py -------------------------------------------------------------------------------

def _trained_run(tmp: Path) -> Path:
    """A run folder whose CSV log holds ten training steps."""
    write_log(tmp / "run", 0, training_rows(range(10)))
    return tmp / "run"


@row("plot-run-folder-missing")
def _(inputs, tmp, monkeypatch):
    return Case(tool_plot_run.main, [tmp / "run"],
                "run folder '{tmp}/run' does not exist; pass the folder a training run wrote (its --default_root_dir)")


@row("plot-run-folder-without-logs")
def _(inputs, tmp, monkeypatch):
    return Case(tool_plot_run.main, [inputs.data],
                f"run folder '{inputs.data}' holds no lightning_logs folder, so no training run wrote it; pass the "
                "folder a training run wrote (its --default_root_dir)")


@row("plot-no-metrics-yet")
def _(inputs, tmp, monkeypatch):
    (tmp / "run" / "lightning_logs" / "version_0").mkdir(parents=True)
    return Case(tool_plot_run.main, [tmp / "run"], "no metrics in '{tmp}/run' yet; train first")


@row("plot-output-is-a-folder")
def _(inputs, tmp, monkeypatch):
    (tmp / "pictures.png").mkdir()
    return Case(tool_plot_run.main, [_trained_run(tmp), "--out", tmp / "pictures.png"],
                "output '{tmp}/pictures.png' is a folder; give a file name inside it")


@row("plot-output-folder-missing")
def _(inputs, tmp, monkeypatch):
    return Case(tool_plot_run.main, [_trained_run(tmp), "--out", tmp / "pictures" / "run.png"],
                "output folder '{tmp}/pictures' does not exist; create it first")


@row("plot-output-folder-read-only")
def _(inputs, tmp, monkeypatch):
    run_dir = _trained_run(tmp)
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != run_dir and access(path, mode))
    return Case(tool_plot_run.main, [run_dir], "output folder '{tmp}/run' is not writable; choose another folder")


@row("plot-output-not-png")
def _(inputs, tmp, monkeypatch):
    return Case(tool_plot_run.main, [_trained_run(tmp), "--out", tmp / "run.jpg"],
                "output '{tmp}/run.jpg' must be a .png file; give a name ending in .png")


@row("plot-smoothing-out-of-range")
def _(inputs, tmp, monkeypatch):
    return Case(tool_plot_run.main, [_trained_run(tmp), "--smoothing", "1"],
                "--smoothing must be in [0, 1) (0 draws the raw loss only), got 1.0")


# tool_eval_control.py ------------------------------------------------------------------------------

def _eval(inputs: Inputs, *extra) -> list:
    return ["--config", TINY, "--data_root", inputs.data, "--items", "2", "--ddim_steps", "1", "--device", "cpu",
            *extra]


@row("eval-data-folder-missing")
def _(inputs, tmp, monkeypatch):
    return Case(tool_eval_control.main, _eval(inputs, "--data_root", tmp / "fill50k", "--ckpt", inputs.initial),
                f"Data set folder {tmp}/fill50k does not exist; make it with tool_make_fill50k.py or unzip fill50k.zip "
                f"there.")


@row("eval-data-folder-without-items")
def _(inputs, tmp, monkeypatch):
    (tmp / "empty").mkdir()
    (tmp / "empty" / "prompt.json").write_text("\n")
    return Case(tool_eval_control.main, _eval(inputs, "--data_root", tmp / "empty", "--ckpt", inputs.initial),
                f"{tmp}/empty/prompt.json lists no items; add one JSON object per line with keys source, target, "
                f"prompt.")


@row("eval-items-more-than-dataset")
def _(inputs, tmp, monkeypatch):
    return Case(tool_eval_control.main, _eval(inputs, "--items", "10", "--ckpt", inputs.initial),
                f"--items 10 is more than the 4 items in {inputs.data}/prompt.json; use at most 4")


@row("eval-resolution-too-large")
def _(inputs, tmp, monkeypatch):
    return Case(tool_eval_control.main, _eval(inputs, "--resolution", "16384", "--ckpt", inputs.initial),
                "--resolution 16384 makes images of 16384x16384 px, more than the 67108864 pixels allowed; use a "
                "smaller --resolution or raise --max_image_pixels")


@row("eval-items-zero")
def _(inputs, tmp, monkeypatch):
    return Case(tool_eval_control.main, _eval(inputs, "--items", "0", "--ckpt", inputs.initial),
                "argument --items: must be a whole number between 1 and 9223372036854775807, got 0")


@row("eval-checkpoint-without-controlnet")
def _(inputs, tmp, monkeypatch):
    return Case(tool_eval_control.main, _eval(inputs, "--ckpt", inputs.sd1),
                f"--ckpt '{inputs.sd1}' looks like a Stable Diffusion 1.x model; pass a checkpoint that holds a "
                f"ControlNet and its base model (a training checkpoint or tool_add_control.py's output), or the base "
                f"model as --base and control-only weights as --control")


@row("eval-images-names-do-not-match")
def _(inputs, tmp, monkeypatch):
    (tmp / "generated").mkdir()
    for name in ("sample_a.png", "sample_b.png"):
        shutil.copy(inputs.data / "target" / "2.png", tmp / "generated" / name)
    return Case(tool_eval_control.main, _eval(inputs, "--images", tmp / "generated"),
                f"--images '{tmp}/generated' has no image for 2 of the 2 items (the first: 2.png); name each image "
                f"after its item's line in prompt.json, counted from 0 (the items scored are the data set's last "
                f"--items)")


@row("eval-images-other-size")
def _(inputs, tmp, monkeypatch):
    (tmp / "generated").mkdir()
    shutil.copy(inputs.data / "target" / "2.png", tmp / "generated" / "2.png")
    cv2.imwrite(str(tmp / "generated" / "3.png"), np.zeros((32, 32, 3), np.uint8))
    return Case(tool_eval_control.main, _eval(inputs, "--images", tmp / "generated"),
                f"image '{tmp}/generated/3.png' is 32x32 px but the hint of item 3 is 64x64 px; generate at the "
                f"hint's size or pass --resolution")


@row("eval-output-exists")
def _(inputs, tmp, monkeypatch):
    existing = inputs.root / "per_item.json"
    existing.write_text("[]\n")
    return Case(tool_eval_control.main, _eval(inputs, "--ckpt", inputs.initial, "--json", existing),
                f"output '{existing}' already exists; choose another name or delete it first")


# Flag values (every script; the flags' types are in cldm/flags.py) ------------------------------------

@row("add-path-empty-or-nul")
def _(inputs, tmp, monkeypatch):
    return Case(tool_add_control.main, _add("", tmp / "out.ckpt"),
                "argument input_path: must be a path, got an empty string")


@row("add-seed-out-of-range")
def _(inputs, tmp, monkeypatch):
    return Case(tool_add_control.main, _add(inputs.sd1, tmp / "out.ckpt", "--seed", 2**70),
                f"argument --seed: must be a whole number between 0 and 4294967295, got {2**70}")


@row("fill50k-number-too-large")
def _(inputs, tmp, monkeypatch):
    return Case(tool_make_fill50k.main, ["--out", tmp / "fill", "--count", 10**30, "--quiet"],
                f"count must be at most 10000000 (the records are held in memory), got {10**30}.")


# Training flags whose value argparse refuses: the row, the flag and value, the sentence.
_TRAIN_FLAG_ROWS = {
    "train-count-out-of-range": (("--logger_freq", "0"), "argument --logger_freq/--logger-freq: must be a whole "
                                 "number between 1 and 9223372036854775807, got 0"),
    "train-max-steps-out-of-range": (("--max_steps", "-5"), "argument --max_steps/--max-steps: must be -1 (no limit) "
                                     "or a whole number between 1 and 9223372036854775807, got -5"),
    "train-learning-rate-not-finite": (("--learning_rate", "nan"), "argument --learning_rate/--learning-rate: must "
                                       "be a finite number greater than 0, got nan"),
    "train-seed-out-of-range": (("--seed", "-1"), "argument --seed: must be a whole number between 0 and "
                                "4294967295, got -1"),
    "train-gradient-clip-not-positive": (("--gradient_clip_val", "-1"), "argument --gradient_clip_val/"
                                         "--gradient-clip-val: must be a finite number greater than 0, got -1; leave "
                                         "the flag out to train without clipping"),
    "train-prompt-dropout-not-a-probability": (("--prompt_dropout", "nan"), "argument --prompt_dropout/"
                                               "--prompt-dropout: must be a number between 0 and 1, got nan"),
    "train-processes-out-of-range": (("--num_workers", "1000000"), "argument --num_workers/--num-workers: must be a "
                                     "whole number between 0 and 256, got 1000000"),
    "train-log-ddim-steps-out-of-range": (("--log_ddim_steps", "5000"), "argument --log_ddim_steps/"
                                          "--log-ddim-steps: must be a whole number between 1 and 1000, got 5000"),
    "train-path-empty": (("--config", ""), "argument --config: must be a path, got an empty string"),
}
for _row_id, (_extra, _expected) in _TRAIN_FLAG_ROWS.items():
    row(_row_id)(lambda inputs, tmp, monkeypatch, extra=_extra, expected=_expected:
                 Case(tutorial_train.main, _train(inputs, tmp, *extra), expected))


@row("train-resolution-too-large")
def _(inputs, tmp, monkeypatch):
    return Case(tutorial_train.main, _train(inputs, tmp, "--resolution", "65536"),
                "--resolution 65536 makes images of 65536x65536 px, more than the 67108864 pixels allowed; use a "
                "smaller --resolution or raise --max_image_pixels")


@row("train-num-nodes-without-launcher")
def _(inputs, tmp, monkeypatch):
    for name in ("NODE_RANK", "TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "SLURM_JOB_NAME", "LSB_JOBID"):
        monkeypatch.delenv(name, raising=False)
    return Case(tutorial_train.main, _train(inputs, tmp, "--num_nodes", "2"),
                "--num_nodes 2 needs a launcher that starts the script on every node (torchrun, SLURM, LSF or MPI, "
                "or NODE_RANK set by hand) and none started this one, so it would wait for the other nodes; use a "
                "launcher or --num_nodes 1")


@row("sample-number-not-finite")
def _(inputs, tmp, monkeypatch):
    return Case(tool_sample.main, _sample(inputs, tmp, "--scale", "nan"),
                "argument --scale: must be a finite number at least 0, got nan")


@row("sample-seed-out-of-range")
def _(inputs, tmp, monkeypatch):
    return Case(tool_sample.main, _sample(inputs, tmp, "--seed", "-2"),
                "argument --seed: must be -1 (pick one) or a whole number between 0 and 4294967295, got -2")


@row("sample-count-out-of-range")
def _(inputs, tmp, monkeypatch):
    return Case(tool_sample.main, _sample(inputs, tmp, "--num_samples", "1000"),
                "argument --num_samples: must be a whole number between 1 and 100, got 1000")


@row("cache-device-unknown")
def _(inputs, tmp, monkeypatch):
    return Case(tool_cache_latents.main, _cache(inputs, inputs.data, "--device", "tpu", "--out", tmp / "cache"),
                "argument --device: must be cpu, cuda or cuda:N, got tpu")


# tutorial_train.py --eval_every_n_steps ----------------------------------------------------------

def _evaluating(inputs: Inputs, tmp: Path, *extra) -> list:
    return _train(inputs, tmp, "--eval_every_n_steps", "1", *extra)


@row("train-eval-flag-without-eval-every")
def _(inputs, tmp, monkeypatch):
    return Case(tutorial_train.main, _train(inputs, tmp, "--val_items", "2"),
                "--val_items sets up the evaluation during training, which is off; add --eval_every_n_steps N to "
                "evaluate every N steps")


@row("train-eval-every-zero")
def _(inputs, tmp, monkeypatch):
    return Case(tutorial_train.main, _train(inputs, tmp, "--eval_every_n_steps", "0"),
                "argument --eval_every_n_steps/--eval-every-n-steps: must be a whole number between 1 and "
                "9223372036854775807, got 0")


@row("train-eval-guidance-not-finite")
def _(inputs, tmp, monkeypatch):
    return Case(tutorial_train.main, _evaluating(inputs, tmp, "--val_items", "2", "--eval_guidance_scale", "nan"),
                "argument --eval_guidance_scale/--eval-guidance-scale: must be a finite number at least 0, got nan")


@row("train-val-items-with-val-data-root")
def _(inputs, tmp, monkeypatch):
    return Case(tutorial_train.main, _evaluating(inputs, tmp, "--val_items", "2", "--val_data_root", inputs.data),
                "--val_items holds items of --data_root out for evaluation and --val_data_root evaluates on another "
                "data set; pass one of the two")


@row("train-val-items-more-than-dataset")
def _(inputs, tmp, monkeypatch):
    return Case(tutorial_train.main, _evaluating(inputs, tmp, "--val_items", "4"),
                f"--val_items 4 would hold out all 4 items of {inputs.data} for evaluation and leave none to train "
                f"on; use at most 3, or --val_data_root")


@row("train-val-data-root-missing")
def _(inputs, tmp, monkeypatch):
    return Case(tutorial_train.main, _evaluating(inputs, tmp, "--val_data_root", tmp / "val"),
                f"--val_data_root: Data set folder {tmp}/val does not exist; make it with tool_make_fill50k.py or "
                f"unzip fill50k.zip there.")


@row("train-val-data-root-without-items")
def _(inputs, tmp, monkeypatch):
    data = _dataset(tmp / "val", 0, lines=[])
    return Case(tutorial_train.main, _evaluating(inputs, tmp, "--val_data_root", data),
                f"--val_data_root: {data}/prompt.json lists no items; add one JSON object per line with keys source, "
                f"target, prompt.")


@row("train-keep-best-control-sharded")
def _(inputs, tmp, monkeypatch):
    return Case(tutorial_train.main, _evaluating(inputs, tmp, "--keep_best_control", "--strategy", "fsdp"),
                "--keep_best_control saves from rank 0 alone, which cannot save the sharded state of --strategy "
                "fsdp; use --strategy ddp or drop --keep_best_control")


# Resizing and cropping (--resize, --crop) ----------------------------------------------------------------------

@row("train-resize-unknown")
def _(inputs, tmp, monkeypatch):
    return Case(tutorial_train.main, _train(inputs, tmp, "--resize", "squash"),
                "argument --resize: invalid choice: 'squash' (choose from 'crop', 'stretch')")


@row("train-crop-random-with-latent-cache")
def _(inputs, tmp, monkeypatch):
    return Case(tutorial_train.main, _train(inputs, tmp, "--resolution", "64", "--crop", "random", "--latent_cache"),
                "--crop random draws a new crop at every visit and a latent cache holds one crop per image; train with "
                "--crop center or without --latent_cache")


@row("train-crop-random-without-cropping")
def _(inputs, tmp, monkeypatch):
    return Case(tutorial_train.main, _train(inputs, tmp, "--crop", "random"),
                "--crop random crops only with --resolution and --resize crop, and this run has no --resolution "
                "(images are used whole); pass --resolution 512 (or another multiple of 64) with --resize crop, or "
                "drop --crop random")


@row("cache-crop-random")
def _(inputs, tmp, monkeypatch):
    return Case(tool_cache_latents.main, _cache(inputs, inputs.data, "--crop", "random", "--out", tmp / "cache"),
                "--crop random draws a new crop at every visit of an image and a latent cache holds one; cache with "
                "--crop center and train with it, or train without a cache")


@row("train-cache-other-resize")
def _(inputs, tmp, monkeypatch):
    data = Path(shutil.copytree(inputs.data, tmp / "data"))
    assert tool_cache_latents.main([str(arg) for arg in _cache(inputs, data, "--resolution", "64", "--resize",
                                                                "stretch")]) == 0
    return Case(tutorial_train.main, _train(inputs, tmp, "--latent_cache", "--resolution", "64", data=data),
                f"latent cache {data}/latent_cache does not fit this run: it was made with --resize stretch and this "
                f"run has --resize crop; {REMAKE}")


@row("train-buckets-without-resolution")
def _(inputs, tmp, monkeypatch):
    return Case(tutorial_train.main, _train(inputs, tmp, "--buckets"),
                "--buckets makes sizes of about --resolution squared pixels and this run has no --resolution; pass "
                "--resolution 512 (or another multiple of 64)")


@row("train-buckets-with-latent-cache")
def _(inputs, tmp, monkeypatch):
    return Case(tutorial_train.main, _train(inputs, tmp, "--resolution", "64", "--buckets", "--latent_cache"),
                "--buckets trains items at sizes that a latent cache (made at --resolution squared) does not hold; "
                "train without --latent_cache or without --buckets")


@row("train-buckets-resume-other-batch-size")
def _(inputs, tmp, monkeypatch):
    first = _train(inputs, tmp, "--resolution", "64", "--buckets", "--seed", "0")
    assert tutorial_train.main([str(arg) for arg in first]) == 0
    return Case(tutorial_train.main, first + ["--max_steps", "2", "--batch_size", "1",
                                              "--resume_from_checkpoint", "last"],
                "--buckets resumes an epoch only in batches of the run's size, and --batch_size 1 differs from its 2; "
                "resume with --batch_size 2", in_training=True)


# ---------------------------------------------------------------------------------------------
# Data set layouts (cldm.data.layouts): the image-folder layout's metadata.jsonl
# ---------------------------------------------------------------------------------------------


def _image_folder(inputs: Inputs, tmp: Path, rows: list[dict] | None = None) -> Path:
    """A copy of the 4-pair data set in the image-folder layout; `rows` replace its metadata.jsonl lines."""
    folder = as_image_folder(Path(shutil.copytree(inputs.data, tmp / "folder")))
    if rows is not None:
        (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


@row("layout-mixed")
def _(inputs, tmp, monkeypatch):
    folder = _image_folder(inputs, tmp)
    shutil.copy(inputs.data / "prompt.json", folder)
    return Case(tutorial_train.main, _train(inputs, tmp, data=folder),
                f"Data set folder {folder} holds both prompt.json (Fill50K layout) and metadata.jsonl (image-folder "
                f"layout); keep the one that lists your items and move the other away.")


@row("layout-metadata-missing-column")
def _(inputs, tmp, monkeypatch):
    folder = _image_folder(inputs, tmp, [{"image": "target/0.png", "conditioning_image": "source/0.png", "text": "a"},
                                         {"image": "target/1.png", "conditioning_image": "source/1.png", "txt": "b"}])
    return Case(tutorial_train.main, _train(inputs, tmp, data=folder),
                f"Line 2 of {folder}/metadata.jsonl has no text column 'text' (its columns: image, "
                f"conditioning_image, txt); add it, or name the column to read with --caption_column.")


@row("layout-metadata-missing-file")
def _(inputs, tmp, monkeypatch):
    folder = _image_folder(inputs, tmp, [{"image": "target/0.png", "conditioning_image": "hints/0.png", "text": "a"}])
    return Case(tool_cache_latents.main, _cache(inputs, folder),
                f"Line 1 of {folder}/metadata.jsonl gives the conditioning_image 'hints/0.png', which does not exist; "
                f"restore the file or remove the line.")


@row("layout-metadata-image-outside")
def _(inputs, tmp, monkeypatch):
    folder = _image_folder(inputs, tmp, [{"image": "../target/0.png", "conditioning_image": "source/0.png",
                                          "text": "a"}])
    return Case(tool_eval_control.main, [*_eval(inputs, "--images", tmp), "--data_root", folder],
                f"Line 1 of {folder}/metadata.jsonl gives the image '../target/0.png', {OUTSIDE}")


@row("layout-columns-on-fill50k")
def _(inputs, tmp, monkeypatch):
    return Case(tutorial_train.main, _train(inputs, tmp, "--caption_column", "prompt"),
                f"--image_column, --conditioning_image_column and --caption_column name the columns of a "
                f"metadata.jsonl, but {inputs.data} has the Fill50K layout ({inputs.data}/prompt.json); leave "
                f"those flags out.")


@row("layout-column-empty")
def _(inputs, tmp, monkeypatch):
    return Case(tutorial_train.main, _train(inputs, tmp, "--image_column", ""),
                "argument --image_column/--image-column: must be a column name, got an empty string")


# ---------------------------------------------------------------------------------------------
# tool_make_shards.py (cldm.data.shards)
# ---------------------------------------------------------------------------------------------


def _shards(data: Path, out: Path, *extra) -> list:
    return ["--data_root", data, "--out", out, *extra]


@row("shards-data-folder-missing")
def _(inputs, tmp, monkeypatch):
    return Case(tool_make_shards.main, _shards(tmp / "nowhere", tmp / "shards"),
                f"Data set folder {tmp}/nowhere does not exist or is not a folder; pass the folder that holds "
                f"prompt.json or metadata.jsonl.")


@row("shards-output-exists")
def _(inputs, tmp, monkeypatch):
    (tmp / "shards").mkdir()
    return Case(tool_make_shards.main, _shards(inputs.data, tmp / "shards"),
                f"output folder '{tmp}/shards' already exists; choose another name or pass --overwrite")


@row("shards-overwrite-other-folder")
def _(inputs, tmp, monkeypatch):
    _png(tmp / "photos" / "holiday.png")
    return Case(tool_make_shards.main, _shards(inputs.data, tmp / "photos", "--overwrite"),
                f"output folder '{tmp}/photos' is not empty and holds no shards.json; it is not a shard folder, so it "
                f"is not replaced even with --overwrite")


@row("shards-size-zero")
def _(inputs, tmp, monkeypatch):
    return Case(tool_make_shards.main, _shards(inputs.data, tmp / "shards", "--shard_size", "0"),
                "argument --shard_size: must be a whole number between 1 and 9223372036854775807, got 0")


@row("shards-image-missing")
def _(inputs, tmp, monkeypatch):
    data = Path(shutil.copytree(inputs.data, tmp / "data"))
    (data / "target" / "1.png").unlink()
    return Case(tool_make_shards.main, _shards(data, tmp / "shards", "--shard_size", "1"),
                f"Item 2 of {data}/prompt.json names the target image 'target/1.png', which does not exist; restore "
                f"the file or remove the item.")


# ---------------------------------------------------------------------------------------------
# tutorial_train.py --data_shards (cldm.data.shard_stream)
# ---------------------------------------------------------------------------------------------


def _shard_folder(inputs: Inputs, tmp: Path) -> Path:
    """The 4 items of the good data set as 2 shards of 2 items (keys 000000000 to 000000003)."""
    make_shards(str(inputs.data), tmp / "shards", 2)
    return tmp / "shards"


def _rewrite_shard(path: Path, change: Callable[[str, bytes], tuple[str, bytes] | None]) -> None:
    """Rewrite the shard `path` with each member passed through `change` (None leaves it out)."""
    with tarfile.open(path) as archive:
        members = [(info.name, archive.extractfile(info).read()) for info in archive]
    with tarfile.open(path, "w") as archive:
        for name, data in filter(None, (change(*member) for member in members)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def _train_shards(inputs: Inputs, tmp: Path, shards, *extra) -> list:
    argv = _train(inputs, tmp, *extra)
    position = argv.index("--data_root")
    return argv[:position] + ["--data_shards", *([shards] if isinstance(shards, (str, Path)) else shards)] + \
        argv[position + 2:]


@row("train-shards-and-data-root")
def _(inputs, tmp, monkeypatch):
    return Case(tutorial_train.main, _train(inputs, tmp, "--data_shards", _shard_folder(inputs, tmp)),
                "--data_root and --data_shards both name the training data; pass one of the two")


@row("train-shards-empty-list")
def _(inputs, tmp, monkeypatch):
    folder = tmp / "shards"
    folder.mkdir()
    (folder / "shards.json").write_text(json.dumps({"format": "controlnet-webdataset-shards", "count": 0,
                                                    "shard_size": 2, "shards": []}))
    return Case(tutorial_train.main, _train_shards(inputs, tmp, folder),
                "--data_shards names no shards; pass .tar files, a brace pattern or the folder that "
                "tool_make_shards.py wrote.")


@row("train-shards-missing-file")
def _(inputs, tmp, monkeypatch):
    folder = _shard_folder(inputs, tmp)
    return Case(tutorial_train.main, _train_shards(inputs, tmp, str(folder / "shard-{000000..000002}.tar")),
                f"--data_shards: 1 of the 3 shards do not exist (the first is {folder}/shard-000002.tar); check the "
                f"paths or remake them with tool_make_shards.py.")


@row("train-shards-folder-without-manifest")
def _(inputs, tmp, monkeypatch):
    (tmp / "photos").mkdir()
    return Case(tutorial_train.main, _train_shards(inputs, tmp, tmp / "photos"),
                f"--data_shards: the folder {tmp}/photos has no shards.json; pass the folder that tool_make_shards.py "
                f"wrote, or the .tar files themselves.")


@row("train-shards-manifest-not-ours")
def _(inputs, tmp, monkeypatch):
    folder = tmp / "shards"
    folder.mkdir()
    (folder / "shards.json").write_text('{"shards": "all of them"}')
    return Case(tutorial_train.main, _train_shards(inputs, tmp, folder),
                f"--data_shards: {folder}/shards.json is not the shard list tool_make_shards.py writes (a JSON object "
                f"with the format 'controlnet-webdataset-shards' and the fields format, count, shard_size, shards); "
                f"remake the folder with tool_make_shards.py, or pass the .tar files themselves.")


@row("train-shards-url-scheme-unknown")
def _(inputs, tmp, monkeypatch):
    return Case(tutorial_train.main, _train_shards(inputs, tmp, "s3://bucket/shard-000000.tar"),
                "--data_shards: webdataset opens no s3: URLs (s3://bucket/shard-000000.tar); use one of ais:, file:, "
                "ftps:, gs:, hf:, htgs:, http:, https:, pipe:, scp:, sftp:, e.g. 'pipe:aws s3 cp "
                "s3://bucket/shard-000000.tar -'.")


@row("train-shards-truncated-member")
def _(inputs, tmp, monkeypatch):
    folder = _shard_folder(inputs, tmp)
    shard = folder / "shard-000001.tar"
    with tarfile.open(shard) as archive:
        target = archive.getmembers()[1]
    shard.write_bytes(shard.read_bytes()[:target.offset_data + 10])  # inside the target's bytes
    return Case(tutorial_train.main, _train_shards(inputs, tmp, folder, "--max_steps", "2", "--num_workers", "1"),
                f"Shard {shard} is truncated or damaged in the member 000000002.png; remake it with "
                f"tool_make_shards.py.", in_training=True, check=_no_checkpoints(tmp / "run" / "checkpoints"))


@row("train-shards-no-hint")
def _(inputs, tmp, monkeypatch):
    folder = _shard_folder(inputs, tmp)
    _rewrite_shard(folder / "shard-000000.tar", lambda name, data: None if name == "000000000.hint.png"
                   else (name, data))
    return Case(tutorial_train.main, _train_shards(inputs, tmp, folder),
                f"Shard {folder}/shard-000000.tar has no source member (a 000000000.hint.<ext>) for the key 000000000 "
                f"(it holds 000000000.png, 000000000.txt); remake it with tool_make_shards.py.")


@row("train-shards-fewer-than-readers")
def _(inputs, tmp, monkeypatch):
    return Case(tutorial_train.main, _train_shards(inputs, tmp, _shard_folder(inputs, tmp), "--num_workers", "3"),
                "--data_shards has 2 shards for 3 readers (1 device(s) x 3 DataLoader worker(s)), and each reader "
                "needs a shard of its own; make smaller shards (tool_make_shards.py --shard_size) or pass fewer "
                "--num_workers")


_SHARDS_ARE_STREAMED = "shards are streamed in an order drawn per epoch, not read by index"


@row("train-shards-buckets")
def _(inputs, tmp, monkeypatch):
    argv = _train_shards(inputs, tmp, _shard_folder(inputs, tmp), "--buckets", "--resolution", "64")
    return Case(tutorial_train.main, argv,
                f"--buckets groups a data set folder's items by their sizes before training, and "
                f"{_SHARDS_ARE_STREAMED}; train from the folder with --data_root, or drop --buckets")


@row("train-shards-latent-cache")
def _(inputs, tmp, monkeypatch):
    argv = _train_shards(inputs, tmp, _shard_folder(inputs, tmp), "--latent_cache", tmp / "cache")
    return Case(tutorial_train.main, argv,
                f"--latent_cache serves a data set folder's items by index, and {_SHARDS_ARE_STREAMED}; train from "
                f"the folder with --data_root, or drop --latent_cache")


@row("train-shards-val-items")
def _(inputs, tmp, monkeypatch):
    argv = _train_shards(inputs, tmp, _shard_folder(inputs, tmp), "--eval_every_n_steps", "1", "--val_items", "1")
    return Case(tutorial_train.main, argv,
                f"--val_items holds the last items of a data set folder out, and {_SHARDS_ARE_STREAMED}; pass a "
                f"folder of validation items with --val_data_root instead")


@row("train-shards-eval-without-val-data-root")
def _(inputs, tmp, monkeypatch):
    argv = _train_shards(inputs, tmp, _shard_folder(inputs, tmp), "--eval_every_n_steps", "1")
    return Case(tutorial_train.main, argv,
                f"--eval_every_n_steps with --data_shards needs --val_data_root (a folder of validation items), since "
                f"{_SHARDS_ARE_STREAMED}")


@row("train-shards-batch-size-max")
def _(inputs, tmp, monkeypatch):
    argv = _train_shards(inputs, tmp, _shard_folder(inputs, tmp), "--batch_size", "max")
    return Case(tutorial_train.main, argv,
                "--batch_size max tries the step on the first item of a data set folder; with --data_shards pass a "
                "number")


@row("train-shards-all-items-skipped")
def _(inputs, tmp, monkeypatch):
    folder = _shard_folder(inputs, tmp)
    _rewrite_shard(folder / "shard-000001.tar", lambda name, data: (name, b"not a png") if name.endswith(".hint.png")
                   else (name, data))
    argv = _train_shards(inputs, tmp, folder, "--skip_bad_samples", "--num_workers", "2", "--max_steps", "2",
                        "--seed", "1")
    return Case(tutorial_train.main, argv,
                "--skip_bad_samples skipped every item of the shards that rank 0 (DataLoader worker 1) reads, which "
                "leaves it 2 items short of its 2 for the epoch, and every rank must serve the same batches; remake "
                "the damaged shards with tool_make_shards.py or leave them out of --data_shards", in_training=True,
                check=_no_checkpoints(tmp / "run" / "checkpoints"))


@row("train-shards-command-fails")
def _(inputs, tmp, monkeypatch):
    return Case(tutorial_train.main, _train_shards(inputs, tmp, "pipe:false"),
                "Shard pipe:false could not be read: the command that streams it exited with status 1; run it in a "
                "shell to see why, or check the URL.")


@row("train-shards-empty-shard")
def _(inputs, tmp, monkeypatch):
    folder = _shard_folder(inputs, tmp)
    tarfile.open(tmp / "empty.tar", "w").close()
    return Case(tutorial_train.main, _train_shards(inputs, tmp, [folder / "shard-000000.tar", tmp / "empty.tar"]),
                f"Shard {tmp}/empty.tar holds no items; leave it out of --data_shards or remake the shards with "
                f"tool_make_shards.py.")

# tool_pretrain_tiny_sd.py (cldm.training.pretrain) and training a VAE
# ---------------------------------------------------------------------------------------------


def _pretrain(inputs: Inputs, tmp: Path, *extra) -> list:
    return ["--config", TINY, "--data_root", inputs.data, "--work_dir", tmp / "work", "--out", tmp / "base.ckpt",
            "--vae_steps", "1", "--vae_batch_size", "2", "--unet_steps", "1", "--unet_batch_size", "2", *extra]


def _fit_config_vae(argv: list[str]) -> None:
    """What a script of the user's does that fits the VAE of the config `argv[0]` with a Lightning Trainer."""
    vae = instantiate_from_config(OmegaConf.load(argv[0]).model.params.first_stage_config)
    batches = torch.utils.data.DataLoader([{"image": torch.zeros(64, 64, 3)}])
    pl.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, default_root_dir=argv[1]).fit(vae, batches)


@row("vae-identity-loss-trained")
def _(inputs, tmp, monkeypatch):
    return Case(_fit_config_vae, [TINY, tmp],
                "this AutoencoderKL's lossconfig is torch.nn.Identity, which cannot train it; set lossconfig to "
                "ldm.modules.losses.ReconstructionKLLoss")


@row("pretrain-output-exists")
def _(inputs, tmp, monkeypatch):
    (tmp / "base.ckpt").write_bytes(b"the user's base")
    return Case(tool_pretrain_tiny_sd.main, _pretrain(inputs, tmp),
                f"--out {tmp}/base.ckpt already exists; choose another name or pass --overwrite")


@row("pretrain-config-without-base")
def _(inputs, tmp, monkeypatch):
    config = OmegaConf.load(TINY_CONFIG)
    del config.model.params.first_stage_config
    OmegaConf.save(config, tmp / "no_vae.yaml")
    return Case(tool_pretrain_tiny_sd.main, _pretrain(inputs, tmp, "--config", tmp / "no_vae.yaml"),
                f"config file '{tmp}/no_vae.yaml' has no model.params.first_stage_config, so it describes no Stable "
                f"Diffusion base to pretrain; pass a ControlLDM config such as ./models/cldm_tiny.yaml")


@row("pretrain-scale-factor-off")
def _(inputs, tmp, monkeypatch):
    def check() -> None:
        assert len(list((tmp / "work").glob("vae-*.ckpt"))) == 1 and not (tmp / "base.ckpt").exists()
    return Case(tool_pretrain_tiny_sd.main, _pretrain(inputs, tmp),
                f"and scale_factor 0.18215 of config file '{TINY}' scales it to ", work_dir="work", check=check)


@row("pretrain-loss-nonfinite")
def _(inputs, tmp, monkeypatch):
    return Case(tool_pretrain_tiny_sd.main, _pretrain(inputs, tmp, "--vae_learning_rate", "1e30", "--vae_steps", "5"),
                "at step 1, so training stopped; no checkpoint was saved before it: start again after lowering "
                "--vae_learning_rate", work_dir="work")


def _snapshot(*folders: Path) -> dict[Path, tuple[int, int, int]]:
    """(inode, size, mtime) of every file: a file rewritten or replaced in place changes one of them."""
    files = {}
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file():
                info = path.stat()
                files[path] = (info.st_ino, info.st_size, info.st_mtime_ns)
    return files


@pytest.mark.parametrize("row_id", list(CASES))
def test_bad_input(row_id: str, inputs: Inputs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    case = CASES[row_id](inputs, tmp_path, monkeypatch)
    before = _snapshot(inputs.root, tmp_path)
    code = run(case.main, [str(arg) for arg in case.argv])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error: " in line]
    expected = case.expected.replace("{tmp}", str(tmp_path))
    assert code == 2, err[-3000:]
    assert len(errors) == 1 and expected in errors[0], (expected, err[-3000:])
    assert "Traceback" not in err
    after = _snapshot(inputs.root, tmp_path)
    changed = [path for path, info in before.items() if after.get(path) != info]
    new = [path for path in after if path not in before
           and not (case.in_training and (tmp_path / "run" / "lightning_logs") in path.parents)
           and not (case.work_dir is not None and (tmp_path / case.work_dir) in path.parents)]
    assert not changed and not new, (changed, new)
    case.check()


@pytest.mark.parametrize("row_id", ["add-missing-input", "train-prompt-json-malformed-line"])
def test_debug_shows_the_traceback(row_id: str, inputs: Inputs, tmp_path: Path, monkeypatch) -> None:
    case = CASES[row_id](inputs, tmp_path, monkeypatch)
    with pytest.raises((OSError, ValueError)):
        run(case.main, [str(arg) for arg in case.argv] + ["--debug"])


# ---------------------------------------------------------------------------------------------
# The rows where a doubtful input is accepted
# ---------------------------------------------------------------------------------------------


def test_row_fill50k_force_replaces_its_own_data_set(tmp_path: Path) -> None:
    out = make_data(tmp_path / "fill50k", 3)
    argv = ["--out", str(out), "--count", "2", "--size", "64", "--workers", "1", "--force", "--quiet"]
    assert run(tool_make_fill50k.main, argv) == 0
    assert len((out / "prompt.json").read_text().splitlines()) == 2 and os.listdir(tmp_path) == ["fill50k"]


def _stalled_add_control(inputs: Inputs, output: Path) -> tuple[subprocess.Popen, Path]:
    """tool_add_control.py writing `output` in a subprocess, stalled with its temporary file complete."""
    argv = [str(arg) for arg in _add(inputs.sd1, output)]
    process = subprocess.Popen([sys.executable, str(HELPERS / "stalling_tool.py"), *argv], cwd=REPO_ROOT,
                               env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith("stalled "):
            temp = Path(line.removeprefix("stalled ").strip())
            assert temp.is_file() and temp.parent == output.parent
            return process, temp
    raise AssertionError(f"tool_add_control.py ended before writing: {''.join(lines)[-3000:]}")


@pytest.mark.slow  # a tool_add_control.py subprocess
def test_row_tool_killed_mid_write(inputs: Inputs, tmp_path: Path, caplog) -> None:
    process, temp = _stalled_add_control(inputs, tmp_path / "control.ckpt")
    process.kill()
    assert process.wait(timeout=60) == -signal.SIGKILL
    assert os.listdir(tmp_path) == [temp.name]  # the SIGKILLed tool could not clean up
    with caplog.at_level("INFO"):
        assert run(tool_add_control.main, [str(arg) for arg in _add(inputs.sd1, tmp_path / "other.ckpt")]) == 0
    assert sorted(os.listdir(tmp_path)) == ["other.ckpt"]
    assert f"Removed {temp} (" in caplog.text
    assert "the temporary file of a write whose process was killed" in caplog.text


@pytest.mark.slow  # a tool_add_control.py subprocess
def test_row_tool_writing_into_the_same_folder(inputs: Inputs, tmp_path: Path) -> None:
    process, temp = _stalled_add_control(inputs, tmp_path / "control.ckpt")
    try:
        assert run(tool_add_control.main, [str(arg) for arg in _add(inputs.sd1, tmp_path / "other.ckpt")]) == 0
        assert sorted(os.listdir(tmp_path)) == sorted(["other.ckpt", temp.name])  # the live write is left alone
    finally:
        process.kill()
        process.wait(timeout=60)


@pytest.mark.slow  # a tool_add_control.py subprocess
def test_row_tool_terminated_mid_write(inputs: Inputs, tmp_path: Path) -> None:
    process, temp = _stalled_add_control(inputs, tmp_path / "control.ckpt")
    process.terminate()
    output = process.communicate(timeout=60)[0]
    assert process.returncode == 143, output[-3000:]
    assert output.splitlines()[-1] == "terminated" and "Traceback" not in output
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "image",
    [np.full((64, 64), 77, np.uint8), np.full((64, 64, 4), 200, np.uint8), np.full((64, 64, 3), 40000, np.uint16)],
    ids=["gray", "rgba", "16-bit"])
def test_row_train_grayscale_rgba_16bit_images(tmp_path: Path, image: np.ndarray) -> None:
    data = _dataset(tmp_path / "data", 2)
    assert cv2.imwrite(str(data / "source" / "0.png"), image) and cv2.imwrite(str(data / "target" / "0.png"), image)
    dataset = MyDataset(root=str(data))
    check_dataset(dataset, None)  # the training job's check accepts them
    item = dataset[0]
    assert item["hint"].shape == item["jpg"].shape == (64, 64, 3) and item["hint"].dtype == np.float32


def test_row_train_prompt_longer_than_77_tokens(caplog) -> None:
    encoder = create_model(TINY).cond_stage_model
    with caplog.at_level("WARNING"):
        long = encoder.encode(["red " * 100, "red " * 90])
        encoder.encode(["red " * 80])
    warnings = [record.getMessage() for record in caplog.records if "truncated" in record.getMessage()]
    assert len(warnings) == 1 and "truncated to its first 75 tokens, as the original encoder does" in warnings[0]
    # Kept: the start token, the first 75 tokens and the end token, as the original's max_length=77 truncation.
    exactly_75 = encoder.encode(["red " * 75])
    assert long.shape == (2, 77, exactly_75.shape[-1])
    assert torch.equal(long[0], exactly_75[0]) and torch.equal(long[1], exactly_75[0])
    assert not torch.equal(encoder.encode(["red " * 74])[0], exactly_75[0])


def test_row_sample_hint_of_any_size() -> None:
    hint = prepare_hint(np.zeros((100, 150, 3), np.uint8), 100)
    assert hint.shape[0] % 64 == 0 and hint.shape[1] % 64 == 0


def test_row_train_second_run_logs(inputs: Inputs, tmp_path: Path) -> None:
    logs = tmp_path / "run" / "lightning_logs"
    tensorboard = importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX")
    assert run(tutorial_train.main, [str(arg) for arg in _train(inputs, tmp_path)]) == 0
    assert sorted(path.name for path in logs.iterdir()) == ["version_0"]  # one folder for all loggers
    files = sorted(path.name for path in (logs / "version_0").iterdir())
    assert "metrics.csv" in files and any(name.startswith("events.out.tfevents.") for name in files) == bool(tensorboard)
    resumed = _train(inputs, tmp_path, "--max_steps", "2", "--resume_from_checkpoint", "last")
    assert run(tutorial_train.main, [str(arg) for arg in resumed]) == 0
    assert sorted(path.name for path in logs.iterdir()) == ["version_0", "version_1"]
    assert (logs / "version_1" / "metrics.csv").is_file()


def test_row_train_resume_after_max_steps(inputs: Inputs, tmp_path: Path) -> None:
    # 4 batches of 2 per epoch. The run stopped by --max_steps 2 used to resume with the next epoch (154 tensors
    # differed from the uninterrupted run).
    data = make_data(tmp_path / "data", 8)
    want = train_in_stops(inputs.initial, data, tmp_path / "straight", [4])
    got = train_in_stops(inputs.initial, data, tmp_path / "stopped", [2, 4])
    assert got["global_step"] == want["global_step"] == 4
    assert differing_tensors(got, want) == []


def _resumed_warnings(inputs: Inputs, checkpoint: Path, tmp: Path, *extra, data: Path | None = None) -> list[str]:
    """The sentences about changed settings of a run resumed from `checkpoint` (at its last step: nothing trains)."""
    argv = _train(inputs, tmp, "--resume_from_checkpoint", checkpoint, "--seed", "3", *extra, data=data)
    with pytest.warns(UserWarning) as warned:
        assert run(tutorial_train.main, [str(arg) for arg in argv]) == 0
    return [str(warning.message) for warning in warned if "of the run in" in str(warning.message)]


def test_row_train_resume_other_batch_size(inputs: Inputs, run_checkpoint: Path, tmp_path: Path) -> None:
    assert _resumed_warnings(inputs, run_checkpoint, tmp_path, "--batch_size", "1") == [
        f"--batch_size 1 differs from the batch size 2 of the run in {run_checkpoint}; the data order continues from "
        f"the same sample, in batches of 1"]


def test_row_train_resume_other_seed(inputs: Inputs, run_checkpoint: Path, tmp_path: Path) -> None:
    assert _resumed_warnings(inputs, run_checkpoint, tmp_path, "--seed", "4") == [
        f"--seed 4 differs from the seed 3 of the run in {run_checkpoint}; the run continues the checkpoint's random "
        f"streams and data order, so --seed 4 is not used"]


def test_row_train_resume_other_resize(inputs: Inputs, run_checkpoint: Path, tmp_path: Path) -> None:
    assert _resumed_warnings(inputs, run_checkpoint, tmp_path, "--resize", "stretch") == [
        f"--resize stretch differs from the framing --resize crop --crop center of the run in {run_checkpoint}; the "
        f"images are framed by --resize stretch from here on"]


def test_row_train_resume_other_precision(inputs: Inputs, run_checkpoint: Path, tmp_path: Path) -> None:
    assert _resumed_warnings(inputs, run_checkpoint, tmp_path, "--precision", "bf16-mixed") == [
        f"--precision bf16-mixed differs from the precision 32-true of the run in {run_checkpoint}; training "
        f"continues in bf16-mixed"]


def test_row_train_resume_other_learning_rate(inputs: Inputs, run_checkpoint: Path, tmp_path: Path) -> None:
    assert _resumed_warnings(inputs, run_checkpoint, tmp_path, "--learning_rate", "2e-5") == [
        f"--learning_rate 2e-05 differs from the learning rate 1e-05 of the run in {run_checkpoint}; the optimizer "
        f"state restores 1e-05, so --learning_rate 2e-05 is not used"]


def test_row_train_resume_other_data_set(inputs: Inputs, run_checkpoint: Path, tmp_path: Path) -> None:
    data = _dataset(tmp_path / "data", 3)
    assert _resumed_warnings(inputs, run_checkpoint, tmp_path, data=data) == [
        f"the data set's prompt.json differs from that of the run in {run_checkpoint} (3 items, was 4); the run "
        f"continues the epoch from the same position in the new data set's order"]


def test_row_train_log_max_images_zero(inputs: Inputs, caplog) -> None:
    argv = ["--log_max_images", "0", "--data_root", str(inputs.data)]
    args = build_parser(SINGLE_DEVICE_DEFAULTS, "train").parse_args(argv)
    with caplog.at_level("INFO"):
        callbacks = build_callbacks(args, ResumableRandomSampler(4, 0), run_settings(args, 4))
    image_logger, = [callback for callback in callbacks if isinstance(callback, ImageLogger)]

    class Module:
        def log_images(self, *args, **kwargs):
            raise AssertionError("image logging is off, yet it sampled")
    image_logger.log_img(None, Module(), batch={}, batch_idx=0)
    assert "--log_max_images 0: image logging is off" in caplog.text


def test_row_train_source_other_size_same_aspect(inputs: Inputs, tmp_path: Path) -> None:
    data = _dataset(tmp_path / "data", 2, sizes={"source/0.png": 32, "target/1.png": (96, 96), "source/1.png": 48})
    assert check_dataset(MyDataset(root=str(data)), None) is None
    item = MyDataset(root=str(data), resolution=64)[0]
    assert item["hint"].shape == item["jpg"].shape == (64, 64, 3)
    argv = _train(inputs, tmp_path, "--resolution", "64", data=data)
    assert tutorial_train.main([str(arg) for arg in argv]) == 0


def test_row_train_shards_skip_bad_samples(inputs: Inputs, tmp_path: Path, caplog) -> None:
    folder = _shard_folder(inputs, tmp_path)
    _rewrite_shard(folder / "shard-000001.tar", lambda name, data: (name, b"not a png") if name == "000000003.png"
                   else (name, data))
    argv = _train_shards(inputs, tmp_path, folder, "--skip_bad_samples", "--max_steps", "2")
    with caplog.at_level("WARNING"):
        assert tutorial_train.main([str(arg) for arg in argv]) == 0
    assert (f"--skip_bad_samples: skipping the item: Member 000000003.png of shard {folder}/shard-000001.tar could "
            f"not be read") in caplog.text


ACCEPTED_ROWS = {
    "train-shards-skip-bad-samples": test_row_train_shards_skip_bad_samples,
    "fill50k-force-replaces-its-own-data-set": test_row_fill50k_force_replaces_its_own_data_set,
    "tool-killed-mid-write": test_row_tool_killed_mid_write,
    "tool-writing-into-the-same-folder": test_row_tool_writing_into_the_same_folder,
    "tool-terminated-mid-write": test_row_tool_terminated_mid_write,
    "train-log-max-images-zero": test_row_train_log_max_images_zero,
    "train-grayscale-rgba-16bit-images": test_row_train_grayscale_rgba_16bit_images,
    "train-prompt-longer-than-77-tokens": test_row_train_prompt_longer_than_77_tokens,
    "sample-hint-of-any-size": test_row_sample_hint_of_any_size,
    "train-second-run-logs": test_row_train_second_run_logs,
    "train-resume-after-max-steps": test_row_train_resume_after_max_steps,
    "train-resume-other-batch-size": test_row_train_resume_other_batch_size,
    "train-resume-other-seed": test_row_train_resume_other_seed,
    "train-resume-other-precision": test_row_train_resume_other_precision,
    "train-resume-other-resize": test_row_train_resume_other_resize,
    "train-resume-other-data-set": test_row_train_resume_other_data_set,
    "train-resume-other-learning-rate": test_row_train_resume_other_learning_rate,
    "train-source-other-size-same-aspect": test_row_train_source_other_size_same_aspect,
}


def test_catalogue_has_one_test_per_row() -> None:
    rows = re.findall(r"^\| `([a-z0-9-]+)` \|", CATALOGUE.read_text(), flags=re.MULTILINE)
    assert len(rows) == len(set(rows)) >= 25
    assert set(rows) == set(CASES) | set(ACCEPTED_ROWS)
