"""Data set layouts: a Fill50K folder and the same items as an image folder (metadata.jsonl) give the same samples;
the layout is detected from the folder; a bad metadata.jsonl is refused with the line and the fix."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import tutorial_train
from cldm.data.dataset import MyDataset
from cldm.data.fill50k import generate_fill50k
from cldm.data.latent_cache import data_set_fingerprint
from cldm.data.layouts import Columns, index_path, read_metadata_file, read_records
from tiny_training import as_image_folder, make_initial_weights, train_args


@pytest.fixture(scope="module")
def fill50k(tmp_path_factory) -> Path:
    return generate_fill50k(tmp_path_factory.mktemp("data") / "fill50k", 6, 64, seed=0, show_progress=False)


@pytest.fixture
def image_folder(fill50k, tmp_path) -> Path:
    return as_image_folder(Path(shutil.copytree(fill50k, tmp_path / "folder")))


def write_metadata(folder: Path, rows: list[dict]) -> Path:
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return folder / "metadata.jsonl"


def test_both_layouts_give_the_same_samples(fill50k, image_folder):
    fill, folder = (MyDataset(str(root), resolution=64, prompt_dropout=0.5, seed=1) for root in (fill50k, image_folder))
    assert fill.index_path == str(fill50k / "prompt.json") and folder.index_path == str(image_folder / "metadata.jsonl")
    assert len(fill) == len(folder) == 6
    for index in range(6):
        a, b = fill[index], folder[index]
        assert a["txt"] == b["txt"]
        assert np.array_equal(a["jpg"], b["jpg"]) and np.array_equal(a["hint"], b["hint"])
    assert [fill.check_item(i) for i in range(6)] == [folder.check_item(i) for i in range(6)]


def test_columns_are_named_by_flags_or_spelled_as_imagefolder_spells_them(fill50k, image_folder):
    expected = read_records(str(fill50k / "prompt.json"))
    renamed = as_image_folder(Path(shutil.copytree(fill50k, image_folder.parent / "renamed")), "photo", "edges",
                              "caption")
    columns = Columns(image="photo", conditioning_image="edges", caption="caption")
    assert read_records(str(renamed / "metadata.jsonl"), columns) == expected
    rows = [{"file_name": record["target"], "conditioning_image_file_name": record["source"], "text": record["prompt"],
             "extra": 1} for record in expected]
    assert read_metadata_file(str(write_metadata(image_folder, rows))) == expected


def test_training_runs_on_an_image_folder(image_folder, tmp_path):
    initial = make_initial_weights(tmp_path / "initial.ckpt")
    argv = train_args(initial, image_folder, tmp_path / "run", "--max_steps", "1", "--log_max_images", "0")
    assert tutorial_train.main(argv) == 0
    assert list((tmp_path / "run").rglob("last.ckpt"))


def test_the_latent_cache_fingerprint_follows_metadata_jsonl(image_folder):
    records = read_records(index_path(str(image_folder)))
    before = data_set_fingerprint(image_folder, records)
    write_metadata(image_folder, [{"image": r["target"], "conditioning_image": r["source"], "text": r["prompt"] + "!"}
                                  for r in records])
    assert data_set_fingerprint(image_folder, records) != before


def test_a_folder_with_both_layouts_or_neither_is_refused(fill50k, tmp_path):
    mixed = Path(shutil.copytree(fill50k, tmp_path / "mixed"))
    write_metadata(mixed, [])
    with pytest.raises(ValueError, match=f"^Data set folder {mixed} holds both prompt.json \\(Fill50K layout\\) and "
                                         f"metadata.jsonl \\(image-folder layout\\); keep the one"):
        MyDataset(str(mixed))
    (tmp_path / "none").mkdir()
    with pytest.raises(FileNotFoundError, match="must hold a prompt.json \\(Fill50K layout\\) or a metadata.jsonl"):
        MyDataset(str(tmp_path / "none"))


def test_a_missing_column_names_the_line_the_column_and_the_columns_it_has(image_folder):
    path = write_metadata(image_folder, [{"image": "target/0.png", "conditioning_image": "source/0.png", "text": "a"},
                                         {"image": "target/1.png", "hint": "source/1.png", "text": "b"}])
    with pytest.raises(ValueError) as error:
        MyDataset(str(image_folder))
    assert str(error.value) == (f"Line 2 of {path} has no text column 'conditioning_image' (its columns: image, hint, "
                                f"text); add it, or name the column to read with --conditioning_image_column.")


def test_a_line_naming_a_missing_or_outside_file_is_refused(image_folder):
    path = write_metadata(image_folder, [{"image": "target/9.png", "conditioning_image": "source/0.png", "text": "a"}])
    with pytest.raises(FileNotFoundError) as error:
        MyDataset(str(image_folder))
    assert str(error.value) == (f"Line 1 of {path} gives the image 'target/9.png', which does not exist; restore the "
                                f"file or remove the line.")
    write_metadata(image_folder, [{"image": "target/0.png", "conditioning_image": "../x.png", "text": "a"}])
    with pytest.raises(ValueError, match="^Line 1 of .* gives the conditioning_image '../x.png', which is outside"):
        MyDataset(str(image_folder))


def test_column_flags_on_a_fill50k_folder_are_refused(fill50k):
    with pytest.raises(ValueError, match="name the columns of a metadata.jsonl, but .* has the Fill50K layout"):
        MyDataset(str(fill50k), columns=Columns(caption="prompt"))
