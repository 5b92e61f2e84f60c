"""`--crop random` under resume: the crops are drawn per visit from (seed, epoch, index), so a run stopped and
resumed mid-epoch reaches the weights of an uninterrupted one."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from tiny_training import differing_tensors, make_initial_weights, train_in_stops


def landscape_data(folder: Path, count: int) -> Path:
    """`count` pairs of random 96x64 px images (wider than high, so a 64 px crop has 33 positions)."""
    rng = np.random.default_rng(0)
    lines = []
    for index in range(count):
        for kind in ("source", "target"):
            (folder / kind).mkdir(parents=True, exist_ok=True)
            assert cv2.imwrite(str(folder / kind / f"{index}.png"), rng.integers(0, 256, (64, 96, 3), np.uint8))
        lines.append(json.dumps({"source": f"source/{index}.png", "target": f"target/{index}.png", "prompt": "p"}))
    (folder / "prompt.json").write_text("\n".join(lines) + "\n")
    return folder


@pytest.mark.slow
def test_a_resumed_run_with_random_crops_continues_like_one_run(tmp_path: Path) -> None:
    initial = make_initial_weights(tmp_path / "control_tiny_ini.ckpt")
    data = landscape_data(tmp_path / "data", 6)
    extra = ("--resolution", "64", "--crop", "random")
    want = train_in_stops(initial, data, tmp_path / "straight", [4], *extra)
    got = train_in_stops(initial, data, tmp_path / "stopped", [2, 4], *extra)  # stops in the middle of epoch 0
    assert got["global_step"] == want["global_step"] == 4
    assert differing_tensors(got, want) == []
