"""Train a ControlNet with DDP on many GPUs (defaults: 8 devices, strategy ddp, 50 epochs).

    python3 tutorial_train_dist.py                                  # one node, 8 GPUs
    torchrun --nnodes 2 --nproc_per_node 8 ... tutorial_train_dist.py --num_nodes 2
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

from cldm import training
from cldm.cli import run


def main(argv: Sequence[str] | None = None) -> int:
    return training.main(argv, training.DISTRIBUTED_DEFAULTS, description=__doc__)


if __name__ == "__main__":
    sys.exit(run(main))
