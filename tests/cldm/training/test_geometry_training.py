"""`--crop random` and `--buckets` in training: the crops are drawn per visit from (seed, epoch, index) and the
bucket batches are cut from the per-epoch order, so a run stopped and resumed mid-epoch reaches the weights of an
uninterrupted one; two DDP ranks on the CPU train on disjoint batches of one size each that cover the epoch."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from tiny_training import differing_tensors, make_initial_weights, recorded_ddp_batches, train_in_stops

# At --resolution 128 the buckets are 64x256, 128x128 and 256x64.
MIXED_SIZES = [(128, 128), (200, 50), (150, 150), (50, 210), (256, 64), (100, 100)]


def random_data(folder: Path, sizes: list[tuple[int, int]]) -> Path:
    """Pairs of random images of the (width, height) `sizes`."""
    rng = np.random.default_rng(0)
    lines = []
    for index, (width, height) in enumerate(sizes):
        for kind in ("source", "target"):
            (folder / kind).mkdir(parents=True, exist_ok=True)
            image = rng.integers(0, 256, (height, width, 3), np.uint8)
            assert cv2.imwrite(str(folder / kind / f"{index}.png"), image)
        lines.append(json.dumps({"source": f"source/{index}.png", "target": f"target/{index}.png",
                                 "prompt": f"p{index}"}))
    (folder / "prompt.json").write_text("\n".join(lines) + "\n")
    return folder


@pytest.mark.slow
def test_a_resumed_run_with_random_crops_continues_like_one_run(tmp_path: Path) -> None:
    initial = make_initial_weights(tmp_path / "control_tiny_ini.ckpt")
    data = random_data(tmp_path / "data", [(96, 64)] * 6)  # a 64 px crop has 33 positions
    extra = ("--resolution", "64", "--crop", "random")
    want = train_in_stops(initial, data, tmp_path / "straight", [4], *extra)
    got = train_in_stops(initial, data, tmp_path / "stopped", [2, 4], *extra)  # stops in the middle of epoch 0
    assert got["global_step"] == want["global_step"] == 4
    assert differing_tensors(got, want) == []


@pytest.mark.slow
def test_a_resumed_run_with_buckets_continues_like_one_run(tmp_path: Path) -> None:
    initial = make_initial_weights(tmp_path / "control_tiny_ini.ckpt")
    data = random_data(tmp_path / "data", MIXED_SIZES)  # in batches of 2, an epoch has 4 batches
    extra = ("--resolution", "128", "--buckets")
    want = train_in_stops(initial, data, tmp_path / "straight", [5], *extra)
    got = train_in_stops(initial, data, tmp_path / "stopped", [2, 5], *extra)  # in epoch 0, then 1 batch into epoch 1
    assert got["global_step"] == want["global_step"] == 5
    assert got["epoch"] == want["epoch"]
    assert differing_tensors(got, want) == []


@pytest.mark.slow
def test_two_ddp_ranks_train_on_disjoint_batches_of_one_size_covering_the_epoch(tmp_path: Path) -> None:
    data = random_data(tmp_path / "data", MIXED_SIZES + [(64, 256), (128, 128)])  # 2 + 1 + 1 batches of 2: 2 per rank
    batches = recorded_ddp_batches(tmp_path, "--data_root", str(data), "--resolution", "128", "--buckets")
    prompts = {rank: [p for batch in batches if batch["rank"] == rank for p in batch["prompts"]] for rank in (0, 1)}
    assert len(batches) == 4 and {batch["rank"] for batch in batches} == {0, 1}
    assert not set(prompts[0]) & set(prompts[1])
    assert sorted(prompts[0] + prompts[1]) == sorted(f"p{index}" for index in range(8))
    # (height, width) of each item's bucket: square, wide or tall.
    sizes = {f"p{index}": (128, 128) if w == h else (64, 256) if w > h else (256, 64)
             for index, (w, h) in enumerate(MIXED_SIZES + [(64, 256), (128, 128)])}
    for batch in batches:
        assert {sizes[prompt] for prompt in batch["prompts"]} == {tuple(batch["size"])}
