"""tool_eval_control.py on the tiny config: the table, the per-item JSON, the grid, the same numbers for the same
seed, and `--images` scoring images written elsewhere to the same numbers."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

import tool_eval_control
from cldm.cli import run
from cldm.evaluation.eval_control import held_out_indices
from tests.helpers.paths import TINY_CONFIG
from tiny_training import make_data, make_initial_weights

METRICS = ["control_precision", "control_recall", "control_f1", "circle_colour_error", "background_colour_error",
           "colour_error"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("eval_tool")
    return {"data": make_data(folder / "fill", 5), "ckpt": make_initial_weights(folder / "control_tiny_ini.ckpt")}


def _evaluate(files, tmp_path: Path, name: str, *extra: str, capsys) -> tuple[str, list[dict]]:
    argv = ["--config", str(TINY_CONFIG), "--data_root", str(files["data"]), "--items", "3", "--ddim_steps", "2",
            "--device", "cpu", "--json", str(tmp_path / f"{name}.json"), *extra]
    assert run(tool_eval_control.main, argv) == 0, capsys.readouterr().err
    return capsys.readouterr().out, json.loads((tmp_path / f"{name}.json").read_text())


def test_table_json_and_grid(files, tmp_path, capsys):
    table, records = _evaluate(files, tmp_path, "a", "--ckpt", str(files["ckpt"]), "--grid", str(tmp_path / "a.png"),
                               capsys=capsys)
    lines = table.strip().splitlines()
    assert lines[0].split() == ["metric", "mean", "std", "min", "max", "items"]
    assert [line.split()[0] for line in lines[1:]] == METRICS
    number = r"-?\d+\.\d{4}"
    assert all(re.fullmatch(rf"\w+(\s+{number}){{4}}\s+3", line) for line in lines[1:]), lines
    # the last 3 of the 5 items, one record each, with every metric
    assert [record["index"] for record in records] == [2, 3, 4]
    assert all(set(METRICS) <= set(record) for record in records)
    mean_f1 = float(lines[1 + METRICS.index("control_f1")].split()[1])
    assert mean_f1 == pytest.approx(np.mean([record["control_f1"] for record in records]), abs=1e-4)
    assert Image.open(tmp_path / "a.png").size == (6 * 64, 64)  # 3 (hint, sample) pairs in one row


def test_the_same_seed_gives_the_same_numbers(files, tmp_path, capsys):
    ckpt = ["--ckpt", str(files["ckpt"])]
    _, first = _evaluate(files, tmp_path, "first", *ckpt, capsys=capsys)
    _, again = _evaluate(files, tmp_path, "again", *ckpt, capsys=capsys)
    _, one_by_one = _evaluate(files, tmp_path, "one_by_one", *ckpt, "--batch_size", "1", capsys=capsys)
    _, other = _evaluate(files, tmp_path, "other", *ckpt, "--seed", "1", capsys=capsys)
    assert first == again
    # The same noise whatever the batch; other batch shapes round differently, by at most one grey level.
    for a, b in zip(first, one_by_one):
        assert all(a[name] == pytest.approx(b[name], abs=0.01) for name in METRICS), (a, b)
    assert first != other


def test_images_generated_elsewhere_are_matched_by_index(files, tmp_path, capsys):
    """Scoring the data set's own targets, saved as <index>.png, gives F1 near 1 and colour error near 0."""
    images = tmp_path / "generated"
    images.mkdir()
    for index in (2, 3, 4):
        shutil.copy(files["data"] / "target" / f"{index}.png", images / f"{index}.png")
    cv2.imwrite(str(images / "1.png"), np.zeros((8, 8, 3), np.uint8))  # not among the last 3: ignored
    _, records = _evaluate(files, tmp_path, "images", "--images", str(images), capsys=capsys)
    assert [record["index"] for record in records] == [2, 3, 4]
    assert all(record["control_f1"] > 0.95 and record["colour_error"] < 0.5 for record in records)


def test_held_out_indices_are_the_last_items():
    assert held_out_indices(10, 3, "p") == range(7, 10)
    assert held_out_indices(3, 3, "p") == range(0, 3)
