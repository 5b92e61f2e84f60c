"""Make the initial ControlNet checkpoint from a Stable Diffusion 1.x checkpoint.

    python tool_add_control.py ./models/v1-5-pruned.ckpt ./models/control_sd15_ini.ckpt

The ControlNet encoder starts as a copy of the SD UNet encoder; the hint encoder, zero convolutions and
middle-block output are newly initialised (zero convolutions are zero).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cldm.checkpoints.initial_weights import DEFAULT_CONFIGS, SCRIPTS, make_initial_checkpoint
from cldm.checkpoints.kinds import BASE_MODEL_DESCRIPTIONS
from cldm import flags
from cldm.cli import add_debug_argument, run
from cldm.host_memory import return_freed_host_memory


def build_parser(base: str) -> argparse.ArgumentParser:
    """Command line of the tool for Stable Diffusion version `base` ("sd1" or "sd2")."""
    parser = argparse.ArgumentParser(
        prog=SCRIPTS[base],
        description=f"Add a ControlNet, initialised from the UNet encoder, to {BASE_MODEL_DESCRIPTIONS[base]}.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("input_path", type=flags.path, help="Stable Diffusion checkpoint (.ckpt, .pth or .safetensors)")
    parser.add_argument("output_path", type=flags.path,
                        help="new ControlNet checkpoint; .safetensors or .ckpt/.pth by extension")
    parser.add_argument("--config", type=flags.path, default=DEFAULT_CONFIGS[base],
                        help="ControlLDM model config (yaml)")
    parser.add_argument(
        "--seed",
        type=flags.seed,
        default=None,
        help="seed for the newly initialised hint-encoder weights; None leaves them unseeded, as the original",
    )
    add_debug_argument(parser)
    return parser


def main(argv: Sequence[str] | None = None, *, base: str = "sd1") -> int:
    """Add a ControlNet to a Stable Diffusion `base` checkpoint and save it."""
    args = build_parser(base).parse_args(argv)
    return_freed_host_memory()  # the input tensors this process frees would otherwise stay resident
    make_initial_checkpoint(args.input_path, args.output_path, args.config, base=base, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
