"""Aspect-ratio buckets: the sizes, the assignment of items, batches of one bucket, determinism, exact resume, and
the split between ranks (simulated, and with two real processes of a gloo process group)."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from cldm.data import data_order
from cldm.data.buckets import assign_buckets, bucket_histogram, bucket_sizes, nearest_bucket
from cldm.data.data_order import BucketBatchSampler, ResumableRandomSampler

BUCKETS_512 = [(256, 1024), (320, 768), (384, 640), (448, 576), (512, 512), (576, 448), (640, 384), (768, 320),
               (1024, 256)]
# A mixed-size test set: (width, height) of its targets, as photos, scans and screenshots come.
MIXED_SIZES = [(512, 512)] * 7 + [(640, 480)] * 5 + [(480, 640)] * 4 + [(1920, 1080)] * 3 + [(1080, 1920)] * 2 + \
              [(3000, 600)] + [(1000, 1000)] * 2 + [(800, 600)] * 2


def test_buckets_of_512_have_sides_of_multiples_of_64_and_about_the_area():
    assert bucket_sizes(512) == BUCKETS_512
    for width, height in BUCKETS_512:
        assert width % 64 == height % 64 == 0
        assert 0.9 * 512**2 <= width * height <= 512**2
    assert bucket_sizes(64) == [(64, 64)]
    assert bucket_sizes(128) == [(64, 256), (128, 128), (256, 64)]


@pytest.mark.parametrize("size, bucket", [((640, 480), (576, 448)), ((480, 640), (448, 576)), ((512, 512), (512, 512)),
                                          ((1000, 999), (512, 512)), ((1920, 1080), (640, 384)),
                                          ((5000, 100), (1024, 256))])
def test_items_go_to_the_nearest_aspect_ratio(size, bucket):
    assert BUCKETS_512[nearest_bucket(size, BUCKETS_512)] == bucket


def test_histogram_of_a_mixed_size_set():
    assignment = assign_buckets(MIXED_SIZES, BUCKETS_512)
    assert bucket_histogram(assignment, BUCKETS_512) == ("384x640: 2, 448x576: 4, 512x512: 9, 576x448: 7, 640x384: 3, "
                                                         "1024x256: 1")


def _sampler(seed: int = 3, batch_size: int = 3) -> BucketBatchSampler:
    keys = [BUCKETS_512[bucket] for bucket in assign_buckets(MIXED_SIZES, BUCKETS_512)]
    return BucketBatchSampler(ResumableRandomSampler(len(keys), seed), keys, batch_size)


def _indices(batches) -> list[list[int]]:
    return [[visit.index for visit in batch] for batch in batches]


def test_every_batch_holds_one_bucket_and_every_item_is_served_once():
    sampler = _sampler()
    for epoch in range(3):
        sampler.sampler.set_epoch(epoch)
        batches = _indices(sampler)
        assert len(batches) == len(sampler) == 11  # ceil of 2/3, 4/3, 9/3, 7/3, 3/3, 1/3
        assert all(len({sampler.item_buckets[index] for index in batch}) == 1 for batch in batches)
        assert sorted(index for batch in batches for index in batch) == list(range(len(MIXED_SIZES)))
        assert Counter(len(batch) for batch in batches) == {3: 7, 2: 1, 1: 3}


def test_the_order_is_a_function_of_seed_and_epoch():
    first, again, other_seed = _sampler(), _sampler(), _sampler(seed=4)
    assert _indices(first) == _indices(again) != _indices(other_seed)
    epoch_0 = _indices(first)
    first.sampler.set_epoch(1)
    assert _indices(first) != epoch_0
    visit = next(iter(first))[0]
    assert (visit.seed, visit.epoch) == (3, 1)


@pytest.mark.parametrize("batches_done", [0, 4, 10, 11])
def test_resume_serves_the_rest_of_the_epoch(batches_done):
    whole = _indices(_sampler())
    resumed = _sampler(seed=99)
    resumed.resume(seed=3, epoch=0, samples_done=batches_done * 3)
    if batches_done < len(whole):
        assert _indices(resumed) == whole[batches_done:]
        assert _indices(resumed) == whole  # once: the next iteration is the whole epoch again
    else:
        assert resumed.sampler.epoch == 1 and len(_indices(resumed)) == 11


def test_ranks_serve_disjoint_batches_that_cover_the_epoch(monkeypatch):
    sampler = _sampler(batch_size=5)  # 8 batches (ceil of 2/5, 4/5, 9/5, 7/5, 3/5, 1/5): 4 per rank
    whole = _indices(sampler)
    served = {}
    for rank in (0, 1):
        monkeypatch.setattr(data_order, "_world", lambda rank=rank: (rank, 2))
        served[rank] = _indices(sampler)
        assert len(served[rank]) == len(sampler) == 4
    items = [{index for batch in served[rank] for index in batch} for rank in (0, 1)]
    assert not items[0] & items[1] and items[0] | items[1] == set(range(len(MIXED_SIZES)))
    assert [batch for pair in zip(served[0], served[1]) for batch in pair] == whole


def test_an_odd_batch_count_is_padded_with_the_first_batches(monkeypatch):
    sampler = _sampler()  # 11 batches
    whole = _indices(sampler)
    monkeypatch.setattr(data_order, "_world", lambda: (1, 2))
    assert len(sampler) == 6 and _indices(sampler)[-1] == whole[0]


def _serve(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    sampler = _sampler(batch_size=5)
    Path(out, f"{rank}.json").write_text(json.dumps({"length": len(sampler), "batches": _indices(sampler)}))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_of_a_process_group_split_the_epoch(tmp_path):
    mp.start_processes(_serve, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, start_method="spawn")
    served = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    assert served[0]["length"] == served[1]["length"] == 4
    items = [[index for batch in rank["batches"] for index in batch] for rank in served]
    assert not set(items[0]) & set(items[1])
    assert sorted(items[0] + items[1]) == list(range(len(MIXED_SIZES)))
