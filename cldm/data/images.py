"""Bounded image reading: the size is read from the file's header before anything is decoded, so an image with too
many pixels (a small PNG can claim 12000x12000 px) is refused before it takes memory, and every failure to decode
is one exception, never an OpenCV traceback.

Pillow reads the header (`Image.open` reads only the header); OpenCV decodes, as the original does. A file whose
header Pillow cannot read is refused as unreadable.
"""
from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

# The default pixel limit: 8192x8192 px (64 Mi pixels, 192 MiB as 8-bit RGB); --max_image_pixels raises it.
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192
# Pillow refuses to open images above this many pixels (its decompression-bomb error), so no limit can exceed it.
PILLOW_MAX_IMAGE_PIXELS = 2 * Image.MAX_IMAGE_PIXELS
# cv2.imread flags that decode at 1/2, 1/4 and 1/8 of the size (JPEG decodes at that size directly).
REDUCED_COLOR = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
                 8: cv2.IMREAD_REDUCED_COLOR_8}


class UnreadableImageError(ValueError):
    """The file is empty, truncated, or not an image format that Pillow and OpenCV both read."""

    def __init__(self, path: str) -> None:
        super().__init__(f"{path} is not an image file that can be decoded")
        self.path = path


class TooManyPixelsError(ValueError):
    """The header gives more pixels than the limit; `width` and `height` are 0 where Pillow refused the size."""

    def __init__(self, path: str, width: int, height: int, limit: int) -> None:
        super().__init__(f"{path} is {width}x{height} px, more than the limit of {limit} pixels")
        self.path, self.width, self.height, self.limit = path, width, height, limit

    def size_text(self) -> str:
        """'WxH px' from the header, or 'over N pixels' where Pillow refused to give the size."""
        if self.width and self.height:
            return f"{self.width}x{self.height} px"
        return f"over {PILLOW_MAX_IMAGE_PIXELS} pixels"


def image_error(where: str, error: UnreadableImageError | TooManyPixelsError) -> ValueError:
    """The one sentence a data set gives for an image it cannot use; `where` names the image."""
    if isinstance(error, TooManyPixelsError):
        return ValueError(f"{where} is {error.size_text()}, more than the {error.limit} pixels allowed; shrink it, or "
                          f"raise the limit with --max_image_pixels.")
    return ValueError(f"{where} could not be read; it is not an image file OpenCV can decode.")


def check_pixel_limit(max_pixels: int, flag: str) -> None:
    """Refuse a limit that is not positive or that Pillow would not honour."""
    if not 1 <= max_pixels <= PILLOW_MAX_IMAGE_PIXELS:
        raise ValueError(f"{flag} must be between 1 and {PILLOW_MAX_IMAGE_PIXELS} (the largest image Pillow opens), "
                         f"got {max_pixels}")


def check_resolution_pixels(resolution: int | None, max_pixels: int) -> None:
    """Refuse a `--resolution` whose square images would have more pixels than an image may have."""
    if resolution is not None and resolution * resolution > max_pixels:
        raise ValueError(f"--resolution {resolution} makes images of {resolution}x{resolution} px, more than the "
                         f"{max_pixels} pixels allowed; use a smaller --resolution or raise --max_image_pixels")


def header_size(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                data: bytes | None = None) -> tuple[int, int]:
    """(width, height) from the file's header, nothing decoded; raises `UnreadableImageError` or
    `TooManyPixelsError`. With `data`, the header is read from these bytes and `path` only names them."""
    path = os.fspath(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path if data is None else io.BytesIO(data)) as image:
                width, height = image.size
    except Image.DecompressionBombError:
        raise TooManyPixelsError(path, 0, 0, max_pixels) from None
    except (UnidentifiedImageError, SyntaxError, ValueError, EOFError, OSError) as error:
        if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError)):
            raise
        raise UnreadableImageError(path) from None
    if width < 1 or height < 1:
        raise UnreadableImageError(path)
    if width * height > max_pixels:
        raise TooManyPixelsError(path, width, height, max_pixels)
    return width, height


def read_color(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
               reduction: int = 1) -> np.ndarray:
    """The image as uint8 BGR (H, W, 3), as `cv2.imread(path, cv2.IMREAD_COLOR)` reads it (gray, RGBA and 16-bit
    files become 8-bit BGR), after the header check; `reduction` 2, 4 or 8 decodes at that fraction of the size."""
    header_size(path, max_pixels)
    return _decoded(path, lambda: cv2.imread(os.fspath(path), REDUCED_COLOR[reduction]))


def decode_color(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """The image file's bytes `data` as `read_color` reads the file, after the header check; `name` names them in
    errors."""
    header_size(name, max_pixels, data)
    return _decoded(name, lambda: cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR))


def read_unchanged(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """The image as `cv2.IMREAD_UNCHANGED` decodes it (any depth and channel count), after the header check."""
    header_size(path, max_pixels)
    with open(path, "rb") as file:
        data = np.frombuffer(file.read(), dtype=np.uint8)
    return _decoded(path, lambda: cv2.imdecode(data, cv2.IMREAD_UNCHANGED))


def _decoded(path: str | os.PathLike, decode: Callable[[], np.ndarray | None]) -> np.ndarray:
    """The array `decode()` returns; an OpenCV error, None or an empty array is an `UnreadableImageError`."""
    try:
        image = decode()
    except cv2.error:
        image = None
    if image is None or image.size == 0:
        raise UnreadableImageError(os.fspath(path))
    return image
