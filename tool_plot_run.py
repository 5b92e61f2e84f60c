"""Draw a training run's loss, learning rate and validation metrics against the step into one PNG.

    python tool_plot_run.py ./image_log_run            # writes ./image_log_run/run.png
    python tool_plot_run.py RUN_DIR --out curves.png --smoothing 0.9

RUN_DIR is the run's --default_root_dir; the curves come from RUN_DIR/lightning_logs/version_*/metrics.csv, the
versions of a resumed run joined by step.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cldm import flags
from cldm.cli import add_debug_argument, run
from cldm.evaluation.run_plot import DEFAULT_SMOOTHING, PLOT_FILENAME, plot_run


def build_parser() -> argparse.ArgumentParser:
    """Command line of the run plot."""
    parser = argparse.ArgumentParser(
        prog="tool_plot_run.py",
        description="Draw the loss (raw and smoothed), the learning rate and each validation metric of a training "
                    "run against the step, from its CSV logs, into one PNG.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("run_dir", type=flags.path, help="the training run's folder (its --default_root_dir)")
    parser.add_argument("--out", type=flags.path, default=None, help=f"the PNG to write (replaced if it exists); default "
                        f"RUN_DIR/{PLOT_FILENAME}")
    parser.add_argument("--smoothing", type=float, default=DEFAULT_SMOOTHING,
                        help="weight of the loss's exponential moving average per logged point, in [0, 1); "
                             "0 draws the raw loss only")
    add_debug_argument(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Write the picture of one run."""
    args = build_parser().parse_args(argv)
    plot_run(args.run_dir, args.out, smoothing=args.smoothing)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
