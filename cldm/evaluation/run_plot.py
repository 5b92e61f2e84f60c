"""A picture of a training run: the loss, the learning rate and the validation metrics against the step, in one PNG.

Lightning's `CSVLogger` writes `RUN_DIR/lightning_logs/version_N/metrics.csv`: one row per logging call, so a row
fills a few columns and leaves the rest empty. A resumed run writes the next version folder and starts again at its
checkpoint's step, so everything the earlier versions logged from that step on was redone (or abandoned): the later
version wins from its first step on.
"""
from __future__ import annotations

import csv
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from cldm.checkpoints.atomic import atomic_path
from cldm.checkpoints.paths import check_output_path
from ldm.checkpoint import PathLike

logger = logging.getLogger(__name__)

LOGS_DIRNAME = "lightning_logs"
METRICS_FILENAME = "metrics.csv"
PLOT_FILENAME = "run.png"
_VERSION_DIRNAME = re.compile(r"^version_(\d+)$")

# The training loss, by preference: the optimised loss per step, then the original's other names for it, then a
# VAE's (AutoencoderKL.training_step, the first stage of tool_pretrain_tiny_sd.py).
LOSS_COLUMNS = ("train/loss_step", "train/loss", "train/loss_simple_step", "train/loss_simple",
                "train/total_loss_step", "train/total_loss")
LEARNING_RATE_PREFIX = "lr-"  # LearningRateMonitor: `lr-<optimizer class>`, `/pg<N>` per extra parameter group
VALIDATION_PREFIX = "val/"

DEFAULT_SMOOTHING = 0.98  # EMA weight per logged point: a time constant of about 50 points

# The picture: every panel as wide as the figure and PANEL_HEIGHT_INCHES high, stacked, saved at DPI.
FIGURE_WIDTH_INCHES = 10.0
PANEL_HEIGHT_INCHES = 2.5
DPI = 100
# A raw loss of more points than this is drawn as its range per run of consecutive points, one run per pixel column:
# the band a faint line through every point makes, drawn about 20 times faster (a 50,000-step loss).
RAW_POINTS_LIMIT = 2 * round(FIGURE_WIDTH_INCHES * DPI)


# ---------------------------------------------------------------------------------------------
# Reading the logs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Series:
    """One logged quantity: the steps it was logged at (ascending, each once) and its finite values there."""

    steps: np.ndarray  # (N,) int64
    values: np.ndarray  # (N,) float64

    def before(self, step: int) -> Series:
        """The part logged before `step`."""
        keep = self.steps < step
        return Series(self.steps[keep], self.values[keep])

    def then(self, later: Series) -> Series:
        """This series followed by `later`, which starts after it ends."""
        return Series(np.concatenate([self.steps, later.steps]), np.concatenate([self.values, later.values]))


def _number(cell: str | None) -> float:
    """A CSV cell as a float; empty, missing, non-numeric and non-finite cells are NaN."""
    try:
        value = float(cell)
    except (TypeError, ValueError):
        return math.nan
    return value if math.isfinite(value) else math.nan


def read_version(path: PathLike) -> dict[str, Series]:
    """Every column of one `metrics.csv` that holds a number somewhere, by step; where a column has several values
    at one step, the last row's. Rows without a step (a line cut short by a crash) are skipped."""
    with open(path, newline="", encoding="utf-8", errors="replace") as file:
        rows = csv.reader(file)
        header = next(rows, [])
        if "step" not in header:
            return {}
        step_column = header.index("step")
        by_column: dict[str, dict[int, float]] = {name: {} for name in header if name != "step"}
        for row in rows:
            step = _number(row[step_column] if step_column < len(row) else None)
            if math.isnan(step):
                continue
            for name, cell in zip(header, row):
                if cell and name != "step" and not math.isnan(value := _number(cell)):
                    by_column[name][int(step)] = value
    return {name: Series(np.array(sorted(values), dtype=np.int64),
                         np.array([values[step] for step in sorted(values)], dtype=np.float64))
            for name, values in by_column.items() if values}


