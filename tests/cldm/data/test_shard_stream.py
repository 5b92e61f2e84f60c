"""--data_shards: the shard stream splits between ranks and workers without overlap, is deterministic for a seed,
gives `MyDataset`'s items, and resumes at shard granularity."""
from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
from torch.utils.data import DataLoader

from cldm.data.data_order import Visit
from cldm.data.dataset import MyDataset
from cldm.data.shard_stream import ShardStream, shard_list
from cldm.data.shards import make_shards
from tests.helpers.tiny_training import make_data


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("shard_stream") / "data", 8)


def _stream(data: Path, out: Path, shard_size: int, **options) -> ShardStream:
    if not out.exists():
        make_shards(str(data), out, shard_size)
    options = {"batch_size": 2, "world_size": 1, "seed": 3, **options}
    return ShardStream(*shard_list([str(out)]), **options)


def _identity(sample: dict) -> tuple[str, bytes]:
    return sample["txt"], sample["hint"].tobytes()


def _all_items(data: Path) -> set[tuple[str, bytes]]:
    dataset = MyDataset(root=str(data))
    return {_identity(dataset[index]) for index in range(len(dataset))}


def test_two_ranks_see_disjoint_items_that_cover_the_epoch(data: Path, tmp_path: Path, monkeypatch) -> None:
    seen = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        seen.append([_identity(sample) for sample in _stream(data, tmp_path / f"shards{rank}", 1, world_size=2)])
    assert len(seen[0]) == len(seen[1]) == 4
    assert set(seen[0]).isdisjoint(seen[1]) and set(seen[0]) | set(seen[1]) == _all_items(data)


def test_dataloader_workers_see_disjoint_items_that_cover_the_epoch(data: Path, tmp_path: Path) -> None:
    stream = _stream(data, tmp_path / "shards", 2)
    batches = list(DataLoader(stream, batch_size=2, num_workers=2))
    items = [(text, hint.numpy().tobytes()) for batch in batches for text, hint in zip(batch["txt"], batch["hint"])]
    assert len(batches) == 4 and len(items) == 8 and set(items) == _all_items(data)


def test_the_order_is_a_function_of_seed_and_epoch(data: Path, tmp_path: Path) -> None:
    def order(seed: int, epoch: int) -> list:
        stream = _stream(data, tmp_path / "shards", 2, seed=seed, shuffle_buffer=4)
        stream.set_epoch(epoch)
        return [_identity(sample) for sample in stream]
    assert order(3, 0) == order(3, 0)
    assert order(3, 0) != order(3, 1) and order(3, 0) != order(4, 0)
    assert set(order(3, 1)) == _all_items(data)


def test_items_are_the_data_sets_with_framing_and_prompt_dropout(data: Path, tmp_path: Path) -> None:
    options = dict(resolution=64, crop="random", prompt_dropout=0.5)
    stream = _stream(data, tmp_path / "shards", 1, shuffle_buffer=1, **options)
    stream.set_epoch(2)
    dataset = MyDataset(root=str(data), **options)
    samples = list(stream)
    assert [sample["txt"] for sample in samples].count("") not in (0, 8)
    for sample, index in zip(samples, stream.epoch_order(), strict=True):
        item = dataset[Visit(index, 3, 2)]
        assert sample["txt"] == item["txt"]
        assert np.array_equal(sample["jpg"], item["jpg"]) and np.array_equal(sample["hint"], item["hint"])


def test_resume_skips_the_shards_read_through_and_rereads_a_partly_read_one(data: Path, tmp_path: Path) -> None:
    stream = _stream(data, tmp_path / "shards", 4, shuffle_buffer=1)
    whole = [_identity(sample) for sample in stream]
    stream.resume(3, 0, 4)  # the first shard read through
    assert [_identity(sample) for sample in stream] == whole[4:]
    stream.resume(3, 0, 2)  # in the first shard: it is read again, and the epoch ends after 8 - 2 items
    assert [_identity(sample) for sample in stream] == whole[:6]
    stream.resume(3, 0, 8)  # the epoch was done: the next one
    assert stream.epoch == 1 and stream.start == 0


