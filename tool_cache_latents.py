"""Encode a data set's targets with the VAE encoder and its prompts with the text encoder once, for training with
`--latent_cache` (which then runs neither encoder).

    python tool_cache_latents.py --config models/cldm_v15.yaml --resume_path ./models/control_sd15_ini.ckpt \\
        --data_root ./training/fill50k --resolution 512

The cache goes to `<data_root>/latent_cache/` (`--out`), written into a temporary folder beside it and renamed into
place when complete; its format is described in `cldm/data/latent_cache.py`.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from cldm import flags
from cldm.cli import add_debug_argument, run
from cldm.data.geometry import CROP_POSITIONS, RESIZE_MODES
from cldm.data.images import DEFAULT_MAX_IMAGE_PIXELS
from cldm.data.latent_cache import STORAGE_DTYPES
from cldm.data.latent_cache_writer import cache_latents
from cldm.data.layouts import add_column_flags, columns_from


def build_parser() -> argparse.ArgumentParser:
    """Command line of the cache writer; model and data flags mean what they mean for tutorial_train.py."""
    parser = argparse.ArgumentParser(
        prog="tool_cache_latents.py",
        description="Store the VAE posterior moments of a data set's targets and its prompts' text embeddings, for "
                    "tutorial_train.py --latent_cache.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", type=flags.path, default="./models/cldm_v15.yaml",
                        help="model config (yaml), as for training")
    parser.add_argument("--resume_path", type=flags.path, default="./models/control_sd15_ini.ckpt",
                        help="the weights training starts from (their VAE encoder and text encoder are used)")
    parser.add_argument("--data_root", type=flags.path, default="./training/fill50k",
                        help="data set folder: prompt.json or metadata.jsonl, and the images")
    add_column_flags(parser)
    parser.add_argument("--resolution", type=flags.positive_int, default=None,
                        help="resize the targets to this size, as training's --resolution (which must be the same)")
    parser.add_argument("--resize", default="crop", choices=RESIZE_MODES,
                        help="with --resolution: crop to a square or stretch, as training's --resize (which must be "
                             "the same)")
    parser.add_argument("--crop", default="center", choices=CROP_POSITIONS,
                        help="where to crop: only 'center' can be cached ('random' draws a new crop at every visit)")
    parser.add_argument("--max_image_pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                        help="refuse an image whose header gives more pixels than this (8192x8192), as training does")
    parser.add_argument("--dtype", default="bfloat16", choices=tuple(STORAGE_DTYPES),
                        help="stored dtype of the latent moments and the text embeddings")
    parser.add_argument("--batch_size", type=flags.positive_int, default=32, help="images or prompts encoded at once")
    parser.add_argument("--num_workers", type=flags.worker_count, default=None,
                        help="DataLoader worker processes reading images (default: 4 on a GPU, 0 on the CPU)")
    parser.add_argument("--device", type=flags.device, default=None,
                        help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--out", type=flags.path, default=None, help="cache folder (default: <data_root>/latent_cache)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing cache (never another folder)")
    add_debug_argument(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the flags and write the cache."""
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    out = cache_latents(args.config, args.resume_path, args.data_root, args.out, resolution=args.resolution,
                        dtype=args.dtype, batch_size=args.batch_size, num_workers=args.num_workers,
                        device=args.device, overwrite=args.overwrite, max_image_pixels=args.max_image_pixels,
                        resize=args.resize, crop=args.crop, columns=columns_from(args))
    print(f"Wrote the latent cache of {args.data_root} to {out} in {time.perf_counter() - start:.1f} s; train "
          f"with --latent_cache {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
