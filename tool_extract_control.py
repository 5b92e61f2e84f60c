"""Extract the control-only weights (`control_model.*`) from a ControlLDM checkpoint.

    python tool_extract_control.py ./lightning_logs/version_0/checkpoints/last.ckpt ./models/control_fill50k.safetensors

The output keeps the released files' key layout (`control_model.input_blocks.0.0.weight`, ...), so it loads
strictly next to a base Stable Diffusion checkpoint: `tool_sample.py --base v1-5-pruned.ckpt --control <output>`.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cldm.checkpoints.extraction import OUTPUT_SUFFIX, extract_control_file
from cldm import flags
from cldm.cli import add_debug_argument, run


def build_parser() -> argparse.ArgumentParser:
    """Command line of the extractor."""
    parser = argparse.ArgumentParser(
        prog="tool_extract_control.py",
        description="Keep only the ControlNet weights (control_model.*) of a ControlLDM checkpoint.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("input_path", type=flags.path,
                        help="ControlLDM checkpoint: training .ckpt, released .pth or .safetensors")
    parser.add_argument(
        "output_path", type=flags.path, nargs="?", default=None,
        help=f"control-only weights, .safetensors or .ckpt/.pth by extension (default: <input stem>{OUTPUT_SUFFIX})",
    )
    parser.add_argument("--half", action="store_true", help="store floating-point weights as float16")
    parser.add_argument("--config", type=flags.path, default=None,
                        help="ControlLDM config (yaml) whose ControlNet the weights must fit exactly (optional check)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    add_debug_argument(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Extract the control weights of a checkpoint and save them."""
    args = build_parser().parse_args(argv)
    extract_control_file(args.input_path, args.output_path, config=args.config, half=args.half,
                         overwrite=args.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
