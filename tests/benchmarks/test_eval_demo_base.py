"""The demo-base evaluation finds Fill50K's circles and colours in images that have them, and none in images that
do not; it runs end to end on the shipped base (no figure asserted)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from benchmarks import eval_demo_base
from cldm.data.dataset import MyDataset
from cldm.data.fill50k import generate_fill50k
from cldm.evaluation.evaluate import dataset_items
from tests.helpers.paths import MODELS


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data") / "fill50k"
    generate_fill50k(folder, count=12, size=64, seed=3, show_progress=False)
    return dataset_items(MyDataset(folder), range(12))


def test_the_targets_own_circles_are_found_with_their_colours(items) -> None:
    scores = eval_demo_base.sample_scores([item.target for item in items], [item.prompt for item in items])
    assert scores["circle detected"] == 1.0
    assert scores["colour_error"] == pytest.approx(0.0, abs=1.0)
    assert scores["centre x std (px)"] > 1.0 and scores["centre y std (px)"] > 1.0


def test_flat_images_and_noise_hold_no_circle(items) -> None:
    rng = np.random.default_rng(0)
    flat = np.full((64, 64, 3), 128, np.uint8)
    noise = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert eval_demo_base.detect_circle(flat) is None
    assert eval_demo_base.detect_circle(noise) is None
    assert eval_demo_base.sample_scores([flat, noise], [items[0].prompt] * 2) == {"circle detected": 0.0}


def test_swapped_colours_are_an_error(items) -> None:
    swapped = [item.target[..., ::-1].copy() for item in items]  # RGB -> BGR changes every named hue but grey
    scores = eval_demo_base.sample_scores(swapped, [item.prompt for item in items])
    assert scores["circle detected"] == 1.0 and scores["colour_error"] > 10.0


@pytest.mark.slow
def test_the_benchmark_prints_its_tables_for_the_shipped_base(capsys) -> None:
    eval_demo_base.main(["--base", str(MODELS / "demo_sd.safetensors"), "--config", str(MODELS / "cldm_demo.yaml"),
                         "--count", "4", "--ddim_steps", "2", "--guidance_scales", "1", "9"])
    lines = capsys.readouterr().out.splitlines()
    rows = [re.fullmatch(r"\| (.+?) \| (.+) \|", line).groups() for line in lines if line.startswith("| ")]
    names = [name for name, _ in rows]
    assert names == ["VAE reconstructions", "control_f1", "control_precision", "control_recall", "colour_error",
                     "circle_colour_error", "background_colour_error", "samples, guidance scale",
                     "circle detected", "colour_error", "circle_colour_error", "background_colour_error",
                     "centre x std (px)", "centre y std (px)"]
    assert dict(rows)["samples, guidance scale"] == "1 | 9"
    assert 0.0 <= float(dict(rows)["control_f1"]) <= 1.0
