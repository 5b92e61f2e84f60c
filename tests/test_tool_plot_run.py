"""tool_plot_run.py on the logs of a real tiny training run, resumed once."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import tool_plot_run
import tutorial_train
from cldm.cli import run
from cldm.evaluation.run_plot import read_metrics
from run_logs import picture_size
from tiny_training import make_data, make_initial_weights, train_args


@pytest.mark.slow
def test_the_tool_draws_a_resumed_tiny_run(tmp_path, caplog):
    initial, data, root = make_initial_weights(tmp_path / "init.ckpt"), make_data(tmp_path / "data", 4), tmp_path / "run"
    argv = train_args(initial, data, root, "--logger_freq", "1000", "--checkpoint_every_n_steps", "2")
    assert tutorial_train.main([*argv, "--max_steps", "3"]) == 0
    assert tutorial_train.main([*argv, "--max_steps", "5", "--resume_from_checkpoint",
                                str(root / "checkpoints" / "step-0000002.ckpt")]) == 0

    with caplog.at_level("INFO"):
        assert run(tool_plot_run.main, [str(root), "--out", str(tmp_path / "curves.png")]) == 0

    # Lightning's own column names, the two versions joined: steps 0-1 from the first, 2-4 from the resumed one.
    metrics = read_metrics(root)
    np.testing.assert_array_equal(metrics["train/loss_step"].steps, np.arange(5))
    np.testing.assert_array_equal(metrics["lr-AdamW"].steps, np.arange(5))
    assert f"Wrote {tmp_path / 'curves.png'} (up to step 4: train/loss_step, lr-AdamW)" in caplog.messages
    with Image.open(tmp_path / "curves.png") as image:  # the loss and the learning rate
        assert image.format == "PNG"
        assert image.size == picture_size(2)
