"""Train a ControlNet on Fill50K on one device (the original tutorial's defaults).

    python3 tutorial_train.py                       # SD1.5, ./models/control_sd15_ini.ckpt, batch 4
    python3 tutorial_train.py --help                # every flag, with its default
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

from cldm import training
from cldm.cli import run


def main(argv: Sequence[str] | None = None) -> int:
    return training.main(argv, training.SINGLE_DEVICE_DEFAULTS, description=__doc__)


if __name__ == "__main__":
    sys.exit(run(main))
