"""The picture of a run: reading and joining the CSV logs (apart from drawing), smoothing, and the PNG written."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cldm.evaluation.run_plot import (
    RAW_POINTS_LIMIT,
    Series,
    draw,
    plot_run,
    read_metrics,
    read_version,
    select_curves,
    smooth,
    value_range,
)
from run_logs import picture_size, training_rows, write_log

VALIDATION = {"val/control_f1": 0.5, "val/colour_error": 20.0, "val/ssim": 0.7}


def validation_row(step: int, offset: float = 0.0) -> dict[str, float]:
    return {"step": step, **{name: value + offset for name, value in VALIDATION.items()}}


def test_a_log_is_read_by_column_and_step_without_its_empty_cells(tmp_path):
    path = write_log(tmp_path, 0, [*training_rows(range(3), loss=lambda step: 10.0 + step), validation_row(2)])
    with open(path, "a") as file:  # columns: epoch, lr-AdamW, step, train/loss_simple_step, ...
        file.write(",,3,nan\n")  # a NaN cell
        file.write(",1e-0")  # a row cut short by a crash, before its step

    metrics = read_version(path)

    assert set(metrics) == {"epoch", "lr-AdamW", "train/samples", "train/loss_step", "train/loss_simple_step",
                            *VALIDATION}
    np.testing.assert_array_equal(metrics["train/loss_step"].steps, [0, 1, 2])
    np.testing.assert_array_equal(metrics["train/loss_step"].values, [10.0, 11.0, 12.0])
    np.testing.assert_array_equal(metrics["lr-AdamW"].steps, [0, 1, 2])
    np.testing.assert_array_equal(metrics["train/loss_simple_step"].steps, [0, 1, 2])
    np.testing.assert_array_equal(metrics["val/ssim"].steps, [2])
    assert metrics["val/ssim"].values.tolist() == [0.7]


def test_the_versions_of_a_resumed_run_are_joined_by_step_the_later_winning(tmp_path):
    # version_0 logged steps 0-9 and validated at 4 and 8; the run resumed from its step-6 checkpoint.
    write_log(tmp_path, 0, [*training_rows(range(10), loss=float), validation_row(4), validation_row(8)])
    write_log(tmp_path, 1, [*training_rows(range(6, 15), loss=lambda step: 100.0 + step, lr=2e-5),
                            validation_row(12, offset=1.0)])

    metrics = read_metrics(tmp_path)

    loss = metrics["train/loss_step"]
    np.testing.assert_array_equal(loss.steps, np.arange(15))
    np.testing.assert_array_equal(loss.values, [0, 1, 2, 3, 4, 5, 106, 107, 108, 109, 110, 111, 112, 113, 114])
    np.testing.assert_array_equal(metrics["lr-AdamW"].values, [1e-5] * 6 + [2e-5] * 9)
    f1 = metrics["val/control_f1"]  # step 8 was redone after the resume, so its old value is gone
    np.testing.assert_array_equal(f1.steps, [4, 12])
    np.testing.assert_array_equal(f1.values, [0.5, 1.5])


def test_versions_are_joined_in_the_order_of_their_number(tmp_path):
    write_log(tmp_path, 2, training_rows(range(10), loss=float))
    write_log(tmp_path, 10, training_rows(range(5, 7), loss=lambda step: -1.0))
    (tmp_path / "lightning_logs" / "version_11").mkdir()  # a run that stopped before it logged anything

    loss = read_metrics(tmp_path)["train/loss_step"]

    np.testing.assert_array_equal(loss.steps, np.arange(7))
    np.testing.assert_array_equal(loss.values, [0, 1, 2, 3, 4, -1, -1])


def test_the_curves_are_the_loss_the_learning_rates_and_every_validation_metric(tmp_path):
    write_log(tmp_path, 0, [*training_rows(range(3)), {"step": 2, "lr-AdamW/pg1": 1e-6}, validation_row(2)])

    curves = select_curves(read_metrics(tmp_path))

    assert curves.loss_name == "train/loss_step"
    assert list(curves.learning_rates) == ["lr-AdamW", "lr-AdamW/pg1"]
    assert list(curves.validation) == ["val/colour_error", "val/control_f1", "val/ssim"]
    assert curves.panel_count == 5


def test_a_curve_that_was_not_logged_has_no_panel(tmp_path):
    write_log(tmp_path, 0, [{"step": step, "train/loss_simple": 1.0} for step in range(4)])

    curves = select_curves(read_metrics(tmp_path))

    assert (curves.loss_name, curves.learning_rates, curves.validation, curves.panel_count) == \
        ("train/loss_simple", {}, {}, 1)
    assert plot_run(tmp_path).exists()
    assert Image.open(tmp_path / "run.png").size == picture_size(1)


def test_a_vae_run_shows_its_total_loss(tmp_path):
    write_log(tmp_path, 0, [{"step": step, "train/total_loss_step": 1.0, "train/rec_loss_step": 0.9}
                            for step in range(4)])

    assert select_curves(read_metrics(tmp_path)).loss_name == "train/total_loss_step"


def test_smoothing_is_a_bias_corrected_exponential_moving_average():
    values = np.array([0.0, 1.0, 1.0])
    np.testing.assert_array_equal(smooth(values, 0.0), values)
    # m = 0.5 * m + 0.5 * x: m_1 = 0, m_2 = 0.5, m_3 = 0.75; divided by 1 - 0.5^t: 0, 0.5 / 0.75, 0.75 / 0.875
    np.testing.assert_allclose(smooth(values, 0.5), [0.0, 2 / 3, 6 / 7])
    np.testing.assert_allclose(smooth(np.full(50, 3.0), 0.98), np.full(50, 3.0))


def test_each_panel_shows_its_curve_against_the_step(tmp_path):
    write_log(tmp_path, 0, [*training_rows(range(4), loss=float), validation_row(1), validation_row(3, offset=1.0)])

    figure = draw(select_curves(read_metrics(tmp_path)), "run", smoothing=0.5)

    assert [axes.get_title() for axes in figure.axes] == [
        "Training loss", "Learning rate", "Validation: val/colour_error", "Validation: val/control_f1",
        "Validation: val/ssim"]
    raw, smoothed = figure.axes[0].get_lines()
    np.testing.assert_array_equal(raw.get_ydata(), [0, 1, 2, 3])
    np.testing.assert_allclose(smoothed.get_ydata(), smooth(np.arange(4.0), 0.5))
    f1 = figure.axes[3].get_lines()[0]
    assert f1.get_marker() == "o"
    np.testing.assert_array_equal(f1.get_xdata(), [1, 3])
    np.testing.assert_array_equal(f1.get_ydata(), [0.5, 1.5])
    assert figure.axes[-1].get_xlabel() == "step"



def test_a_long_raw_loss_is_drawn_as_its_range_per_run_of_points(tmp_path):
    steps, lows, highs = value_range(Series(np.arange(10, 20), np.array([5.0, 1, 2, 3, 9, 4, 0, 6, 7, 8])), 3)
    # runs of points 0-2, 3-5, 6-9 (steps 10-12, 13-15, 16-19), closed at the last step
    np.testing.assert_array_equal(steps, [10, 13, 16, 19])
    np.testing.assert_array_equal(lows, [1, 3, 0, 0])
    np.testing.assert_array_equal(highs, [5, 9, 8, 8])

    write_log(tmp_path, 0, training_rows(range(RAW_POINTS_LIMIT + 1)))
    loss_panel = draw(select_curves(read_metrics(tmp_path)), "run").axes[0]
    (band,), (ema,) = loss_panel.collections, loss_panel.get_lines()
    assert band.get_label() == "train/loss_step (range)" and len(ema.get_xdata()) == RAW_POINTS_LIMIT + 1

def test_the_picture_is_a_png_of_one_panel_height_per_curve_written_atomically(tmp_path):
    write_log(tmp_path, 0, [*training_rows(range(20)), validation_row(10), validation_row(19)])
    (tmp_path / "run.png").write_bytes(b"the picture of the last evaluation")

    out = plot_run(tmp_path)

    assert out == tmp_path / "run.png"
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == picture_size(5)
        image.verify()
    assert [path.name for path in tmp_path.iterdir() if path.is_file()] == ["run.png"]  # no temporary file left


def test_a_run_without_metrics_yet_is_told_to_train_first(tmp_path):
    write_log(tmp_path, 0, [])  # the header only: the logger started, nothing was logged yet

    with pytest.raises(ValueError, match=f"no metrics in '{tmp_path}' yet; train first"):
        plot_run(tmp_path)
    assert not (tmp_path / "run.png").exists()
