"""Make the initial ControlNet checkpoint from a Stable Diffusion 2.x checkpoint (see tool_add_control.py).

    python tool_add_control_sd21.py ./models/v2-1_512-ema-pruned.ckpt ./models/control_sd21_ini.ckpt
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

import tool_add_control
from cldm.cli import run


def main(argv: Sequence[str] | None = None) -> int:
    """tool_add_control.main with the SD2.x check and the ./models/cldm_v21.yaml default config."""
    return tool_add_control.main(argv, base="sd2")


if __name__ == "__main__":
    sys.exit(run(main))
