"""How the images of one training item become images of the training size: pure functions on (H, W, C) arrays.

With `--resize crop` (the default) the largest box of the output's aspect ratio is cut from the image, centred or at
a drawn position, and resized to the output size, so nothing is squashed; `--resize stretch` resizes the whole image
to the output size, as the original scripts did. For a square image the box is the whole image, so both give the
same pixels. A hint and its target are cut by the same box; a hint of another size than its target, but of the
same aspect ratio, is first resized to the target's size (`same_aspect_ratio` says how close counts as the same).

Sizes are (width, height), as image headers and OpenCV give them; arrays are (height, width, channels).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import cv2
import numpy as np

RESIZE_MODES = ("crop", "stretch")
CROP_POSITIONS = ("center", "random")
# Two images have the same aspect ratio when the larger, scaled to the smaller's width, is this close in height.
ASPECT_TOLERANCE_PX = 1


class Box(NamedTuple):
    """A rectangle of an image, in pixels."""

    left: int
    top: int
    width: int
    height: int


def check_random_crop(crop: str, resize_mode: str, resolution: int | None) -> None:
    """Refuse `--crop random` where nothing is cropped: without `--resolution`, or with `--resize stretch`."""
    if crop != "random" or (resolution is not None and resize_mode == "crop"):
        return
    reason = "no --resolution (images are used whole)" if resolution is None else "--resize stretch"
    raise ValueError(f"--crop random crops only with --resolution and --resize crop, and this run has {reason}; pass "
                     f"--resolution 512 (or another multiple of 64) with --resize crop, or drop --crop random")


def same_aspect_ratio(size: tuple[int, int], other: tuple[int, int], tolerance: int = ASPECT_TOLERANCE_PX) -> bool:
    """Whether two (width, height) sizes have one aspect ratio: the larger image scaled to the smaller one's width
    has a height (rounded to whole pixels) within `tolerance` pixels of the smaller one's height."""
    (small_width, small_height), (large_width, large_height) = sorted((tuple(size), tuple(other)))
    return abs(round(large_height * small_width / large_width) - small_height) <= tolerance


def crop_box(size: tuple[int, int], out_size: tuple[int, int], rng: np.random.Generator | None = None) -> Box:
    """The largest box of `out_size`'s aspect ratio inside an image of `size`: centred, or at a position drawn
    uniformly from `rng` (two draws, horizontal then vertical, whatever the slack)."""
    width, height = size
    out_width, out_height = out_size
    box_width = min(width, round(height * out_width / out_height))
    box_height = min(height, round(width * out_height / out_width))
    slack_x, slack_y = width - box_width, height - box_height
    if rng is None:
        left, top = slack_x // 2, slack_y // 2
    else:
        left, top = int(rng.integers(0, slack_x + 1)), int(rng.integers(0, slack_y + 1))
    return Box(left, top, box_width, box_height)


def resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`image` at (width, height) `size`: area averaging where it loses pixels, bilinear where it gains them; an
    image already of that size is returned as it is (what `cv2.resize` would copy)."""
    height, width = image.shape[:2]
    if (width, height) == tuple(size):
        return image
    interpolation = cv2.INTER_AREA if width * height > size[0] * size[1] else cv2.INTER_LINEAR
    return cv2.resize(image, tuple(size), interpolation=interpolation)


def frame(images: Sequence[np.ndarray], out_size: tuple[int, int], resize_mode: str = "crop",
          rng: np.random.Generator | None = None) -> list[np.ndarray]:
    """Images of one size at `out_size`, all framed alike: stretched whole (`resize_mode` "stretch"), or cut to one
    `crop_box` (centred, or drawn from `rng`) and resized."""
    if resize_mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {', '.join(RESIZE_MODES)}, got {resize_mode!r}")
    height, width = images[0].shape[:2]
    if resize_mode == "stretch":
        return [resize(image, out_size) for image in images]
    left, top, box_width, box_height = crop_box((width, height), out_size, rng)
    return [resize(image[top:top + box_height, left:left + box_width], out_size) for image in images]
