"""Measure how well a ControlNet follows its hints: sample the last items of a data set with fixed seeds and score
the samples (edge F1 against the hint; for Fill50K, the colour error against the prompt).

    python tool_eval_control.py --ckpt ./lightning_logs/version_0/checkpoints/last.ckpt --data_root ./training/fill50k
    python tool_eval_control.py --images ./diffusers_samples --data_root ./training/fill50k --items 100

Prints one line per metric (mean, std, min, max); `--json` writes the per-item values, `--grid` the (hint, sample)
pairs. The items are the data set's last `--items`, the ones training's `--val_items` holds out; with `--images`,
item N's image is `<images>/N.png` (N: its line in prompt.json, counted from 0) and no checkpoint is needed.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cldm import flags
from cldm.cli import add_debug_argument, run
from cldm.data.geometry import RESIZE_MODES
from cldm.data.images import DEFAULT_MAX_IMAGE_PIXELS
from cldm.data.layouts import add_column_flags, columns_from
from cldm.evaluation.eval_control import EvalSettings, evaluate_to_files, format_table
from cldm.evaluation.evaluate import DEFAULT_BATCH_SIZE
from cldm.sampling import PRECISIONS, add_weight_arguments, weight_sources


def build_parser() -> argparse.ArgumentParser:
    """Command line of the evaluation; sampling defaults are those of training's evaluation."""
    parser = argparse.ArgumentParser(
        prog="tool_eval_control.py",
        description="Score a ControlNet's control fidelity on the last items of a data set, with fixed seeds.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_weight_arguments(parser)
    parser.add_argument("--images", type=flags.path, help="score the images of this folder (<index>.png per item, generated "
                        "elsewhere) instead of sampling; no checkpoint needed")
    parser.add_argument("--data_root", type=flags.path, required=True, help="data set folder holding prompt.json or metadata.jsonl")
    parser.add_argument("--items", type=flags.positive_int, default=100, help="score the data set's last ITEMS items")
    parser.add_argument("--resolution", type=flags.positive_int, default=None,
                        help="resize hints to RESOLUTION x RESOLUTION, as training's --resolution")
    parser.add_argument("--resize", default="crop", choices=RESIZE_MODES,
                        help="with --resolution: crop to a square or stretch, as training's --resize")
    parser.add_argument("--max_image_pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                        help="refuse an image whose header gives more pixels than this, before decoding it "
                             "(default: 8192x8192)")
    add_column_flags(parser)
    parser.add_argument("--seed", type=flags.seed, default=0, help="item i starts from noise seeded by (seed, i)")
    parser.add_argument("--ddim_steps", type=flags.ddim_steps, default=20, help="DDIM steps")
    parser.add_argument("--guidance_scale", type=flags.non_negative_finite_float, default=9.0, help="classifier-free guidance scale")
    parser.add_argument("--eta", type=flags.non_negative_finite_float, default=0.0, help="DDIM eta")
    parser.add_argument("--batch_size", type=flags.positive_int, default=DEFAULT_BATCH_SIZE, help="items sampled at once")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="32",
                        help="32: float32; bf16 / 16: autocast (16 on CUDA only)")
    parser.add_argument("--device", type=flags.device, default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--json", type=flags.path, default=None, help="write the per-item metrics to this JSON file")
    parser.add_argument("--grid", type=flags.path, default=None, help="write the (hint, sample) pairs to this PNG")
    parser.add_argument("--overwrite", action="store_true", help="replace existing --json and --grid files")
    add_debug_argument(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Score the items and print the table."""
    args = build_parser().parse_args(argv)
    settings = EvalSettings(ddim_steps=args.ddim_steps, guidance_scale=args.guidance_scale, eta=args.eta,
                            seed=args.seed, batch_size=args.batch_size, precision=args.precision)
    given = any(path is not None for path in (args.ckpt, args.base, args.control))
    weights = weight_sources(args) if given else None
    result = evaluate_to_files(args.data_root, args.items, weights=weights, images=args.images, settings=settings,
                               resolution=args.resolution, device_name=args.device, json_path=args.json,
                               grid=args.grid, overwrite=args.overwrite, resize=args.resize,
                               columns=columns_from(args), max_image_pixels=args.max_image_pixels)
    print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
