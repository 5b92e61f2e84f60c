"""The order in which training visits the data set: shuffled per epoch from a seed, and resumable mid-epoch.

`torch.utils.data.RandomSampler` draws each epoch's order from the global random stream when the epoch starts,
so a run resumed in the middle of an epoch would see another order (Lightning cannot restore the position of a
plain DataLoader either). `ResumableRandomSampler` makes the order a function of (seed, epoch), and
`DataOrderCheckpoint` saves how far into the epoch training got, so a resumed run sees exactly the samples an
uninterrupted one would. Under DDP Lightning wraps the sampler and gives each rank its share of the same order.
The sampler yields `Visit`s, which tell the data set which visit of a sample it serves, so that random choices
per visit (prompt dropout) can be a function of (seed, epoch, index) too: the same after a resume and for any
number of DataLoader workers or ranks.

Lightning's own loop state resumes exactly only from a checkpoint saved in the middle of an epoch. A checkpoint saved
after its last batch, or after `max_steps` cut the epoch short (Lightning then closes the epoch anyway), would make
a run resumed with `max_steps` skip the rest of that epoch or the whole next one; `resumable_loop_state` rewrites
such loop states, on load, into the ones Lightning resumes correctly.
"""
from __future__ import annotations

import copy
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


def resumable_loop_state(fit_loop: dict[str, Any]) -> dict[str, Any]:
    """A copy of the fit loop state `fit_loop` (the checkpoint's `loops["fit_loop"]`) in a form Lightning resumes
    exactly:

    - an epoch that Lightning closed before its last batch (a run stopped by `max_steps`) is open again, as in a
      checkpoint saved in the middle of the epoch;
    - an epoch whose last batch is done is closed, with no batch of the next epoch counted: Lightning, resuming from
      its last batch, would close the epoch but not start the next one, and resuming from a closed epoch with
      `max_steps` set it would count the batches of the finished epoch in the next one.
    """
    state = copy.deepcopy(fit_loop)
    epochs, batches = state["epoch_progress"], state["epoch_loop.batch_progress"]
    closed = epochs["total"]["processed"] == epochs["total"]["started"]
    if closed and not batches["is_last_batch"]:
        for counts in epochs.values():
            counts["processed"] = counts["completed"] = counts["started"] - 1
    elif batches["is_last_batch"]:
        if not closed:  # saved at the end of the last batch, before Lightning counted it as completed
            state["epoch_loop.state_dict"]["_batches_that_stepped"] += 1
            batches["total"]["completed"] = batches["total"]["processed"]
        for counts in epochs.values():
            counts["processed"] = counts["completed"] = counts["started"]
        batches["current"] = dict.fromkeys(batches["current"], 0)
        batches["is_last_batch"] = False
    return state


class DataOrderCheckpoint(Callback):
    """Saves the sampler's seed and the position in the current epoch in checkpoints; restores them on resume, with
    Lightning's loop state made to agree (`resumable_loop_state`).

    Args:
        sampler: the sampler of the training DataLoader.
        batch_size: samples per batch on each device.
    """

    def __init__(self, sampler: ResumableRandomSampler, batch_size: int):
        super().__init__()
        self.sampler = sampler
        self.batch_size = batch_size
        self._trainer: pl.Trainer | None = None
        # After a resume with another batch size: the epoch resumed in, and its samples done that Lightning's count
        # of batches of `batch_size` leaves out.
        self._resumed_epoch: int | None = None
        self._uncounted_samples = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        trainer = self._trainer
        assert trainer is not None, "state_dict is only called by a Trainer after setup"
        batches_done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        # The epoch in progress is the last one started: after a run stopped by max_steps in the middle of
        # an epoch, Lightning already counts that epoch in `current_epoch`.
        epoch = max(trainer.fit_loop.epoch_progress.current.started - 1, 0)
        samples_done = batches_done * self.batch_size * trainer.world_size
        if epoch == self._resumed_epoch:
            samples_done += self._uncounted_samples
        return {"seed": self.sampler.seed, "epoch": epoch, "samples_done": samples_done,
                "batch_size": self.batch_size}

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # Called before Lightning restores its loops from the same dictionary.
        loops = checkpoint["loops"]
        loops["fit_loop"] = resumable_loop_state(loops["fit_loop"])
        order = checkpoint.get("callbacks", {}).get(self.state_key)
        if order is not None and order.get("batch_size", self.batch_size) != self.batch_size:
            self._count_in_batches_of_this_run(loops["fit_loop"], order, trainer.world_size)

    def _count_in_batches_of_this_run(self, fit_loop: dict[str, Any], order: dict[str, Any], world_size: int) -> None:
        """Make Lightning's count of the batches done in the resumed epoch one in batches of this run's size, so
        that the epoch ends when the sampler has served its remaining samples."""
        samples_per_batch = self.batch_size * world_size
        if order["samples_done"] >= self.sampler.length:
            return  # resumed at the end of an epoch: no batch of the next one is counted
        batches = fit_loop["epoch_loop.batch_progress"]
        change = order["samples_done"] // samples_per_batch - batches["current"]["processed"]
        for counts in batches["total"], batches["current"]:
            for name in counts:
                counts[name] += change
        self._resumed_epoch, self._uncounted_samples = order["epoch"], order["samples_done"] % samples_per_batch

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.sampler.resume(state_dict["seed"], state_dict["epoch"], state_dict["samples_done"])
