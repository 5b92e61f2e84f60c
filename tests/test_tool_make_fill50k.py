"""The offline Fill50K generator: format, colours, geometry, determinism, atomic writing and CLI errors."""
from __future__ import annotations

import filecmp
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageColor

import tool_make_fill50k
from cldm.cli import run
from cldm.data import fill50k
from cldm.data.fill50k import MARKER_NAME, NAMED_COLOURS, generate_fill50k, sample_item
from cldm.processes import ProcessIdentity

COUNT, SIZE, SEED = 12, 64, 0
PROMPT_PATTERN = re.compile(r"^([a-z ]+) circle with ([a-z ]+) background$")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("generated") / "fill50k"
    generate_fill50k(out, COUNT, SIZE, SEED, workers=1, show_progress=False)
    return out


def read_records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "prompt.json").read_text(encoding="utf-8").splitlines()]


def read_rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_UNCHANGED), cv2.COLOR_BGR2RGB)


def all_files(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())


# --------------------------------------------------------------------------------------------
# Format
# --------------------------------------------------------------------------------------------


def test_colour_table_is_the_css_table_split_into_words():
    # getrgb(name), not the table value: Pillow caches resolved tuples in colormap once a name is used
    css = {name: ImageColor.getrgb(name) for name in list(ImageColor.colormap) if "grey" not in name}
    ours = {name.replace(" ", ""): rgb for name, rgb in NAMED_COLOURS.items()}
    assert ours == css
    assert NAMED_COLOURS["burly wood"] == (222, 184, 135)
    assert "medium sea green" in NAMED_COLOURS and "pale golden rod" in NAMED_COLOURS
    assert all(re.fullmatch(r"[a-z]+( [a-z]+)*", name) for name in NAMED_COLOURS)


def test_folder_layout_and_json_lines(dataset):
    assert all_files(dataset) == sorted(
        ["prompt.json", MARKER_NAME]
        + [f"{kind}/{index}.png" for kind in ("source", "target") for index in range(COUNT)]
    )
    marker = json.loads((dataset / MARKER_NAME).read_text(encoding="utf-8"))
    assert marker == {"generator": "tool_make_fill50k.py", "version": 1, "count": COUNT, "size": SIZE, "seed": SEED}
    lines = (dataset / "prompt.json").read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "" and len(lines) == COUNT + 1
    for index, line in enumerate(lines[:-1]):
        record = json.loads(line)
        assert list(record) == ["source", "target", "prompt"]
        assert record["source"] == f"source/{index}.png" and record["target"] == f"target/{index}.png"


def test_images_are_8bit_rgb_of_the_requested_size(dataset):
    for record in read_records(dataset):
        for key in ("source", "target"):
            with Image.open(dataset / record[key]) as image:
                assert image.format == "PNG" and image.mode == "RGB" and image.size == (SIZE, SIZE)


def test_prompts_and_pixels_use_named_colours(dataset):
    for index, record in enumerate(read_records(dataset)):
        match = PROMPT_PATTERN.match(record["prompt"])
        assert match, record["prompt"]
        circle_rgb, background_rgb = NAMED_COLOURS[match.group(1)], NAMED_COLOURS[match.group(2)]
        assert circle_rgb != background_rgb
        item = sample_item(SEED, index, SIZE)
        x, y = item.centre
        corner_x, corner_y = (0 if x >= SIZE / 2 else SIZE - 1), (0 if y >= SIZE / 2 else SIZE - 1)
        target = read_rgb(dataset / record["target"])
        source = read_rgb(dataset / record["source"])
        assert tuple(target[y, x]) == circle_rgb
        assert tuple(target[corner_y, corner_x]) == background_rgb
        assert tuple(source[y, x]) == (0, 0, 0) and tuple(source[corner_y, corner_x]) == (0, 0, 0)


