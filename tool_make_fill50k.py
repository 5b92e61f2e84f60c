"""Generate the Fill50K tutorial data set offline, in the format of training/fill50k.zip.

    python tool_make_fill50k.py --out training/fill50k --count 50000 --size 512 --seed 0 --workers 2
"""
from __future__ import annotations

import argparse
import os
import sys

from cldm import flags
from cldm.cli import add_debug_argument, run
from cldm.data.fill50k import generate_fill50k


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags; the defaults reproduce the published data set's size and format."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=flags.path, default="training/fill50k", help="data set folder to create")
    parser.add_argument("--count", type=int, default=50_000, help="number of (source, target, prompt) items")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (a multiple of 8, at least 64)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same bytes")
    parser.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, flags.MAX_PROCESSES),
                        help="processes drawing and writing")
    parser.add_argument("--force", action="store_true",
                        help="replace --out if this tool made it (never another folder)")
    parser.add_argument("--quiet", action="store_true", help="hide the progress bar")
    add_debug_argument(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the generator; `cldm.cli.run` turns its errors into one line and exit code 2."""
    args = build_parser().parse_args(argv)
    generate_fill50k(args.out, args.count, args.size, args.seed, args.workers, args.force,
                     show_progress=not args.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
