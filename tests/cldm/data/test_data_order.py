"""ResumableRandomSampler and DataOrderCheckpoint: the data order depends on (seed, epoch) only, resumable mid-epoch."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from cldm.data.data_order import DataOrderCheckpoint, ResumableRandomSampler, Visit, resumable_loop_state


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
    assert state == {"seed": 5, "epoch": 2, "samples_done": 24, "batch_size": 4}

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


# Lightning's fit loop state, as saved in checkpoints (only the parts `resumable_loop_state` reads or writes).

def _counts(ready: int, started: int, processed: int, completed: int) -> dict[str, int]:
    return {"ready": ready, "started": started, "processed": processed, "completed": completed}


def _fit_loop(epochs: dict[str, int], batches: dict[str, int], is_last_batch: bool, stepped: int) -> dict:
    return {"epoch_progress": {"total": dict(epochs), "current": dict(epochs)},
            "epoch_loop.batch_progress": {"total": dict(batches), "current": dict(batches),
                                          "is_last_batch": is_last_batch},
            "epoch_loop.state_dict": {"_batches_that_stepped": stepped}}


def test_mid_epoch_state_is_kept() -> None:
    # Saved at the end of batch 2 of 4 of the first epoch, as every step checkpoint is: Lightning resumes it exactly.
    state = _fit_loop(_counts(1, 1, 0, 0), _counts(2, 2, 2, 1), is_last_batch=False, stepped=1)
    assert resumable_loop_state(state) == state


def test_an_epoch_that_max_steps_cut_short_is_open_again() -> None:
    # Saved when the run ended after batch 2 of 4: Lightning had closed the epoch.
    state = _fit_loop(_counts(1, 1, 1, 1), _counts(2, 2, 2, 2), is_last_batch=False, stepped=2)
    resumable = resumable_loop_state(state)
    assert resumable == _fit_loop(_counts(1, 1, 0, 0), _counts(2, 2, 2, 2), is_last_batch=False, stepped=2)
    assert state["epoch_progress"]["total"] == _counts(1, 1, 1, 1)  # the argument is left as it was


@pytest.mark.parametrize("saved", ["at the last batch", "after the epoch"])
def test_a_finished_epoch_is_closed_with_no_batch_of_the_next_one_counted(saved: str) -> None:
    if saved == "at the last batch":  # a step checkpoint of the epoch's last batch: the epoch is still open
        state = _fit_loop(_counts(1, 1, 0, 0), _counts(4, 4, 4, 3), is_last_batch=True, stepped=3)
    else:  # the final checkpoint of a run whose max_steps fell on the epoch's end
        state = _fit_loop(_counts(1, 1, 1, 1), _counts(4, 4, 4, 4), is_last_batch=True, stepped=4)
    resumable = resumable_loop_state(state)
    assert resumable["epoch_progress"] == {"total": _counts(1, 1, 1, 1), "current": _counts(1, 1, 1, 1)}
    assert resumable["epoch_loop.batch_progress"] == {"total": _counts(4, 4, 4, 4), "current": _counts(0, 0, 0, 0),
                                                      "is_last_batch": False}
    assert resumable["epoch_loop.state_dict"] == {"_batches_that_stepped": 4}


def _trainer(batches_done: int, world_size: int = 1) -> SimpleNamespace:
    progress = SimpleNamespace(current=SimpleNamespace(processed=batches_done))
    epochs = SimpleNamespace(current=SimpleNamespace(started=1))
    return SimpleNamespace(world_size=world_size, fit_loop=SimpleNamespace(
        epoch_loop=SimpleNamespace(batch_progress=progress), epoch_progress=epochs))


def test_another_batch_size_continues_from_the_same_sample() -> None:
    # Stopped after 5 batches of 2 of an epoch of 20 samples; resumed with batches of 3.
    order = {"seed": 5, "epoch": 0, "samples_done": 10, "batch_size": 2}
    checkpoint = {"loops": {"fit_loop": _fit_loop(_counts(1, 1, 0, 0), _counts(5, 5, 5, 4), False, stepped=4)},
                  "callbacks": {"DataOrderCheckpoint": order}}
    sampler = ResumableRandomSampler(20, seed=0)
    callback = DataOrderCheckpoint(sampler, batch_size=3)
    callback.on_load_checkpoint(_trainer(0), None, checkpoint)
    callback.load_state_dict(order)
    batches = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]
    assert batches["current"] == batches["total"] == _counts(3, 3, 3, 2)  # 9 of the 10 samples in batches of 3
    assert _indices(sampler) == _epoch(ResumableRandomSampler(20, seed=5), 0)[10:]  # the 10 left, in 4 batches

    callback.setup(_trainer(batches_done=3 + 1), None, "fit")  # one batch of 3 later
    assert callback.state_dict() == {"seed": 5, "epoch": 0, "samples_done": 13, "batch_size": 3}
