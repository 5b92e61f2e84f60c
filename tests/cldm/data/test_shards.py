"""tool_make_shards.py: a data set folder of either layout -> WebDataset shards holding the same bytes."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

import tool_make_shards
from cldm.cli import run
from cldm.data.layouts import index_path, read_records
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

