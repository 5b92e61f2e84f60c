"""Move a ControlNet trained on base Stable Diffusion 1.5 onto a fine-tuned SD1.5 model.

    python tool_transfer_control.py --sd15 ./models/v1-5-pruned.ckpt --control ./models/control_sd15_openpose.pth \
        --input ./models/anything-v3-full.safetensors --output ./models/control_any3_openpose.pth

Every tensor with a UNet counterpart becomes `control + finetuned - base`; VAE and text encoder come from the
fine-tuned model; ControlNet-only layers are kept. The four paths may also be given as positionals in that order.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cldm.checkpoints.transfer import transfer_control_file
from cldm import flags
from cldm.cli import add_debug_argument, run
from cldm.host_memory import return_freed_host_memory

# The original's hard-coded paths, in positional order.
DEFAULT_PATHS = {
    "sd15": "./models/v1-5-pruned.ckpt",
    "control": "./models/control_sd15_openpose.pth",
    "input": "./models/anything-v3-full.safetensors",
    "output": "./models/control_any3_openpose.pth",
}
HELP = {
    "sd15": "the base Stable Diffusion checkpoint the ControlNet was trained on",
    "control": "the ControlNet checkpoint to transfer",
    "input": "the fine-tuned Stable Diffusion checkpoint to transfer to",
    "output": "the new checkpoint; .safetensors or .ckpt/.pth by extension",
}


def build_parser() -> argparse.ArgumentParser:
    """Command line: four optional positionals or the equivalent flags, defaulting to the original's paths."""
    parser = argparse.ArgumentParser(
        prog="tool_transfer_control.py",
        description="Transfer a ControlNet from base SD1.5 to a fine-tuned SD1.5 model (offset method).",
    )
    parser.add_argument("paths", type=flags.path, nargs="*", metavar="PATH",
                        help="sd15 control input output, in this order")
    for name, default in DEFAULT_PATHS.items():
        parser.add_argument(f"--{name}", type=flags.path, default=None, help=f"{HELP[name]} (default: {default})")
    add_debug_argument(parser)
    return parser


def _resolve_paths(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, str]:
    """The four paths from positionals, flags and defaults; a path given both ways is an error."""
    if len(args.paths) > len(DEFAULT_PATHS):
        parser.error(f"expected at most {len(DEFAULT_PATHS)} paths ({' '.join(DEFAULT_PATHS)}), got {len(args.paths)}")
    paths = dict(zip(DEFAULT_PATHS, args.paths))
    for name, default in DEFAULT_PATHS.items():
        flagged = getattr(args, name)
        if flagged is not None and name in paths:
            parser.error(f"the {name} path is given both as a positional and as --{name}")
        paths.setdefault(name, flagged if flagged is not None else default)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """Transfer the ControlNet and save the result."""
    parser = build_parser()
    paths = _resolve_paths(parser, parser.parse_args(argv))
    return_freed_host_memory()  # the input tensors this process frees would otherwise stay resident
    transfer_control_file(**paths)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
