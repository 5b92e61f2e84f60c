"""Convert a data set folder (Fill50K `prompt.json` or image-folder `metadata.jsonl` layout) into WebDataset shards.

    python tool_make_shards.py --data_root ./training/fill50k --out ./training/fill50k_shards --shard_size 1000

The shards hold each image's original bytes; their members and `shards.json` are described in
`cldm/data/shards.py`. The output folder is written under a temporary name and renamed into place when complete.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from cldm import flags
from cldm.cli import add_debug_argument, run
from cldm.data.layouts import add_column_flags, columns_from
from cldm.data.shards import make_shards


def build_parser() -> argparse.ArgumentParser:
    """Command line of the shard writer."""
    parser = argparse.ArgumentParser(
        prog="tool_make_shards.py",
        description="Write a data set folder's items as WebDataset .tar shards, original image bytes unchanged.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data_root", type=flags.path, required=True,
                        help="data set folder: prompt.json or metadata.jsonl, and the images")
    add_column_flags(parser)
    parser.add_argument("--out", type=flags.path, required=True, help="shard folder to write")
    parser.add_argument("--shard_size", type=flags.positive_int, default=1000, help="items per shard")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing shard folder (never another "
                                                                 "folder)")
    add_debug_argument(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags and write the shards."""
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    manifest = make_shards(args.data_root, args.out, args.shard_size, overwrite=args.overwrite,
                           columns=columns_from(args))
    print(f"Wrote {manifest['count']} items of {args.data_root} as {len(manifest['shards'])} shards to {args.out} in "
          f"{time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
