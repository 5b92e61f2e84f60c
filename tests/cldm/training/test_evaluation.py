"""The evaluation during training (`--eval_every_n_steps`) on the tiny config, on the CPU."""
from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest
import torch

import tutorial_train
from cldm.data.data_order import Visit
from cldm.data.dataset import MyDataset
from ldm.checkpoint import read_checkpoint

from tiny_training import make_data, make_initial_weights, train_args


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> tuple[Path, Path, Path]:
    """Initial weights, a training data set of 6 items and a validation data set of 2."""
    root = tmp_path_factory.mktemp("evaluation")
    return (make_initial_weights(root / "control_tiny_ini.ckpt"), make_data(root / "train", 6),
            make_data(root / "val", 2))


def _train(initial: Path, data: Path, root: Path, *extra: str) -> Path:
    argv = train_args(initial, data, root, "--max_steps", "4", "--logger_freq", "100", "--checkpoint_every_n_steps",
                      "4", *extra)
    assert tutorial_train.main(argv) == 0
    return root


def _val_rows(root: Path, metrics: Path | None = None) -> dict[int, dict[str, str]]:
    """The rows of the run's (only) CSV log, or of `metrics`, that hold val/control_f1, by step."""
    rows = csv.DictReader(open(metrics or next((root / "lightning_logs").rglob("metrics.csv"))))
    return {int(row["step"]): row for row in rows if row.get("val/control_f1")}


def test_evaluation_logs_draws_and_leaves_the_weights_as_without_it(inputs, tmp_path):
    initial, data, val = inputs
    evaluated = _train(initial, data, tmp_path / "evaluated", "--eval_every_n_steps", "2", "--val_data_root",
                       str(val), "--eval_ddim_steps", "2", "--keep_best_control")
    plain = _train(initial, data, tmp_path / "plain")

    # Sampling, scoring, logging, plotting and saving the best checkpoint move no random stream and no weight.
    weights = read_checkpoint(evaluated / "checkpoints" / "last.ckpt")["state_dict"]
    expected = read_checkpoint(plain / "checkpoints" / "last.ckpt")["state_dict"]
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[key], expected[key]) for key in expected)

    rows = _val_rows(evaluated)  # before training, every 2 steps; both metrics of Fill50K items
    assert sorted(rows) == [0, 2, 4]
    assert all(0.0 <= float(row["val/control_f1"]) <= 1.0 and float(row["val/colour_error"]) >= 0.0
               for row in rows.values())
    assert sorted(path.name for path in (evaluated / "image_log" / "val").iterdir()) == [
        "step-0000000.png", "step-0000002.png", "step-0000004.png"]
    assert (evaluated / "run.png").stat().st_size > 0
    assert not (plain / "run.png").exists() and not (plain / "image_log" / "val").exists()

    best = read_checkpoint(evaluated / "checkpoints" / "best-control.ckpt")
    best_step = max(rows, key=lambda step: (float(rows[step]["val/control_f1"]), -step))
    assert best["global_step"] == best_step


def test_held_out_items_are_never_trained_on(inputs, tmp_path, monkeypatch, caplog):
    initial, data, _ = inputs
    visited, evaluated = [], []
    get_item = MyDataset.__getitem__

    def recording(self, idx):
        (visited if isinstance(idx, Visit) else evaluated).append(idx.index if isinstance(idx, Visit) else idx)
        return get_item(self, idx)

    monkeypatch.setattr(MyDataset, "__getitem__", recording)
    with caplog.at_level(logging.INFO):
        root = _train(initial, data, tmp_path / "run", "--eval_every_n_steps", "4", "--val_items", "2",
                      "--eval_ddim_steps", "1")

    assert "holding out the last 2 of 6 items of" in caplog.text and "training on 4" in caplog.text
    assert sorted(set(visited)) == [0, 1, 2, 3]  # 4 steps of 2: two epochs of the 4 training items
    assert set(evaluated) == {4, 5}  # the validation set reads the held-out items alone
    assert sorted(_val_rows(root)) == [0, 4]


def test_a_resumed_run_evaluates_on_schedule_and_at_its_last_step(inputs, tmp_path):
    initial, data, val = inputs
    root = tmp_path / "run"
    evaluation = ["--eval_every_n_steps", "2", "--val_data_root", str(val), "--eval_ddim_steps", "1"]
    argv = train_args(initial, data, root, "--logger_freq", "100", *evaluation)
    assert tutorial_train.main([*argv, "--max_steps", "3"]) == 0
    assert tutorial_train.main([*argv, "--max_steps", "5", "--resume_from_checkpoint", "last"]) == 0

    versions = sorted((root / "lightning_logs").glob("version_*/metrics.csv"))
    steps = [sorted(_val_rows(root, path)) for path in versions]
    assert steps == [[0, 2, 3], [4, 5]]  # the last step of each run too; the resumed run does not redo step 3
    assert sorted(path.name for path in (root / "image_log" / "val").iterdir()) == [
        f"step-000000{step}.png" for step in (0, 2, 3, 4, 5)]
