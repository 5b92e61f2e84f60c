"""cldm.data.geometry: crop boxes, the shared crop of a hint and its target, centre vs random, and stretch as the
original's resize."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from cldm.data.geometry import Box, crop_box, frame, resize, same_aspect_ratio


def gradient(width: int, height: int) -> np.ndarray:
    """An image whose every pixel tells its position: x in channel 0, y in channel 1 (scaled to 0..255)."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None].repeat(width, 1)
    return np.stack([x, y, np.zeros_like(x)], axis=-1).round().astype(np.uint8)


def original_resize(image: np.ndarray, resolution: int) -> np.ndarray:
    """The resize of MyDataset before `--resize crop`: both sides to `resolution`."""
    shrinking = image.shape[0] * image.shape[1] > resolution**2
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(image, (resolution, resolution), interpolation=interpolation)


def test_centre_crop_of_640x480_to_512_keeps_the_middle():
    assert crop_box((640, 480), (512, 512)) == Box(80, 0, 480, 480)
    image = gradient(640, 480)
    image[:, :80] = image[:, 560:] = 0  # the sides a centre crop leaves out
    out, = frame([image], (512, 512))
    assert out.shape == (512, 512, 3)
    expected, = frame([gradient(640, 480)[:, 80:560]], (512, 512))
    np.testing.assert_array_equal(out, expected)
    assert out[:, :, 0].min() > 0  # nothing of the left-out sides came in


def test_portrait_is_cropped_vertically():
    assert crop_box((480, 640), (512, 512)) == Box(0, 80, 480, 480)
    assert crop_box((512, 512), (512, 512)) == Box(0, 0, 512, 512)


def test_crop_box_of_another_aspect_ratio():
    assert crop_box((1000, 1000), (768, 512)) == Box(0, 166, 1000, 667)
    assert crop_box((300, 100), (128, 64)) == Box(50, 0, 200, 100)


def test_hint_and_target_get_the_same_crop():
    target = gradient(640, 480)
    hint = 255 - target
    rng = np.random.default_rng(5)
    out_hint, out_target = frame([hint, target], (256, 256), "crop", rng)
    np.testing.assert_array_equal(out_hint, 255 - out_target.astype(np.int32))
    box = crop_box((640, 480), (256, 256), np.random.default_rng(5))
    assert box.left not in (0, 80)  # a drawn position, neither an end nor the centre
    for image, out in ((hint, out_hint), (target, out_target)):
        np.testing.assert_array_equal(out, resize(image[:, box.left:box.left + 480], (256, 256)))


def test_random_crop_is_a_function_of_the_generator():
    boxes = [crop_box((640, 480), (512, 512), np.random.default_rng([3, 0, index, 1])) for index in range(50)]
    again = [crop_box((640, 480), (512, 512), np.random.default_rng([3, 0, index, 1])) for index in range(50)]
    assert boxes == again
    lefts = {box.left for box in boxes}
    assert len(lefts) > 10 and min(lefts) >= 0 and max(lefts) <= 160
    assert {box.top for box in boxes} == {0} and {box.width for box in boxes} == {480}


def test_random_crop_reaches_both_ends():
    lefts = {crop_box((66, 64), (64, 64), np.random.default_rng(seed)).left for seed in range(60)}
    assert lefts == {0, 1, 2}


@pytest.mark.parametrize("size", [32, 64, 100, 600])
@pytest.mark.parametrize("resize_mode", ["crop", "stretch"])
def test_square_images_give_the_original_pixels(size, resize_mode):
    image = np.random.default_rng(size).integers(0, 256, (size, size, 3), dtype=np.uint8)
    out, = frame([image], (64, 64), resize_mode, np.random.default_rng(0))
    np.testing.assert_array_equal(out, original_resize(image, 64))


def test_stretch_is_the_original_resize_of_any_image():
    image = gradient(640, 480)
    out, = frame([image], (512, 512), "stretch")
    np.testing.assert_array_equal(out, original_resize(image, 512))


def test_resize_to_its_own_size_is_the_image():
    image = gradient(64, 32)
    assert resize(image, (64, 32)) is image
    np.testing.assert_array_equal(cv2.resize(image, (64, 32), interpolation=cv2.INTER_LINEAR), image)


@pytest.mark.parametrize("size, other, same", [
    ((640, 480), (320, 240), True),
    ((1000, 501), (100, 50), True),  # the larger one, scaled to 100 px wide, is 50.1 px high
    ((640, 480), (320, 241), True),  # one pixel off at the smaller size
    ((640, 480), (320, 242), False),
    ((64, 64), (128, 64), False),
    ((64, 64), (64, 64), True),
])
def test_same_aspect_ratio_within_one_pixel(size, other, same):
    assert same_aspect_ratio(size, other) is same
    assert same_aspect_ratio(other, size) is same


def test_unknown_resize_mode_is_refused():
    with pytest.raises(ValueError, match="resize mode must be one of crop, stretch, got 'squash'"):
        frame([gradient(8, 8)], (8, 8), "squash")
