"""Write a randomly initialised "Stable Diffusion" checkpoint of a config, for demos, tests and benchmarks.

The file has the layout of a real SD checkpoint of that architecture (every key of the config's
ControlLDM except `control_model.*`), so `tool_add_control.py` treats it like v1-5-pruned.ckpt.
It is not a usable image model: real images need the real SD1.5 / SD2.1 weights.

    python tool_make_random_sd.py --config models/cldm_tiny.yaml ./models/tiny_sd.ckpt
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cldm.checkpoints.random_weights import random_base_state_dict, randomize_, write_random_sd
from cldm import flags
from cldm.cli import add_debug_argument, run

__all__ = ["main", "random_base_state_dict", "randomize_"]


def build_parser() -> argparse.ArgumentParser:
    """Command line of the writer."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=flags.path, help="checkpoint to write (.ckpt, .pth or .safetensors)")
    parser.add_argument("--config", type=flags.path, default="./models/cldm_tiny.yaml",
                        help="model config (default: %(default)s)")
    parser.add_argument("--seed", type=flags.seed, default=0, help="seed of the random weights (default: %(default)s)")
    add_debug_argument(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Write the random checkpoint."""
    args = build_parser().parse_args(argv)
    write_random_sd(args.output, args.config, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