def _rewrite(path: Path, change) -> None:
    """Rewrite the shard `path` with each member's (name, bytes) passed through `change`."""
    with tarfile.open(path) as archive:
        members = [(info.name, archive.extractfile(info).read()) for info in archive]
    with tarfile.open(path, "w") as archive:
        for name, data in filter(None, map(change, members)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def test_json_captions_are_read_from_the_caption_field(data: Path, tmp_path: Path) -> None:
    stream = _stream(data, tmp_path / "shards", 8, shuffle_buffer=1, caption="caption")
    _rewrite(Path(stream.urls[0]), lambda member: (member[0].replace(".txt", ".json"),
                                                   json.dumps({"caption": member[1].decode()}).encode())
             if member[0].endswith(".txt") else member)
    assert [sample["txt"] for sample in stream] == [record["prompt"] for record in MyDataset(root=str(data)).data]


def test_skip_bad_samples_skips_an_undecodable_item_with_a_warning(data: Path, tmp_path: Path, caplog) -> None:
    stream = _stream(data, tmp_path / "shards", 8, shuffle_buffer=1, skip_bad_samples=True)
    _rewrite(Path(stream.urls[0]), lambda member: (member[0], b"not a png") if member[0] == "000000001.png" else member)
    with caplog.at_level(logging.WARNING):
        samples = list(stream)
    assert len(samples) == 8  # the epoch's count, the shard read again from its start to fill it
    assert f"--skip_bad_samples: skipping the item: Member 000000001.png of shard {stream.urls[0]}" in caplog.text
    stream.skip_bad_samples = False
    with pytest.raises(ValueError, match=rf"^Member 000000001.png of shard {stream.urls[0]} "):
        list(stream)


def test_brace_patterns_and_pipe_commands_name_the_same_shards(data: Path, tmp_path: Path) -> None:
    stream = _stream(data, tmp_path / "shards", 4, shuffle_buffer=1)
    assert shard_list([str(tmp_path / "shards" / "shard-{000000..000001}.tar")]) == (stream.urls, [4, 4])
    piped = [f"pipe:cat {url}" for url in stream.urls]
    assert shard_list(piped) == (piped, [4, 4])  # counted by reading, without shards.json
    from_pipes = ShardStream(piped, [4, 4], batch_size=2, world_size=1, seed=3, shuffle_buffer=1)
    assert [_identity(sample) for sample in from_pipes] == [_identity(sample) for sample in stream]


def test_a_shards_json_may_list_urls_whose_counts_it_gives(data: Path, tmp_path: Path) -> None:
    stream = _stream(data, tmp_path / "shards", 4)
    manifest = json.loads((tmp_path / "shards" / "shards.json").read_text())
    manifest["shards"] = [f"pipe:false {name}" for name in manifest["shards"]]  # never run: counted by the manifest
    (tmp_path / "remote").mkdir()
    (tmp_path / "remote" / "shards.json").write_text(json.dumps(manifest))
    assert shard_list([str(tmp_path / "remote")]) == (manifest["shards"], [4, 4])
    assert stream.counts == [4, 4]


def test_a_reader_whose_items_are_all_skipped_stops_with_an_error(data: Path, tmp_path: Path, caplog) -> None:
    stream = _stream(data, tmp_path / "shards", 8, shuffle_buffer=1, skip_bad_samples=True)
    _rewrite(Path(stream.urls[0]), lambda member: (member[0], b"not a png") if member[0].endswith(".hint.png")
             else member)
    with caplog.at_level(logging.WARNING), pytest.raises(ValueError) as error:
        list(stream)
    assert str(error.value) == ("--skip_bad_samples skipped every item of the shards that rank 0 (DataLoader worker 0) "
                                "reads, which leaves it 8 items short of its 8 for the epoch, and every rank must "
                                "serve the same batches; remake the damaged shards with tool_make_shards.py or leave "
                                "them out of --data_shards")
