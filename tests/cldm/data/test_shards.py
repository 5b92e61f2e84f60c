"""tool_make_shards.py: a data set folder of either layout -> WebDataset shards holding the same bytes, read back
as the same items."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest

import tool_make_shards
from cldm.cli import run
from cldm.data.dataset import MyDataset
from cldm.data.layouts import index_path, read_records
from cldm.data.shards import make_shards, read_shard_samples
from tests.helpers.tiny_training import as_image_folder, make_data


def _members(folder: Path) -> dict[str, bytes]:
    """Every member of the shards that `folder`'s manifest lists, by name."""
    manifest = json.loads((folder / "shards.json").read_text())
    members = {}
    for name in manifest["shards"]:
        with tarfile.open(folder / name) as archive:
            for info in archive:
                members[info.name] = archive.extractfile(info).read()
    return members


@pytest.mark.parametrize("layout", ["fill50k", "image-folder"])
def test_shards_hold_the_folders_bytes_and_prompts(layout: str, tmp_path: Path) -> None:
    data = make_data(tmp_path / "data", 5)
    if layout == "image-folder":
        as_image_folder(data)
    out = tmp_path / "shards"
    assert run(tool_make_shards.main, ["--data_root", str(data), "--out", str(out), "--shard_size", "2"]) == 0
    manifest = json.loads((out / "shards.json").read_text())
    assert manifest["count"] == 5 and manifest["layout"] == layout
    assert manifest["shards"] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert sorted(path.name for path in out.iterdir()) == sorted(manifest["shards"] + ["shards.json"])
    expected = {}
    for index, record in enumerate(read_records(index_path(str(data)))):
        key = f"{index:09d}"
        expected[f"{key}.png"] = (data / record["target"]).read_bytes()
        expected[f"{key}.hint.png"] = (data / record["source"]).read_bytes()
        expected[f"{key}.txt"] = record["prompt"].encode("utf-8")
    assert _members(out) == expected


def test_overwrite_replaces_a_shard_folder_and_same_folder_gives_same_bytes(tmp_path: Path) -> None:
    data = make_data(tmp_path / "data", 3)
    out = tmp_path / "shards"
    argv = ["--data_root", str(data), "--out", str(out), "--shard_size", "4"]
    assert run(tool_make_shards.main, argv) == 0
    first = (out / "shard-000000.tar").read_bytes()
    assert run(tool_make_shards.main, argv + ["--overwrite"]) == 0
    assert (out / "shard-000000.tar").read_bytes() == first
    assert sorted(path.name for path in tmp_path.iterdir()) == ["data", "shards"]



def _shards(tmp_path: Path, count: int, shard_size: int) -> tuple[Path, list[Path]]:
    """A Fill50K data set of `count` items and the shard files made from it."""
    data = make_data(tmp_path / "data", count)
    out = tmp_path / "shards"
    make_shards(str(data), out, shard_size)
    return data, [out / name for name in json.loads((out / "shards.json").read_text())["shards"]]


def test_shard_samples_equal_the_data_sets_items(tmp_path: Path) -> None:
    data, paths = _shards(tmp_path, 5, 2)
    cv2.imwrite(str(data / "source" / "3.png"), np.full((32, 32), 200, np.uint8))  # gray, half size: resized
    make_shards(str(data), tmp_path / "shards", 2, overwrite=True)
    samples = list(read_shard_samples(paths))
    items = [MyDataset(root=str(data))[index] for index in range(5)]
    assert len(samples) == 5
    for sample, item in zip(samples, items):
        assert sample["txt"] == item["txt"]
        for key in ("jpg", "hint"):
            assert sample[key].dtype == item[key].dtype and np.array_equal(sample[key], item[key])


def _rewrite(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def test_a_truncated_shard_is_one_sentence(tmp_path: Path) -> None:
    _, paths = _shards(tmp_path, 2, 2)
    whole = paths[0].read_bytes()
    paths[0].write_bytes(whole[:100])  # inside the first header
    with pytest.raises(ValueError, match=rf"^Shard {paths[0]} is truncated or damaged: it is not a tar file;"):
        list(read_shard_samples(paths))
    paths[0].write_bytes(whole[:1000])  # inside the first member's bytes
    member = "000000000.hint.png"
    with pytest.raises(ValueError, match=rf"^Shard {paths[0]} is truncated or damaged in the member {member};"):
        list(read_shard_samples(paths))
    with tarfile.open(fileobj=io.BytesIO(whole)) as archive:
        infos = archive.getmembers()
    paths[0].write_bytes(whole[:infos[3].offset])  # cut where the second item starts
    with pytest.raises(ValueError, match=rf"^Shard {paths[0]} is truncated or damaged after the key 000000000;"):
        list(read_shard_samples(paths))


def test_an_item_without_a_hint_is_one_sentence(tmp_path: Path) -> None:
    _, paths = _shards(tmp_path, 1, 1)
    _rewrite(paths[0], [("000000000.png", (tmp_path / "data" / "target" / "0.png").read_bytes()),
                        ("000000000.txt", b"a prompt")])
    with pytest.raises(ValueError, match=rf"^Shard {paths[0]} has no source member \(a 000000000.hint.<ext>\) for the "
                                         rf"key 000000000 \(it holds 000000000.png, 000000000.txt\); remake it"):
        list(read_shard_samples(paths))


def test_an_empty_shard_list_is_one_sentence() -> None:
    with pytest.raises(ValueError, match="^The shard list is empty;"):
        list(read_shard_samples([]))
