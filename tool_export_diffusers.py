"""Export ControlNet weights to a diffusers `ControlNetModel` folder (config.json + safetensors weights).

    python tool_export_diffusers.py ./models/control_sd15_canny.pth ./controlnet-canny
    python tool_export_diffusers.py control_sd21.safetensors ./controlnet-sd21 --config ./models/cldm_v21.yaml

The input is a full ControlLDM checkpoint or control-only weights (tool_extract_control.py). The folder loads with
`diffusers.ControlNetModel.from_pretrained(folder)` and gives the same residuals as our ControlNet.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cldm.checkpoints.diffusers_export import export_diffusers
from cldm import flags
from cldm.cli import add_debug_argument, run


def build_parser() -> argparse.ArgumentParser:
    """Command line of the exporter."""
    parser = argparse.ArgumentParser(
        prog="tool_export_diffusers.py",
        description="Write ControlNet weights as a diffusers ControlNetModel folder.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("input_path", type=flags.path,
                        help="ControlLDM checkpoint or control-only weights (.ckpt, .pth, .safetensors)")
    parser.add_argument("output_dir", type=flags.path, help="new diffusers model folder")
    parser.add_argument("--config", type=flags.path, default="./models/cldm_v15.yaml",
                        help="ControlLDM config (yaml) whose ControlNet the weights fit")
    parser.add_argument("--half", action="store_true", help="store floating-point weights as float16")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    add_debug_argument(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Convert the control weights of a checkpoint and write the diffusers folder."""
    args = build_parser().parse_args(argv)
    export_diffusers(args.input_path, args.output_dir, args.config, half=args.half, overwrite=args.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
