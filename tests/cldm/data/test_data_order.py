"""ResumableRandomSampler and DataOrderCheckpoint: the data order depends on (seed, epoch) only, resumable mid-epoch."""
from __future__ import annotations

from types import SimpleNamespace

import torch
from torch.utils.data import DataLoader, Dataset

from cldm.data.data_order import DataOrderCheckpoint, ResumableRandomSampler, Visit


def _indices(sampler: ResumableRandomSampler) -> list[int]:
    return [visit.index for visit in sampler]


def _epoch(sampler: ResumableRandomSampler, epoch: int) -> list[int]:
    sampler.set_epoch(epoch)
    return _indices(sampler)


def test_each_epoch_is_a_permutation_fixed_by_seed_and_epoch() -> None:
    sampler = ResumableRandomSampler(10, seed=3)
    first, second = _epoch(sampler, 0), _epoch(sampler, 1)
    assert sorted(first) == sorted(second) == list(range(10)) and first != second
    assert _epoch(ResumableRandomSampler(10, seed=3), 1) == second  # whatever came before
    assert _epoch(ResumableRandomSampler(10, seed=4), 0) != first
    assert len(sampler) == 10


def test_the_global_random_stream_neither_changes_nor_is_used() -> None:
    torch.manual_seed(0)
    order = _indices(ResumableRandomSampler(10, seed=3))
    state = torch.get_rng_state()
    torch.manual_seed(1)
    assert _indices(ResumableRandomSampler(10, seed=3)) == order
    torch.set_rng_state(state)
    list(ResumableRandomSampler(10, seed=3))
    assert torch.equal(torch.get_rng_state(), state)


def test_resume_continues_the_epoch_and_then_the_next_one() -> None:
    straight = ResumableRandomSampler(10, seed=3)
    epoch1, epoch2 = _epoch(straight, 1), _epoch(straight, 2)

    resumed = ResumableRandomSampler(10, seed=99)  # the seed comes from the checkpoint
    resumed.resume(seed=3, epoch=1, samples_done=4)
    resumed.set_epoch(1)  # Lightning calls this again for the epoch it resumes in
    assert _indices(resumed) == epoch1[4:]
    assert _indices(resumed) == epoch1  # the skip applies once
    assert _epoch(resumed, 2) == epoch2

    at_the_end = ResumableRandomSampler(10, seed=3)
    at_the_end.resume(seed=3, epoch=1, samples_done=10)
    assert _indices(at_the_end) == epoch2


def test_checkpoint_state_counts_the_samples_of_all_ranks() -> None:
    sampler = ResumableRandomSampler(100, seed=5)
    callback = DataOrderCheckpoint(sampler, batch_size=4)
    progress = SimpleNamespace(current=SimpleNamespace(processed=3))
    epochs = SimpleNamespace(current=SimpleNamespace(started=3))  # epoch 2 in progress
    trainer = SimpleNamespace(current_epoch=2, world_size=2,
                              fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(batch_progress=progress),
                                                       epoch_progress=epochs))
    callback.setup(trainer, None, "fit")
    state = callback.state_dict()
    assert state == {"seed": 5, "epoch": 2, "samples_done": 24}

    restored = ResumableRandomSampler(100, seed=0)
    DataOrderCheckpoint(restored, batch_size=4).load_state_dict(state)
    assert _indices(restored) == _epoch(ResumableRandomSampler(100, seed=5), 2)[24:]


def test_visits_carry_the_seed_and_epoch_of_the_order_they_belong_to() -> None:
    sampler = ResumableRandomSampler(4, seed=7)
    sampler.resume(seed=3, epoch=2, samples_done=1)
    visits = list(sampler)
    assert [(visit.seed, visit.epoch) for visit in visits] == [(3, 2)] * 3
    assert [visit.index for visit in visits] == _epoch(ResumableRandomSampler(4, seed=3), 2)[1:]


class _VisitedIndices(Dataset):
    def __len__(self) -> int:
        return 10

    def __getitem__(self, visit: Visit) -> int:
        return visit.index


def test_works_as_a_dataloader_sampler() -> None:
    loader = DataLoader(_VisitedIndices(), batch_size=4, sampler=ResumableRandomSampler(10, seed=3), num_workers=1)
    batches = [batch.tolist() for batch in loader]
    assert [len(batch) for batch in batches] == [4, 4, 2] and sorted(sum(batches, [])) == list(range(10))
