"""Train a ControlNet for Stable Diffusion 2.1 on Fill50K (cldm_v21.yaml, control_sd21_ini.ckpt).

    python3 tutorial_train_sd21.py
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

from cldm import training
from cldm.cli import run


def main(argv: Sequence[str] | None = None) -> int:
    return training.main(argv, training.SD21_DEFAULTS, description=__doc__)


if __name__ == "__main__":
    sys.exit(run(main))