def join_versions(versions: list[dict[str, Series]]) -> dict[str, Series]:
    """The logs of a run's versions, oldest first, joined by step: each version replaces everything the earlier
    ones logged from its first step on (a resumed run redoes the steps after its checkpoint)."""
    joined: dict[str, Series] = {}
    for version in versions:
        if not version:
            continue
        start = min(int(series.steps[0]) for series in version.values())
        joined = {name: series.before(start) for name, series in joined.items()}
        for name, series in version.items():
            joined[name] = joined[name].then(series) if name in joined else series
    return {name: series for name, series in joined.items() if len(series.steps)}


def version_folders(run_dir: PathLike) -> list[Path]:
    """`RUN_DIR/lightning_logs/version_N` folders in the order of N; refuses a folder that is not a run's."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder '{run_dir}' does not exist; pass the folder a training run wrote "
                                f"(its --default_root_dir)")
    logs = run_dir / LOGS_DIRNAME
    if not logs.is_dir():
        raise FileNotFoundError(f"run folder '{run_dir}' holds no {LOGS_DIRNAME} folder, so no training run wrote "
                                f"it; pass the folder a training run wrote (its --default_root_dir)")
    numbered = [(int(match.group(1)), path) for path in logs.iterdir()
                if (match := _VERSION_DIRNAME.match(path.name)) and path.is_dir()]
    return [path for _, path in sorted(numbered)]


def read_metrics(run_dir: PathLike) -> dict[str, Series]:
    """Every logged column of a run, all its versions joined by step (see `join_versions`)."""
    versions = [read_version(folder / METRICS_FILENAME) for folder in version_folders(run_dir)
                if (folder / METRICS_FILENAME).is_file()]
    return join_versions(versions)


# ---------------------------------------------------------------------------------------------
# Choosing and smoothing the curves
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunCurves:
    """What the picture shows; a curve that was not logged is absent, and so is its panel."""

    loss_name: str | None
    loss: Series | None
    learning_rates: dict[str, Series]
    validation: dict[str, Series]

    @property
    def panel_count(self) -> int:
        """One panel for the loss, one for all learning rates, one per validation metric."""
        return (self.loss is not None) + bool(self.learning_rates) + len(self.validation)

    def by_name(self) -> dict[str, Series]:
        """Every curve under its column name."""
        loss = {self.loss_name: self.loss} if self.loss is not None else {}
        return {**loss, **self.learning_rates, **self.validation}


def select_curves(metrics: dict[str, Series]) -> RunCurves:
    """The loss (the first of `LOSS_COLUMNS` that was logged), the learning rates (`lr-*`) and every `val/*`."""
    loss_name = next((name for name in LOSS_COLUMNS if name in metrics), None)
    return RunCurves(
        loss_name=loss_name,
        loss=metrics.get(loss_name),
        learning_rates={name: series for name, series in sorted(metrics.items())
                        if name.startswith(LEARNING_RATE_PREFIX)},
        validation={name: series for name, series in sorted(metrics.items()) if name.startswith(VALIDATION_PREFIX)},
    )


def smooth(values: np.ndarray, smoothing: float) -> np.ndarray:
    """Exponential moving average with bias correction, per logged point (TensorBoard's smoothing):
    m_t = a * m_{t-1} + (1 - a) * x_t with m_0 = 0, shown as m_t / (1 - a^t), a = `smoothing`; a = 0 is `values`."""
    averages = np.empty_like(values, dtype=np.float64)
    average = 0.0
    for t, value in enumerate(values, start=1):
        average = smoothing * average + (1.0 - smoothing) * value
        averages[t - 1] = average / (1.0 - smoothing**t)
    return averages


# ---------------------------------------------------------------------------------------------
# Drawing
# ---------------------------------------------------------------------------------------------


def value_range(series: Series, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The minimum and maximum of each of `bins` (at most the number of points) runs of consecutive points, as a
    step function: (steps, lows, highs), each run from its first step to the next run's, the last to the last step."""
    starts = np.linspace(0, len(series.steps), bins, endpoint=False).astype(int)
    lows, highs = np.minimum.reduceat(series.values, starts), np.maximum.reduceat(series.values, starts)
    return np.append(series.steps[starts], series.steps[-1]), np.append(lows, lows[-1]), np.append(highs, highs[-1])


def _draw_loss(axes, name: str, loss: Series, smoothing: float) -> None:
    """The raw loss (faint under its EMA, unless `smoothing` is 0), then its EMA."""
    raw = {"color": "C0", "alpha": 0.3 if smoothing else 1.0}
    if len(loss.steps) > RAW_POINTS_LIMIT:
        steps, lows, highs = value_range(loss, RAW_POINTS_LIMIT // 2)
        axes.fill_between(steps, lows, highs, step="post", linewidth=0, label=f"{name} (range)", **raw)
    else:
        axes.plot(loss.steps, loss.values, linewidth=0.6 if smoothing else 1.0, label=name, **raw)
    if smoothing:
        axes.plot(loss.steps, smooth(loss.values, smoothing), color="C0", linewidth=1.5,
                  label=f"EMA, smoothing {smoothing:g}")
    axes.set(title="Training loss", ylabel="loss")
    axes.legend(loc="upper right", fontsize="small")


def _draw_learning_rates(axes, learning_rates: dict[str, Series]) -> None:
    for name, series in learning_rates.items():
        axes.plot(series.steps, series.values, drawstyle="steps-post", label=name)
    axes.set(title="Learning rate", ylabel="learning rate")
    axes.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    axes.legend(loc="upper right", fontsize="small")


def _draw_validation(axes, name: str, series: Series) -> None:
    axes.plot(series.steps, series.values, marker="o", markersize=4)
    axes.set(title=f"Validation: {name}", ylabel=name.removeprefix(VALIDATION_PREFIX))


def draw(curves: RunCurves, title: str, smoothing: float = DEFAULT_SMOOTHING) -> Figure:
    """One panel per curve, stacked on a shared step axis: the loss, the learning rates, each validation metric."""
    figure = Figure(figsize=(FIGURE_WIDTH_INCHES, PANEL_HEIGHT_INCHES * curves.panel_count), dpi=DPI,
                    layout="constrained")
    FigureCanvasAgg(figure)
    panels = iter(figure.subplots(curves.panel_count, 1, sharex=True, squeeze=False)[:, 0])
    if curves.loss is not None:
        _draw_loss(next(panels), curves.loss_name, curves.loss, smoothing)
    if curves.learning_rates:
        _draw_learning_rates(next(panels), curves.learning_rates)
    for name, series in curves.validation.items():
        _draw_validation(next(panels), name, series)
    for axes in figure.axes:
        axes.grid(alpha=0.3)
    figure.axes[-1].set_xlabel("step")
    figure.axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.suptitle(title)
    return figure


def plot_run(run_dir: PathLike, out: PathLike | None = None, smoothing: float = DEFAULT_SMOOTHING) -> Path:
    """Draw a run's loss, learning rate and validation metrics from its CSV logs into the PNG `out` (default
    `RUN_DIR/run.png`), replacing it atomically; returns its path.

    Args:
        run_dir: the training run's folder (its `--default_root_dir`), holding `lightning_logs/`.
        out: the PNG to write; an existing file is replaced.
        smoothing: the loss's EMA weight per logged point, in [0, 1); 0 draws the raw loss only.
    """
    if not 0 <= smoothing < 1:
        raise ValueError(f"--smoothing must be in [0, 1) (0 draws the raw loss only), got {smoothing}")
    curves = select_curves(read_metrics(run_dir))
    if curves.panel_count == 0:
        raise ValueError(f"no metrics in '{run_dir}' yet; train first (the picture is drawn from "
                         f"{Path(run_dir) / LOGS_DIRNAME}/version_*/{METRICS_FILENAME})")
    out = Path(run_dir) / PLOT_FILENAME if out is None else Path(out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"output '{out}' must be a .png file; give a name ending in .png")
    check_output_path(out, overwrite=True)
    last_step = max(int(series.steps[-1]) for series in curves.by_name().values())
    figure = draw(curves, f"{Path(run_dir).absolute().name}: step {last_step}", smoothing)
    with atomic_path(out) as temporary:
        figure.savefig(temporary, format="png", dpi=DPI)
    logger.info("Wrote %s (up to step %d: %s)", out, last_step, ", ".join(curves.by_name()))
    return out
