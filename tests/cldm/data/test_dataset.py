"""MyDataset: the original's item format, its options, its input checks; the tutorial script and benchmark."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import cv2
import numpy as np
import pytest
from torch.utils.data import DataLoader

import tutorial_dataset_test
from cldm.data.data_order import ResumableRandomSampler, Visit
from cldm.data.fill50k import generate_fill50k
from tutorial_dataset import MyDataset

SIZE = 64


@pytest.fixture(scope="module")
def fill50k(tmp_path_factory) -> Path:
    return generate_fill50k(tmp_path_factory.mktemp("data") / "fill50k", 8, SIZE, seed=0, show_progress=False)


def write_dataset(root: Path, images: dict[str, np.ndarray], lines: list[str] | None = None) -> Path:
    """A data set whose items pair source/N.png with target/N.png; `images` maps relative paths to arrays."""
    for relative, image in images.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(root / relative), image)
    if lines is None:
        count = sum(name.startswith("source/") for name in images)
        records = [{"source": f"source/{i}.png", "target": f"target/{i}.png", "prompt": f"p{i}"} for i in range(count)]
        lines = [json.dumps(record) for record in records]
    (root / "prompt.json").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def solid(bgr: tuple[int, int, int], size: int = SIZE) -> np.ndarray:
    return np.full((size, size, 3), bgr, np.uint8)


# --------------------------------------------------------------------------------------------
# The original's behaviour
# --------------------------------------------------------------------------------------------


def test_items_have_the_original_format(fill50k):
    dataset = MyDataset(root=str(fill50k))
    records = [json.loads(line) for line in (fill50k / "prompt.json").read_text().splitlines()]
    assert len(dataset) == len(records) == 8
    for index, record in enumerate(records):
        item = dataset[index]
        assert set(item) == {"jpg", "txt", "hint"}
        assert item["txt"] == record["prompt"]
        for key in ("jpg", "hint"):
            assert item[key].dtype == np.float32 and item[key].shape == (SIZE, SIZE, 3)
        assert -1.0 <= item["jpg"].min() and item["jpg"].max() <= 1.0
        assert 0.0 <= item["hint"].min() and item["hint"].max() <= 1.0
        # Fill50K hints are white on black: both ends of the range occur.
        assert item["hint"].min() == 0.0 and item["hint"].max() == 1.0


def test_channel_order_and_scaling(tmp_path):
    # OpenCV writes BGR: (0, 0, 255) is pure red, (255, 0, 0) pure blue.
    root = write_dataset(tmp_path, {"source/0.png": solid((255, 0, 0)), "target/0.png": solid((0, 0, 255))})
    item = MyDataset(root=str(root))[0]
    np.testing.assert_array_equal(item["jpg"][0, 0], [1.0, -1.0, -1.0])
    np.testing.assert_array_equal(item["hint"][0, 0], [0.0, 0.0, 1.0])
    gray = write_dataset(tmp_path / "gray", {"source/0.png": solid((51, 51, 51)), "target/0.png": solid((51, 51, 51))})
    item = MyDataset(root=str(gray))[0]
    np.testing.assert_allclose(item["hint"][0, 0], 0.2, rtol=1e-6)
    np.testing.assert_allclose(item["jpg"][0, 0], 51 / 127.5 - 1.0, rtol=1e-6)


def test_values_equal_the_original_formula(tmp_path):
    ramp = np.arange(SIZE * SIZE * 3, dtype=np.uint32).reshape(SIZE, SIZE, 3).astype(np.uint8)  # every uint8 value
    root = write_dataset(tmp_path, {"source/0.png": ramp, "target/0.png": ramp[::-1].copy()})
    item = MyDataset(root=str(root))[0]
    source_rgb, target_rgb = ramp[..., ::-1], ramp[::-1, :, ::-1]
    np.testing.assert_array_equal(item["hint"], source_rgb.astype(np.float32) / 255.0)
    np.testing.assert_array_equal(item["jpg"], (target_rgb.astype(np.float32) / 127.5) - 1.0)


def test_default_root_is_training_fill50k(tmp_path, monkeypatch):
    black = solid((0, 0, 0))
    write_dataset(tmp_path / "training" / "fill50k", {"source/0.png": black, "target/0.png": black})
    monkeypatch.chdir(tmp_path)
    assert len(MyDataset()) == 1
    assert MyDataset()[0]["txt"] == "p0"


@pytest.mark.parametrize(
    "image, expected_rgb",
    [
        (np.full((SIZE, SIZE), 77, np.uint8), (77, 77, 77)),  # grayscale
        (np.dstack([solid((0, 0, 255)), np.full((SIZE, SIZE), 10, np.uint8)]), (255, 0, 0)),  # RGBA, nearly clear
        (np.full((SIZE, SIZE, 3), (0, 30000, 65535), np.uint16), (255, 117, 0)),  # 16-bit BGR
    ],
    ids=["gray", "rgba", "16-bit"],
)
def test_other_png_modes_become_8bit_rgb(tmp_path, image, expected_rgb):
    root = write_dataset(tmp_path, {"source/0.png": image, "target/0.png": image})
    item = MyDataset(root=str(root))[0]
    np.testing.assert_allclose(item["hint"][0, 0] * 255.0, expected_rgb, atol=1e-3)
    assert item["jpg"].shape == (SIZE, SIZE, 3)


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("resolution", [32, 128])
def test_resolution_resizes_both_images(fill50k, resolution):
    item = MyDataset(root=str(fill50k), resolution=resolution)[0]
    assert item["jpg"].shape == item["hint"].shape == (resolution, resolution, 3)
    full = MyDataset(root=str(fill50k))[0]
    # Area averaging keeps the mean colour.
    if resolution < SIZE:
        np.testing.assert_allclose(item["jpg"].mean(axis=(0, 1)), full["jpg"].mean(axis=(0, 1)), atol=0.02)


def test_target_alone_equals_the_items_target(fill50k):
    for resolution in (None, 64):
        dataset = MyDataset(root=str(fill50k), resolution=resolution)
        np.testing.assert_array_equal(dataset.target(1), dataset[1]["jpg"])


@pytest.mark.parametrize("resolution", [0, -8, 30])
def test_resolution_must_be_a_positive_multiple_of_8(fill50k, resolution):
    with pytest.raises(ValueError, match=f"resolution must be a positive multiple of 8, got {resolution}"):
        MyDataset(root=str(fill50k), resolution=resolution)


def test_prompt_dropout_rate(fill50k):
    dataset = MyDataset(root=str(fill50k), prompt_dropout=0.3, seed=0)
    draws = [dataset[i % len(dataset)]["txt"] == "" for i in range(2000)]
    assert abs(np.mean(draws) - 0.3) < 0.04  # about four standard deviations
    again = MyDataset(root=str(fill50k), prompt_dropout=0.3, seed=0)
    assert [again[i % len(again)]["txt"] == "" for i in range(2000)] == draws
    other = MyDataset(root=str(fill50k), prompt_dropout=0.3, seed=1)
    assert [other[i % len(other)]["txt"] == "" for i in range(2000)] != draws


def test_prompt_dropout_extremes(fill50k):
    never = MyDataset(root=str(fill50k), prompt_dropout=0.0)
    always = MyDataset(root=str(fill50k), prompt_dropout=1.0, seed=3)
    assert all(never[i]["txt"] for i in range(len(never)))
    assert all(always[i]["txt"] == "" for i in range(len(always)))
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="prompt_dropout must be a probability between 0 and 1"):
            MyDataset(root=str(fill50k), prompt_dropout=bad)


def test_prompt_dropout_of_a_visit_depends_on_seed_epoch_and_index_only(fill50k):
    dataset = MyDataset(root=str(fill50k), prompt_dropout=0.3, seed=0)
    visits = [Visit(index % len(dataset), seed=5, epoch=index // len(dataset)) for index in range(2000)]
    dropped = [dataset[visit]["txt"] == "" for visit in visits]
    assert abs(np.mean(dropped) - 0.3) < 0.04
    assert [dataset[visit]["txt"] == "" for visit in reversed(visits)] == dropped[::-1]  # no stream to advance
    other_dataset_seed = MyDataset(root=str(fill50k), prompt_dropout=0.3, seed=1)
    assert [other_dataset_seed[visit]["txt"] == "" for visit in visits] == dropped
    epoch_0 = dropped[:len(dataset)]
    assert any(dropped[k * len(dataset):(k + 1) * len(dataset)] != epoch_0 for k in range(1, 4))  # epochs differ
    assert [dataset[visit._replace(seed=6)]["txt"] == "" for visit in visits] != dropped


@pytest.mark.parametrize("num_workers", [0, 2])
def test_prompts_dropped_in_an_epoch_do_not_depend_on_workers(fill50k, num_workers):
    dataset = MyDataset(root=str(fill50k), prompt_dropout=0.5)
    sampler = ResumableRandomSampler(len(dataset), seed=4)
    sampler.set_epoch(1)
    want = {visit.index: dataset[visit]["txt"] for visit in sampler}
    loader = DataLoader(dataset, batch_size=2, sampler=sampler, num_workers=num_workers)
    got = [prompt for batch in loader for prompt in batch["txt"]]
    assert got == [want[visit.index] for visit in sampler]
    assert "" in got and any(got)


def test_dataloader_with_workers(fill50k):
    dataset = MyDataset(root=str(fill50k), prompt_dropout=0.5, seed=0)
    assert len(pickle.loads(pickle.dumps(dataset))) == len(dataset)
    loader = DataLoader(dataset, batch_size=4, num_workers=2)
    batches = list(loader)
    assert [tuple(batch["jpg"].shape) for batch in batches] == [(4, SIZE, SIZE, 3)] * 2
    assert tuple(batches[0]["hint"].shape) == (4, SIZE, SIZE, 3) and len(batches[0]["txt"]) == 4
    # With a seed, each worker's dropout draws are reproducible from run to run.
    assert [batch["txt"] for batch in loader] == [batch["txt"] for batch in batches]


# --------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"Data set folder {tmp_path / 'nope'} does not exist"):
        MyDataset(root=str(tmp_path / "nope"))


def test_missing_prompt_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="prompt.json does not exist"):
        MyDataset(root=str(tmp_path))


@pytest.mark.parametrize(
    "lines, message",
    [
        (['{"source": "s", "target": "t", "prompt": "p"}', "{not json"], "Line 2 of .* is not valid JSON"),
        (['{"source": "s", "target": "t", "prompt": "p"}', "", '{"source": "s", "target": "t"}'],
         "Line 3 of .* lacks the text key 'prompt'"),
        (['{"source": "s", "target": 3, "prompt": "p"}'], "Line 1 of .* lacks the text key 'target'"),
        (['["source", "target", "prompt"]'], "Line 1 of .* is not a JSON object"),
        (["", "   "], "lists no items"),
    ],
    ids=["invalid-json", "missing-key", "non-text-value", "not-an-object", "empty"],
)
def test_bad_prompt_file(tmp_path, lines, message):
    (tmp_path / "prompt.json").write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        MyDataset(root=str(tmp_path))


def test_prompt_file_not_utf8(tmp_path):
    (tmp_path / "prompt.json").write_bytes(b'{"source": "s", "target": "t", "prompt": "p"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(ValueError, match="Line 2 of .* is not UTF-8 text"):
        MyDataset(root=str(tmp_path))


def test_blank_lines_are_skipped(tmp_path):
    record = json.dumps({"source": "source/0.png", "target": "target/0.png", "prompt": "p"})
    root = write_dataset(tmp_path, {"source/0.png": solid((0, 0, 0)), "target/0.png": solid((0, 0, 0))},
                         lines=["", record, "  ", record, ""])
    assert len(MyDataset(root=str(root))) == 2


def test_missing_image_names_its_path(tmp_path):
    root = write_dataset(tmp_path, {"source/0.png": solid((0, 0, 0)), "target/0.png": solid((0, 0, 0))})
    (root / "target" / "0.png").unlink()
    with pytest.raises(FileNotFoundError, match=f"Image {root / 'target/0.png'} listed in prompt.json does not exist"):
        MyDataset(root=str(root))[0]


def test_unreadable_image_names_its_path(tmp_path):
    root = write_dataset(tmp_path, {"source/0.png": solid((0, 0, 0)), "target/0.png": solid((0, 0, 0))})
    (root / "source" / "0.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=f"Image {root / 'source/0.png'} could not be read"):
        MyDataset(root=str(root))[0]


def test_source_and_target_aspect_ratios_must_match(tmp_path):
    root = write_dataset(tmp_path, {"source/0.png": solid((0, 0, 0), 64), "target/0.png": np.zeros((64, 72, 3))})
    with pytest.raises(ValueError, match=r"Source source/0.png is 64x64 px but target target/0.png is 72x64 px; they "
                                         r"must have the same aspect ratio \(within 1 px\)"):
        MyDataset(root=str(root))[0]
    with pytest.raises(ValueError, match="Source source/0.png is 64x64 px but target target/0.png is 72x64 px"):
        MyDataset(root=str(root)).check_item(0)


def _pair_lines(source: str, target: str = "target/0.png") -> list[str]:
    return [json.dumps({"source": source, "target": target, "prompt": "p"})]


@pytest.mark.parametrize("source", ["/etc/passwd", "../outside.png", "source/../../outside.png", "source/\0.png"])
def test_image_paths_must_stay_inside_the_folder(tmp_path, source):
    root = write_dataset(tmp_path / "data", {"source/0.png": solid((0, 0, 0)), "target/0.png": solid((0, 0, 0))},
                         lines=_pair_lines("source/0.png") + _pair_lines(source))
    with pytest.raises(ValueError, match=f"^Line 2 of {root / 'prompt.json'} gives the source image .* which is "
                                         f"outside the data set folder; give a path inside it"):
        MyDataset(root=str(root))


def test_paths_and_symlinks_inside_the_folder_are_accepted(tmp_path):
    real = write_dataset(tmp_path / "real", {"source/0.png": solid((255, 0, 0)), "target/0.png": solid((0, 0, 255))},
                         lines=_pair_lines("target/../source/0.png", "./target/0.png"))
    (real / "hint.png").symlink_to(real / "source" / "0.png")
    (real / "prompt.json").write_text("\n".join(_pair_lines("target/../source/0.png") + _pair_lines("hint.png")))
    (tmp_path / "link").symlink_to(real)  # the data set folder itself may be a symlink
    dataset = MyDataset(root=str(tmp_path / "link"))
    np.testing.assert_array_equal(dataset[0]["hint"], dataset[1]["hint"])


def test_symlink_leading_out_of_the_folder_is_refused(tmp_path):
    root = write_dataset(tmp_path / "data", {"source/0.png": solid((0, 0, 0)), "target/0.png": solid((0, 0, 0))})
    cv2.imwrite(str(tmp_path / "private.png"), solid((0, 0, 0)))
    (root / "target" / "0.png").unlink()
    (root / "target" / "0.png").symlink_to(tmp_path / "private.png")
    with pytest.raises(ValueError, match="Line 1 of .* gives the target image 'target/0.png', which is outside"):
        MyDataset(root=str(root))


def test_pixel_limit_is_checked_before_decoding(tmp_path):
    root = write_dataset(tmp_path, {"source/0.png": solid((0, 0, 0)), "target/0.png": solid((0, 0, 0))})
    with pytest.raises(ValueError, match=f"Image {root / 'source/0.png'} is 64x64 px, more than the 4095 pixels "
                                         f"allowed; shrink it, or raise the limit with --max_image_pixels."):
        MyDataset(root=str(root), max_image_pixels=4095)[0]
    assert MyDataset(root=str(root), max_image_pixels=4096)[0]["hint"].shape == (64, 64, 3)


def test_check_item_gives_the_size_and_decodes_at_reduced_size(tmp_path):
    root = write_dataset(tmp_path, {"source/0.png": np.zeros((64, 128, 3), np.uint8),
                                    "target/0.png": np.zeros((64, 128, 3), np.uint8)})
    assert MyDataset(root=str(root)).check_item(0) == (128, 64)
    (root / "target" / "0.png").write_bytes((root / "target" / "0.png").read_bytes()[:100])
    with pytest.raises(ValueError, match=f"Image {root / 'target/0.png'} could not be read"):
        MyDataset(root=str(root)).check_item(0)


# --------------------------------------------------------------------------------------------
# Scripts
# --------------------------------------------------------------------------------------------


def test_tutorial_dataset_test_prints_like_the_original(fill50k, capsys):
    assert tutorial_dataset_test.main(["--root", str(fill50k), "--index", "5"]) == 0
    prompt = json.loads((fill50k / "prompt.json").read_text().splitlines()[5])["prompt"]
    assert capsys.readouterr().out.splitlines() == ["8", prompt, "(64, 64, 3)", "(64, 64, 3)"]


def test_tutorial_dataset_test_reports_errors(fill50k, tmp_path, capsys):
    assert tutorial_dataset_test.main(["--root", str(fill50k)]) == 2
    assert capsys.readouterr().err == "error: --index must be below the data set's length 8, got 1234.\n"
    assert tutorial_dataset_test.main(["--root", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.startswith("error: Data set folder")


# --------------------------------------------------------------------------------------------
# Resizing that keeps the picture (--resize, --crop; the geometry is tested in test_geometry.py)
# --------------------------------------------------------------------------------------------


def columns(width: int, height: int) -> np.ndarray:
    """A BGR image whose blue channel is the column index, so a crop tells where it was cut."""
    image = np.zeros((height, width, 3), np.uint8)
    image[:, :, 0] = np.arange(width, dtype=np.uint8)[None, :]
    return image


@pytest.fixture
def landscape(tmp_path) -> Path:
    """One 160x96 item whose source is the inverse of its target, and one with a half-size source (80x48)."""
    target = columns(160, 96)
    half = cv2.resize(255 - target, (80, 48), interpolation=cv2.INTER_AREA)
    return write_dataset(tmp_path, {"source/0.png": 255 - target, "target/0.png": target,
                                    "source/1.png": half, "target/1.png": target})


def test_default_crops_the_centre_of_a_landscape_pair(landscape):
    item = MyDataset(root=str(landscape), resolution=64)[0]
    assert item["jpg"].shape == item["hint"].shape == (64, 64, 3)
    stretched = MyDataset(root=str(landscape), resolution=64, resize="stretch")[0]
    # The centre square of 96 px of 160: columns 32..127, so the red channel (BGR blue) spans about that range.
    red = (item["jpg"][:, :, 2] + 1) * 127.5
    assert 31 < red.min() < 34 and 125 < red.max() < 128
    assert ((stretched["jpg"][:, :, 2] + 1) * 127.5).min() < 2  # stretch keeps the whole width
    np.testing.assert_allclose(item["hint"][:, :, 2] * 255, 255 - red, atol=1e-3)  # the same crop for the hint


def test_a_hint_of_half_the_size_is_resized_to_its_target(landscape):
    dataset = MyDataset(root=str(landscape), resolution=64)
    assert dataset.check_item(1) == (160, 96)
    full, half = dataset[0], dataset[1]
    np.testing.assert_array_equal(half["jpg"], full["jpg"])
    assert half["hint"].shape == (64, 64, 3)
    np.testing.assert_allclose(half["hint"], full["hint"], atol=6 / 255)  # two resizes instead of one
    assert MyDataset(root=str(landscape))[1]["hint"].shape == (96, 160, 3)  # without --resolution too


def test_random_crop_is_drawn_per_visit(landscape):
    dataset = MyDataset(root=str(landscape), resolution=64, crop="random")
    visits = [Visit(0, seed=7, epoch=epoch) for epoch in range(12)]
    crops = [dataset[visit]["jpg"] for visit in visits]
    again = MyDataset(root=str(landscape), resolution=64, crop="random")
    for visit, crop in zip(visits, crops):
        np.testing.assert_array_equal(again[visit]["jpg"], crop)
        np.testing.assert_allclose(again[visit]["hint"], (1 - crop) / 2, atol=1e-6)  # the hint's crop is the same
    assert len({crop[0, 0, 2].item() for crop in crops}) > 4  # the left edge moves between epochs


def test_random_crop_does_not_change_prompt_dropout(landscape):
    kwargs = dict(root=str(landscape), resolution=64, prompt_dropout=0.5)
    visits = [Visit(index % 2, seed=1, epoch=index) for index in range(20)]
    prompts = [MyDataset(**kwargs)[visit]["txt"] for visit in visits]
    assert prompts == [MyDataset(**kwargs, crop="random")[visit]["txt"] for visit in visits]


def test_square_images_are_the_same_with_crop_and_stretch(fill50k):
    for resolution in (32, 128):
        cropped = MyDataset(root=str(fill50k), resolution=resolution, crop="random")[Visit(2, 0, 0)]
        stretched = MyDataset(root=str(fill50k), resolution=resolution, resize="stretch")[2]
        for key in ("jpg", "hint"):
            np.testing.assert_array_equal(cropped[key], stretched[key])


def test_unknown_resize_mode_is_refused(fill50k):
    with pytest.raises(ValueError, match="resize must be one of crop, stretch and crop one of center, random, got "
                                         "'squash' and 'center'"):
        MyDataset(root=str(fill50k), resize="squash")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_random_crops_of_an_epoch_do_not_depend_on_workers_or_a_resume(landscape, num_workers):
    dataset = MyDataset(root=str(landscape), resolution=64, crop="random")
    sampler = ResumableRandomSampler(len(dataset), seed=4)
    sampler.set_epoch(3)
    want = np.stack([dataset[visit]["jpg"] for visit in sampler])
    loader = DataLoader(dataset, batch_size=1, sampler=sampler, num_workers=num_workers)
    np.testing.assert_array_equal(np.concatenate([batch["jpg"].numpy() for batch in loader]), want)
    sampler.resume(seed=4, epoch=3, samples_done=1)  # the rest of the epoch, as a resumed run sees it
    np.testing.assert_array_equal(np.concatenate([batch["jpg"].numpy() for batch in loader]), want[1:])
