"""cldm.data.images: sizes from the header, the pixel limit before decoding, every decoding failure one exception."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from cldm.data.images import (
    DEFAULT_MAX_IMAGE_PIXELS,
    PILLOW_MAX_IMAGE_PIXELS,
    TooManyPixelsError,
    UnreadableImageError,
    check_pixel_limit,
    header_size,
    read_color,
    read_unchanged,
)


def _written(path: Path, image: np.ndarray) -> Path:
    assert cv2.imwrite(str(path), image)
    return path


def test_the_default_limit_is_8192_squared() -> None:
    assert DEFAULT_MAX_IMAGE_PIXELS == 8192 * 8192 == 67108864


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp", ".tif", ".webp"])
def test_header_size_is_width_height(tmp_path: Path, suffix: str) -> None:
    path = _written(tmp_path / f"wide{suffix}", np.zeros((48, 80, 3), np.uint8))
    assert header_size(path) == (80, 48)


def test_read_color_equals_cv2_imread(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for name, image in {"rgb.png": rng.integers(0, 256, (40, 24, 3), dtype=np.uint8),
                        "gray.png": rng.integers(0, 256, (40, 24), dtype=np.uint8),
                        "rgba.png": rng.integers(0, 256, (40, 24, 4), dtype=np.uint8),
                        "deep.png": rng.integers(0, 65536, (40, 24, 3), dtype=np.uint16),
                        "photo.jpg": rng.integers(0, 256, (40, 24, 3), dtype=np.uint8)}.items():
        path = _written(tmp_path / name, image)
        np.testing.assert_array_equal(read_color(path), cv2.imread(str(path), cv2.IMREAD_COLOR))
        np.testing.assert_array_equal(read_unchanged(path), cv2.imread(str(path), cv2.IMREAD_UNCHANGED))


@pytest.mark.parametrize("reduction", [2, 4, 8])
def test_read_color_at_reduced_size(tmp_path: Path, reduction: int) -> None:
    path = _written(tmp_path / "big.png", np.zeros((128, 64, 3), np.uint8))
    assert read_color(path, reduction=reduction).shape == (128 // reduction, 64 // reduction, 3)


def test_too_many_pixels_is_refused_from_the_header(tmp_path: Path) -> None:
    path = tmp_path / "huge.png"
    Image.new("1", (12000, 12000)).save(path)
    assert path.stat().st_size < 100_000
    for read in (header_size, read_color, read_unchanged):
        with pytest.raises(TooManyPixelsError) as caught:
            read(path)
        assert (caught.value.width, caught.value.height, caught.value.limit) == (12000, 12000, DEFAULT_MAX_IMAGE_PIXELS)
        assert caught.value.size_text() == "12000x12000 px"
    assert header_size(path, max_pixels=12000 * 12000) == (12000, 12000)


def test_over_pillows_own_limit_is_too_many_pixels(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    Image.new("1", (14000, 14000)).save(path)
    with pytest.raises(TooManyPixelsError) as caught:
        header_size(path, max_pixels=PILLOW_MAX_IMAGE_PIXELS)
    assert caught.value.size_text() == f"over {PILLOW_MAX_IMAGE_PIXELS} pixels"


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n truncated", b"GIF89a not really", b"plain text\n"],
                         ids=["empty", "truncated-png", "fake-gif", "text"])
def test_undecodable_files_are_one_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken.png"
    path.write_bytes(content)
    for read in (header_size, read_color, read_unchanged):
        with pytest.raises(UnreadableImageError):
            read(path)


def test_truncated_pixel_data_is_one_error(tmp_path: Path) -> None:
    path = _written(tmp_path / "cut.png", np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:200])  # the header survives, the pixels do not
    assert header_size(path) == (64, 64)
    with pytest.raises(UnreadableImageError):
        read_color(path)


def test_missing_file_is_not_called_unreadable(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        header_size(tmp_path / "nowhere.png")


@pytest.mark.parametrize("limit", [0, -1, PILLOW_MAX_IMAGE_PIXELS + 1])
def test_pixel_limit_range(limit: int) -> None:
    with pytest.raises(ValueError, match=f"--max_image_pixels must be between 1 and {PILLOW_MAX_IMAGE_PIXELS}"):
        check_pixel_limit(limit, "--max_image_pixels")
    check_pixel_limit(PILLOW_MAX_IMAGE_PIXELS, "--max_image_pixels")
