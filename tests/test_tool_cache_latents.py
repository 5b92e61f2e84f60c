"""tool_cache_latents.py and tutorial_train.py --latent_cache on the tiny config, on the CPU: the tool end to end,
and training and resuming with a cache. Bad inputs: the `cache-` and `train-cache-` rows of docs/bad_inputs.md."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import tool_cache_latents
import tutorial_train
from ldm.checkpoint import read_checkpoint
from cldm.cli import run
from cldm.data.latent_cache import MANIFEST_NAME, MOMENTS_NAME, read_manifest
from cldm.model import create_model, load_weights
from tiny_training import TINY_CONFIG, make_data, make_initial_weights, train_args


def _tool_args(initial: Path, data: Path, *extra: str) -> list[str]:
    return ["--config", str(TINY_CONFIG), "--resume_path", str(initial), "--data_root", str(data), "--batch_size", "4",
            "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """Initial weights, 8 items with a bfloat16 cache in the default place."""
    tmp = tmp_path_factory.mktemp("tool_cache")
    initial = make_initial_weights(tmp / "control_tiny_ini.ckpt")
    data = make_data(tmp / "fill8", 8)
    assert run(tool_cache_latents.main, _tool_args(initial, data)) == 0
    return dict(tmp=tmp, initial=initial, data=data)


def test_the_tool_writes_a_complete_cache_and_replaces_it_only_with_overwrite(setup, capsys) -> None:
    cache = setup["data"] / "latent_cache"
    assert sorted(os.listdir(cache)) == [MANIFEST_NAME, MOMENTS_NAME, "text_embeddings.npy"]
    manifest = read_manifest(cache)
    assert manifest["dtype"] == "bfloat16" and manifest["moments_shape"] == [8, 8, 8, 8]
    capsys.readouterr()

    assert run(tool_cache_latents.main, _tool_args(setup["initial"], setup["data"])) == 2
    assert "already exists; choose another name or pass --overwrite" in capsys.readouterr().err
    assert run(tool_cache_latents.main, _tool_args(setup["initial"], setup["data"], "--overwrite", "--dtype",
                                                   "float16")) == 0
    assert read_manifest(cache)["dtype"] == "float16"
    assert not [name for name in os.listdir(setup["data"]) if name.endswith(".tmp")]  # no temporary folder left
    assert run(tool_cache_latents.main, _tool_args(setup["initial"], setup["data"], "--overwrite")) == 0


def test_training_with_the_cache_logs_images_and_saves_every_weight(setup, tmp_path) -> None:
    root = tmp_path / "run"
    argv = train_args(setup["initial"], setup["data"], root, "--max_steps", "2", "--logger_freq", "1",
                      "--latent_cache", "--prompt_dropout", "0.5")
    assert run(tutorial_train.main, argv) == 0
    names = {name.split("_gs-")[0] for name in os.listdir(root / "image_log" / "train")}
    assert names == {"reconstruction", "control", "conditioning", "samples_cfg_scale_9.00"}
    model = create_model(TINY_CONFIG)  # the encoders' weights are in the checkpoint: it loads strictly
    checkpoint = read_checkpoint(root / "checkpoints" / "last.ckpt", mmap=False)
    load_weights(model, checkpoint["state_dict"], source="last.ckpt")


def test_a_resumed_run_with_the_cache_reaches_the_weights_of_an_uninterrupted_one(setup, tmp_path) -> None:
    # 8 items / batch 2: the first run stops at the end of epoch 0, the second goes on into epoch 1.
    common = ("--logger_freq", "1000", "--checkpoint_every_n_steps", "2", "--latent_cache", "--prompt_dropout", "0.5")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run(tutorial_train.main, train_args(setup["initial"], setup["data"], straight, "--max_steps", "6",
                                               *common)) == 0
    assert run(tutorial_train.main, train_args(setup["initial"], setup["data"], resumed, "--max_steps", "4",
                                               *common)) == 0
    assert run(tutorial_train.main, train_args(setup["initial"], setup["data"], resumed, "--max_steps", "6",
                                               *common, "--resume_from_checkpoint", "last")) == 0
    want = read_checkpoint(straight / "checkpoints" / "last.ckpt", mmap=False)
    got = read_checkpoint(resumed / "checkpoints" / "last.ckpt", mmap=False)
    assert got["global_step"] == want["global_step"] == 6
    for key, value in want["state_dict"].items():
        torch.testing.assert_close(got["state_dict"][key], value, rtol=0, atol=0)  # bitwise


def test_training_from_a_float32_cache_reaches_the_weights_of_training_from_the_images(setup, tmp_path) -> None:
    cache = tmp_path / "cache_float32"
    assert run(tool_cache_latents.main, _tool_args(setup["initial"], setup["data"], "--dtype", "float32", "--out",
                                                   str(cache))) == 0
    common = ("--max_steps", "3", "--logger_freq", "1000", "--prompt_dropout", "0.5")
    images, cached = tmp_path / "images", tmp_path / "cached"
    assert run(tutorial_train.main, train_args(setup["initial"], setup["data"], images, *common)) == 0
    assert run(tutorial_train.main, train_args(setup["initial"], setup["data"], cached, *common, "--latent_cache",
                                               str(cache))) == 0
    want = read_checkpoint(images / "checkpoints" / "last.ckpt", mmap=False)["state_dict"]
    got = read_checkpoint(cached / "checkpoints" / "last.ckpt", mmap=False)["state_dict"]
    worst = max(float((got[key] - value).abs().max()) for key, value in want.items() if value.is_floating_point())
    print(f"\n3 steps from a float32 cache vs from the images: max weight difference {worst:.3g}")
    assert worst == 0.0
