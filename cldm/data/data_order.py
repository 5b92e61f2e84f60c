"""The order in which training visits the data set: shuffled per epoch from a seed, and resumable mid-epoch.

`torch.utils.data.RandomSampler` draws each epoch's order from the global random stream when the epoch starts,
so a run resumed in the middle of an epoch would see another order (Lightning cannot restore the position of a
plain DataLoader either). `ResumableRandomSampler` makes the order a function of (seed, epoch), and
`DataOrderCheckpoint` saves how far into the epoch training got, so a resumed run sees exactly the samples an
uninterrupted one would. Under DDP Lightning wraps the sampler and gives each rank its share of the same order.
The sampler yields `Visit`s, which tell the data set which visit of a sample it serves, so that random choices
per visit (prompt dropout) can be a function of (seed, epoch, index) too: the same after a resume and for any
number of DataLoader workers or ranks. `BucketBatchSampler` (`--buckets`) cuts the same per-epoch order into
batches of one aspect-ratio bucket each, and splits them between the ranks itself.

Lightning's own loop state resumes exactly only from a checkpoint saved in the middle of an epoch. A checkpoint saved
after its last batch, or after `max_steps` cut the epoch short (Lightning then closes the epoch anyway), would make
a run resumed with `max_steps` skip the rest of that epoch or the whole next one; `resumable_loop_state` rewrites
such loop states, on load, into the ones Lightning resumes correctly.
"""
from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Hashable, Iterator, Sequence
from typing import Any, NamedTuple

import pytorch_lightning as pl
import torch
import torch.distributed as dist
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
        start, self.start = self.start, 0
        return iter([Visit(index, self.seed, self.epoch) for index in self.epoch_order()[start:]])

    def epoch_order(self) -> list[int]:
        """The current epoch's permutation of the indices."""
        return torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning before each epoch."""
        if epoch != self.epoch:
            self.epoch, self.start = epoch, 0

    def resume(self, seed: int, epoch: int, samples_done: int) -> None:
        """Continue after the first `samples_done` samples of `epoch` (the next epoch when all were done)."""
        self.seed = seed
        self.epoch, self.start = (epoch + 1, 0) if samples_done >= self.length else (epoch, samples_done)


class BucketBatchSampler(Sampler[list[Visit]]):
    """Batches of one bucket each, in an order that is a function of (seed, epoch), split between the ranks.

    Each epoch walks `sampler`'s permutation and puts each item into its bucket's open batch; a batch is served when
    it holds `batch_size` items, and each bucket's last, partial batch at the end of the epoch (in bucket order), so
    every item is served once. Rank r of R serves batches r, r + R, ...; when the epoch's batch count is not a
    multiple of R, its first batches are served again to fill the last step (as `DistributedSampler` pads). The
    rank and R come from `torch.distributed` when it is initialized (Lightning does so before iterating), so the
    Trainer must not wrap this sampler (`use_distributed_sampler=False`).

    Args:
        sampler: the epoch order, seed and epoch (`set_epoch` reaches it as this sampler's `sampler`).
        item_buckets: the bucket of each item (any sortable key, e.g. its training size).
        batch_size: items per batch on each rank.
    """

    def __init__(self, sampler: ResumableRandomSampler, item_buckets: Sequence[Hashable], batch_size: int):
        super().__init__()
        self.sampler = sampler
        self.item_buckets = list(item_buckets)
        self.batch_size = batch_size
        self.start = 0  # batches of all ranks of the current epoch to leave out, once (set when resuming)

    @property
    def seed(self) -> int:
        return self.sampler.seed

    @property
    def length(self) -> int:
        """The number of items."""
        return self.sampler.length

    def epoch_batches(self) -> list[list[int]]:
        """The current epoch's batches of all ranks, in order, as item indices."""
        open_batches: dict[Hashable, list[int]] = {}
        batches = []
        for index in self.sampler.epoch_order():
            batch = open_batches.setdefault(self.item_buckets[index], [])
            batch.append(index)
            if len(batch) == self.batch_size:
                batches.append(open_batches.pop(self.item_buckets[index]))
        return batches + [open_batches[bucket] for bucket in sorted(open_batches)]

    def _batches_per_epoch(self) -> int:
        """Batches of all ranks in an epoch, before padding: each bucket's items in batches of `batch_size`."""
        return sum(-(-count // self.batch_size) for count in Counter(self.item_buckets).values())

    def __len__(self) -> int:
        """Batches of this rank in a whole epoch (Lightning counts them also when resuming in it)."""
        return -(-self._batches_per_epoch() // _world()[1])

    def __iter__(self) -> Iterator[list[Visit]]:
        rank, world_size = _world()
        batches = self.epoch_batches()
        batches += batches[:(-len(batches)) % world_size]  # the first ones again, up to a multiple of world_size
        start, self.start = self.start, 0
        seed, epoch = self.sampler.seed, self.sampler.epoch
        return iter([[Visit(index, seed, epoch) for index in batch] for batch in batches[start + rank::world_size]])

    def resume(self, seed: int, epoch: int, samples_done: int) -> None:
        """Continue after the first `samples_done // batch_size` batches (of all ranks) of `epoch`: the count that
        `DataOrderCheckpoint` saves, in batches of this sampler's size."""
        batches_done = samples_done // self.batch_size
        if batches_done >= len(self) * _world()[1]:
            self.sampler.resume(seed, epoch, self.sampler.length)
            self.start = 0
        else:
            self.sampler.resume(seed, epoch, 0)
            self.start = batches_done


def _world() -> tuple[int, int]:
    """(rank, number of ranks) of the initialized process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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
        sampler: the sampler (or the `BucketBatchSampler`) of the training DataLoader.
        batch_size: samples per batch on each device.
    """

    def __init__(self, sampler: ResumableRandomSampler | BucketBatchSampler, batch_size: int):
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
            if isinstance(self.sampler, BucketBatchSampler):
                raise ValueError(f"--buckets resumes an epoch only in batches of the run's size, and --batch_size "
                                 f"{self.batch_size} differs from its {order['batch_size']}; resume with --batch_size "
                                 f"{order['batch_size']}")
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
