"""Synthetic training logs in the shape Lightning's CSVLogger writes: sparse rows, one version folder per start."""
from __future__ import annotations

import csv
from pathlib import Path

from cldm.evaluation.run_plot import DPI, FIGURE_WIDTH_INCHES, PANEL_HEIGHT_INCHES


def write_log(run_dir: Path, version: int, rows: list[dict[str, float]]) -> Path:
    """`run_dir/lightning_logs/version_<version>/metrics.csv` with `rows`; a column a row lacks is left empty."""
    folder = run_dir / "lightning_logs" / f"version_{version}"
    folder.mkdir(parents=True)
    columns = sorted({name for row in rows for name in row})
    path = folder / "metrics.csv"
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return path


def training_rows(steps: range, loss=lambda step: 1.0 / (1 + step), lr: float = 1e-5) -> list[dict[str, float]]:
    """The rows a training step logs, as the job's CSV shows them: the learning rate, the throughput, the loss."""
    rows = []
    for step in steps:
        rows += [{"step": step, "lr-AdamW": lr}, {"step": step, "epoch": 0, "train/samples": 4 * (step + 1)},
                 {"step": step, "epoch": 0, "train/loss_step": loss(step), "train/loss_simple_step": loss(step)}]
    return rows


def picture_size(panels: int) -> tuple[int, int]:
    """The (width, height) in pixels of a run's picture with `panels` panels."""
    return round(FIGURE_WIDTH_INCHES * DPI), round(PANEL_HEIGHT_INCHES * DPI * panels)