def test_outline_lies_on_the_filled_circles_border(dataset):
    # Away from the image frame, where a cut circle's border may lie just outside the image.
    interior = np.zeros((SIZE, SIZE), bool)
    interior[3:-3, 3:-3] = True
    kernel = np.ones((3, 3), np.uint8)
    for record in read_records(dataset):
        circle, background = PROMPT_PATTERN.match(record["prompt"]).groups()
        target = read_rgb(dataset / record["target"]).astype(np.int32)
        to_circle = np.abs(target - NAMED_COLOURS[circle]).sum(-1)
        to_background = np.abs(target - NAMED_COLOURS[background]).sum(-1)
        disc = (to_circle < to_background).astype(np.uint8)
        border = (cv2.dilate(disc, kernel) - cv2.erode(disc, kernel)).astype(bool)  # 2 px band across the border
        outline = cv2.cvtColor(read_rgb(dataset / record["source"]), cv2.COLOR_RGB2GRAY) > 127
        assert (border & interior).any() and (outline & interior).any()
        distance_to_border = cv2.distanceTransform((~border).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        distance_to_outline = cv2.distanceTransform((~outline).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        assert distance_to_border[outline & interior].max() <= 2.0
        assert distance_to_outline[border & interior].max() <= 2.0
        # The outline is a thin line, not a disc.
        assert outline.sum() <= 2 * border.sum()


def test_items_vary_and_circle_differs_from_background():
    items = [sample_item(SEED, index, SIZE) for index in range(500)]
    assert all(NAMED_COLOURS[i.circle_colour] != NAMED_COLOURS[i.background_colour] for i in items)
    assert all(0 <= i.centre[0] < SIZE and 0 <= i.centre[1] < SIZE and SIZE // 16 <= i.radius for i in items)
    assert len({i.prompt for i in items}) > 400
    assert len({i.background_colour for i in items}) > 100


# --------------------------------------------------------------------------------------------
# Determinism
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_same_seed_same_bytes_for_any_worker_count(dataset, tmp_path):
    parallel = generate_fill50k(tmp_path / "two", COUNT, SIZE, SEED, workers=2, show_progress=False)
    files = all_files(dataset)
    assert all_files(parallel) == files
    _, mismatch, errors = filecmp.cmpfiles(dataset, parallel, files, shallow=False)
    assert mismatch == [] and errors == []


def test_another_seed_gives_another_data_set(dataset, tmp_path):
    other = generate_fill50k(tmp_path / "other", COUNT, SIZE, SEED + 1, show_progress=False)
    assert read_records(other) != read_records(dataset)


# --------------------------------------------------------------------------------------------
# Atomic writing and overwriting
# --------------------------------------------------------------------------------------------


def test_refuses_to_overwrite_without_force(tmp_path, capsys):
    out = tmp_path / "fill50k"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    code = run(tool_make_fill50k.main, ["--out", str(out), "--count", "2", "--size", "64", "--quiet"])
    assert code == 2
    message = f"output folder '{out}' already exists; choose another name or pass --force"
    assert capsys.readouterr().err == f"error: {message}\n"
    assert all_files(out) == ["mine.txt"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["fill50k"]


def test_temporary_folders_of_killed_runs_are_removed_and_live_ones_kept(tmp_path):
    out = tmp_path / "fill50k"
    host = ProcessIdentity.current().host
    dead = tmp_path / f".fill50k.{2**22 + 1}-0-{host}.0123abcd.tmp"  # above Linux's largest pid: no such process
    live = tmp_path / f".fill50k.{os.getppid()}-0-{host}.0123abcd.tmp"
    for folder in (dead, live):
        (folder / "source").mkdir(parents=True)
    generate_fill50k(out, 2, SIZE, show_progress=False)
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(["fill50k", live.name])


def test_force_refuses_a_folder_the_generator_did_not_make(tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "cldm" / "data").mkdir(parents=True)
    (out / "cldm" / "data" / "fill50k.py").write_text("the user's code")
    code = run(tool_make_fill50k.main, ["--out", str(out), "--count", "2", "--size", "64", "--force", "--quiet"])
    assert code == 2 and capsys.readouterr().err == (
        f"error: output folder '{out}' is not empty and holds no {MARKER_NAME}; it is not a data set made by "
        "tool_make_fill50k.py, so it is not replaced even with --force\n")
    assert all_files(out) == ["cldm/data/fill50k.py"] and sorted(path.name for path in tmp_path.iterdir()) == ["mine"]


def test_force_refuses_a_data_set_unzipped_by_the_user(dataset, tmp_path, capsys):
    out = tmp_path / "fill50k"
    shutil.copytree(dataset, out)
    (out / MARKER_NAME).unlink()  # as in training/fill50k.zip
    before = all_files(out)
    code = run(tool_make_fill50k.main, ["--out", str(out), "--count", "2", "--size", "64", "--force", "--quiet"])
    assert code == 2 and capsys.readouterr().err == (
        f"error: output folder '{out}' holds a data set that tool_make_fill50k.py did not make (it has no "
        f"{MARKER_NAME}; the unzipped fill50k.zip, say), so it is not replaced even with --force; delete it by hand "
        "or choose another --out\n")
    assert all_files(out) == before


@pytest.mark.slow
def test_force_replaces_an_existing_data_set(tmp_path, caplog):
    out = tmp_path / "fill50k"
    generate_fill50k(out, 3, SIZE, seed=1, show_progress=False)
    with caplog.at_level(logging.INFO):
        code = run(tool_make_fill50k.main, ["--out", str(out), "--count", "2", "--size", "64", "--force", "--quiet"])
    assert code == 0 and f"Wrote 2 Fill50K pairs of 64x64 px to {out} in" in caplog.text
    assert read_records(out) == [sample_item(0, index, SIZE).record() for index in range(2)]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["fill50k"]


ORIGINAL_DRAW_PAIR = fill50k.draw_pair


def failing_draw(item, size):
    if item.index == 3:
        raise RuntimeError("simulated failure")
    return ORIGINAL_DRAW_PAIR(item, size)


@pytest.mark.parametrize("force", [False, True])
def test_failure_leaves_no_partial_data_set(tmp_path, monkeypatch, force):
    out = tmp_path / "fill50k"
    if force:
        generate_fill50k(out, 2, SIZE, show_progress=False)
    before = all_files(out) if force else None
    monkeypatch.setattr(fill50k, "draw_pair", failing_draw)
    with pytest.raises(RuntimeError, match="simulated failure"):
        generate_fill50k(out, 6, SIZE, workers=1, force=force, show_progress=False)
    assert sorted(path.name for path in tmp_path.iterdir()) == (["fill50k"] if force else [])
    if force:
        assert all_files(out) == before


def test_failure_while_writing_prompt_file_leaves_nothing(tmp_path, monkeypatch):
    def fail(path, records):
        raise OSError("disk full")

    monkeypatch.setattr(fill50k, "_write_prompt_file", fail)
    with pytest.raises(OSError, match="disk full"):
        generate_fill50k(tmp_path / "fill50k", 2, SIZE, show_progress=False)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--count", "0"], "count must be at least 1, got 0."),
        (["--count", "-5"], "count must be at least 1, got -5."),
        (["--size", "56"], "size must be a multiple of 8 and at least 64, got 56."),
        (["--size", "100"], "size must be a multiple of 8 and at least 64, got 100."),
        (["--workers", "0"], "workers must be at least 1, got 0."),
        (["--seed", "-1"], "seed must be zero or positive, got -1."),
        (["--count", str(10**30)], f"count must be at most 10000000 (the records are held in memory), got {10**30}."),
        (["--size", "8200"], "size must be at most 8192 (the largest images training reads), got 8200."),
        (["--seed", str(2**32)], f"seed must be at most 4294967295, got {2**32}."),
        (["--workers", "257"], "workers must be at most 256 (each is a process), got 257."),
    ],
)
def test_bad_flags_give_one_line_and_exit_code_2(tmp_path, capsys, flags, message):
    code = run(tool_make_fill50k.main, ["--out", str(tmp_path / "fill50k"), "--quiet", *flags])
    err = capsys.readouterr().err
    assert code == 2
    assert err == f"error: {message}\n"
    assert list(tmp_path.iterdir()) == []


def test_missing_output_parent(tmp_path, capsys):
    code = run(tool_make_fill50k.main, ["--out", str(tmp_path / "missing" / "fill50k"), "--count", "2", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert err == f"error: output folder '{tmp_path / 'missing'}' does not exist; create it first\n"
    assert list(tmp_path.iterdir()) == []


def test_unwritable_output_parent(tmp_path, capsys, monkeypatch):
    # Simulated: permission bits do not stop root, who may run the tests.
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    code = run(tool_make_fill50k.main, ["--out", str(tmp_path / "fill50k"), "--count", "2", "--quiet"])
    assert code == 2
    assert capsys.readouterr().err == f"error: output folder '{tmp_path}' is not writable; choose another folder\n"
    assert list(tmp_path.iterdir()) == []


def test_debug_flag_shows_the_exception(tmp_path):
    with pytest.raises(ValueError, match="count must be at least 1"):
        run(tool_make_fill50k.main, ["--out", str(tmp_path / "fill50k"), "--count", "0", "--debug"])


@pytest.mark.slow
def test_script_runs_as_a_program(tmp_path, repo_root):
    out = tmp_path / "fill50k"
    command = [sys.executable, "tool_make_fill50k.py", "--out", str(out), "--count", "3", "--size", "64"]
    result = subprocess.run(command, cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert len(read_records(out)) == 3
    failed = subprocess.run(command, cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert failed.returncode == 2
    assert failed.stderr.strip().startswith("error: ") and "Traceback" not in failed.stderr
