"""The order in which training visits the data set: shuffled per epoch from a seed, and resumable mid-epoch.

`torch.utils.data.RandomSampler` draws each epoch's order from the global random stream when the epoch starts,
so a run resumed in the middle of an epoch would see another order (Lightning cannot restore the position of a
plain DataLoader either). `ResumableRandomSampler` makes the order a function of (seed, epoch), and
`DataOrderCheckpoint` saves how far into the epoch training got, so a resumed run sees exactly the samples an
uninterrupted one would. Under DDP Lightning wraps the sampler and gives each rank its share of the same order.
The sampler yields `Visit`s, which tell the data set which visit of a sample it serves, so that random choices
per visit (prompt dropout) can be a function of (seed, epoch, index) too: the same after a resume and for any
number of DataLoader workers or ranks.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch.utils.data import Sampler


class Visit(NamedTuple):
    """One visit of a sample: its index in the data set, and the sampler's seed and epoch."""

    index: int
    seed: int
    epoch: int


class ResumableRandomSampler(Sampler[Visit]):
    """A random permutation of `range(length)` per epoch, seeded by `seed + epoch`, that can start part-way; it
    yields each index as a `Visit`.

    Args:
        length: the number of samples in the data set.
        seed: base seed of the permutations; None draws one from torch's random stream.
    """

    def __init__(self, length: int, seed: int | None = None):
        super().__init__()
        self.length = length
        self.seed = int(torch.randint(0, 2**62, ()).item()) if seed is None else seed
        self.epoch = 0
        self.start = 0  # samples of the current epoch to leave out, once (set when resuming)

    def __len__(self) -> int:
        return self.length  # Lightning counts the batches of the whole epoch, also when resuming in it

    def __iter__(self) -> Iterator[Visit]:
        order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        start, self.start = self.start, 0
        return iter([Visit(index, self.seed, self.epoch) for index in order[start:].tolist()])

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning before each epoch."""
        if epoch != self.epoch:
            self.epoch, self.start = epoch, 0

    def resume(self, seed: int, epoch: int, samples_done: int) -> None:
        """Continue after the first `samples_done` samples of `epoch` (the next epoch when all were done)."""
        self.seed = seed
        self.epoch, self.start = (epoch + 1, 0) if samples_done >= self.length else (epoch, samples_done)


class DataOrderCheckpoint(Callback):
    """Saves the sampler's seed and the position in the current epoch in checkpoints; restores them on resume.

    Args:
        sampler: the sampler of the training DataLoader.
        batch_size: samples per batch on each device.
    """

    def __init__(self, sampler: ResumableRandomSampler, batch_size: int):
        super().__init__()
        self.sampler = sampler
        self.batch_size = batch_size
        self._trainer: pl.Trainer | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        trainer = self._trainer
        assert trainer is not None, "state_dict is only called by a Trainer after setup"
        batches_done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        # The epoch in progress is the last one started: after a run stopped by max_steps in the middle of
        # an epoch, Lightning already counts that epoch in `current_epoch`.
        epoch = max(trainer.fit_loop.epoch_progress.current.started - 1, 0)
        return {"seed": self.sampler.seed, "epoch": epoch,
                "samples_done": batches_done * self.batch_size * trainer.world_size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.sampler.resume(state_dict["seed"], state_dict["epoch"], state_dict["samples_done"])
