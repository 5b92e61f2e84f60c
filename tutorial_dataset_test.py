"""Print the data set's length, one item's prompt and the shapes of its two images, as the original tutorial."""
from __future__ import annotations

import argparse
import sys

from cldm import flags
from tutorial_dataset import MyDataset


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--root", type=flags.path, default="./training/fill50k",
                        help="data set folder holding prompt.json")
    parser.add_argument("--index", type=flags.non_negative_int, default=1234, help="item to print")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Load the data set at --root and print item --index; returns the exit code (2 for user errors)."""
    args = build_parser().parse_args(argv)
    try:
        dataset = MyDataset(root=args.root)
        if not 0 <= args.index < len(dataset):
            raise ValueError(f"--index must be below the data set's length {len(dataset)}, got {args.index}.")
        item = dataset[args.index]
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(len(dataset))
    print(item["txt"])
    print(item["jpg"].shape)
    print(item["hint"].shape)
    return 0


if __name__ == "__main__":
    sys.exit(main())
