"""tutorial_train.py --data_shards: the tiny config trains from shards, and a run stopped at a shard boundary and
resumed reaches exactly the weights of an uninterrupted one (one reader, no shuffle buffer); stopped inside a shard,
it continues and finishes its steps. Two DDP ranks on the CPU, with two DataLoader workers each, train on disjoint items
that cover the epoch."""
from __future__ import annotations

from pathlib import Path

import pytest

import tutorial_train
from cldm.data.shards import make_shards
from ldm.checkpoint import read_checkpoint
from tests.cldm.training.test_geometry_training import random_data
from tiny_training import differing_tensors, make_data, make_initial_weights, recorded_ddp_batches, train_args

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("shard_training")
    data = make_data(tmp / "data", 8)
    make_shards(str(data), tmp / "shards", 2)
    return make_initial_weights(tmp / "initial.ckpt"), tmp / "shards"


def _train_in_stops(inputs: tuple[Path, Path], root: Path, stops: list[int], *extra: str) -> dict:
    initial, shards = inputs
    for index, max_steps in enumerate(stops):
        argv = train_args(initial, shards, root, "--max_steps", str(max_steps), "--logger_freq", "1000",
                          "--shuffle_buffer", "1", "--prompt_dropout", "0.5", *extra,
                          *(("--resume_from_checkpoint", "last") if index else ()), data_flag="--data_shards")
        assert tutorial_train.main(argv) == 0
    return read_checkpoint(root / "checkpoints" / "last.ckpt", mmap=False)


def test_resumed_at_a_shard_boundary_equals_an_uninterrupted_run(inputs, tmp_path: Path) -> None:
    # 8 items in shards of 2, batches of 2: a step per shard, 4 steps per epoch; the stop at step 2 is mid-epoch.
    whole = _train_in_stops(inputs, tmp_path / "whole", [6])
    stopped = _train_in_stops(inputs, tmp_path / "stopped", [2, 6])
    assert whole["global_step"] == stopped["global_step"] == 6
    assert differing_tensors(stopped, whole) == []


def test_resumed_inside_a_shard_continues(inputs, tmp_path: Path) -> None:
    resumed = _train_in_stops(inputs, tmp_path / "run", [1, 3], "--batch_size", "1")
    assert resumed["global_step"] == 3


def test_two_ddp_ranks_with_two_workers_each_train_on_disjoint_items_covering_the_epoch(tmp_path: Path) -> None:
    data = random_data(tmp_path / "data", [(64, 64)] * 8)
    make_shards(str(data), tmp_path / "shards", 1)  # 8 shards for 2 ranks x 2 workers: 2 batches of 2 per rank
    batches = recorded_ddp_batches(tmp_path, "--data_shards", str(tmp_path / "shards"), "--num_workers", "2")
    prompts = {rank: [p for batch in batches if batch["rank"] == rank for p in batch["prompts"]] for rank in (0, 1)}
    assert len(batches) == 4 and len(prompts[0]) == len(prompts[1]) == 4
    assert sorted(prompts[0] + prompts[1]) == sorted(f"p{index}" for index in range(8))
