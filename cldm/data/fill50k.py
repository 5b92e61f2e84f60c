"""Fill50K, the synthetic data set of the ControlNet tutorial, generated offline in its exact format.

Each item N is a pair of PNGs and a prompt:

* ``source/N.png``: black image with one anti-aliased white circle outline (the control hint);
* ``target/N.png``: the same circle filled with one named colour, on a background of another;
* prompt: ``"<circle colour> circle with <background colour> background"``.

``prompt.json`` lists the items in index order as JSON Lines. Item N depends only on
``(seed, N, size)``, so the bytes written do not depend on the number of worker processes.
The data set is written into a temporary sibling folder and renamed into place when complete, with a hidden
``.fill50k_generator.json`` that marks it as the generator's: only such a folder is replaced by ``force``.
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from cldm.checkpoints.atomic import atomic_path
from cldm.checkpoints.paths import check_output_path
from cldm.flags import MAX_PROCESSES, SEED_MAX

logger = logging.getLogger(__name__)
# The file that marks a folder as a data set of this generator (hidden: training reads only prompt.json).
MARKER_NAME = ".fill50k_generator.json"
MARKER_VERSION = 1
GENERATOR = "tool_make_fill50k.py"

# --------------------------------------------------------------------------------------------
# Colours
# --------------------------------------------------------------------------------------------

# The CSS/X11 named colours (the "gray" spellings only), written as the words of the prompts.
NAMED_COLOURS: dict[str, tuple[int, int, int]] = {
    "alice blue": (240, 248, 255),
    "antique white": (250, 235, 215),
    "aqua": (0, 255, 255),
    "aquamarine": (127, 255, 212),
    "azure": (240, 255, 255),
    "beige": (245, 245, 220),
    "bisque": (255, 228, 196),
    "black": (0, 0, 0),
    "blanched almond": (255, 235, 205),
    "blue": (0, 0, 255),
    "blue violet": (138, 43, 226),
    "brown": (165, 42, 42),
    "burly wood": (222, 184, 135),
    "cadet blue": (95, 158, 160),
    "chartreuse": (127, 255, 0),
    "chocolate": (210, 105, 30),
    "coral": (255, 127, 80),
    "cornflower blue": (100, 149, 237),
    "corn silk": (255, 248, 220),
    "crimson": (220, 20, 60),
    "cyan": (0, 255, 255),
    "dark blue": (0, 0, 139),
    "dark cyan": (0, 139, 139),
    "dark golden rod": (184, 134, 11),
    "dark gray": (169, 169, 169),
    "dark green": (0, 100, 0),
    "dark khaki": (189, 183, 107),
    "dark magenta": (139, 0, 139),
    "dark olive green": (85, 107, 47),
    "dark orange": (255, 140, 0),
    "dark orchid": (153, 50, 204),
    "dark red": (139, 0, 0),
    "dark salmon": (233, 150, 122),
    "dark sea green": (143, 188, 143),
    "dark slate blue": (72, 61, 139),
    "dark slate gray": (47, 79, 79),
    "dark turquoise": (0, 206, 209),
    "dark violet": (148, 0, 211),
    "deep pink": (255, 20, 147),
    "deep sky blue": (0, 191, 255),
    "dim gray": (105, 105, 105),
    "dodger blue": (30, 144, 255),
    "fire brick": (178, 34, 34),
    "floral white": (255, 250, 240),
    "forest green": (34, 139, 34),
    "fuchsia": (255, 0, 255),
    "gainsboro": (220, 220, 220),
    "ghost white": (248, 248, 255),
    "gold": (255, 215, 0),
    "golden rod": (218, 165, 32),
    "gray": (128, 128, 128),
    "green": (0, 128, 0),
    "green yellow": (173, 255, 47),
    "honey dew": (240, 255, 240),
    "hot pink": (255, 105, 180),
    "indian red": (205, 92, 92),
    "indigo": (75, 0, 130),
    "ivory": (255, 255, 240),
    "khaki": (240, 230, 140),
    "lavender": (230, 230, 250),
    "lavender blush": (255, 240, 245),
    "lawn green": (124, 252, 0),
    "lemon chiffon": (255, 250, 205),
    "light blue": (173, 216, 230),
    "light coral": (240, 128, 128),
    "light cyan": (224, 255, 255),
    "light golden rod yellow": (250, 250, 210),
    "light gray": (211, 211, 211),
    "light green": (144, 238, 144),
    "light pink": (255, 182, 193),
    "light salmon": (255, 160, 122),
    "light sea green": (32, 178, 170),
    "light sky blue": (135, 206, 250),
    "light slate gray": (119, 136, 153),
    "light steel blue": (176, 196, 222),
    "light yellow": (255, 255, 224),
    "lime": (0, 255, 0),
    "lime green": (50, 205, 50),
    "linen": (250, 240, 230),
    "magenta": (255, 0, 255),
    "maroon": (128, 0, 0),
    "medium aquamarine": (102, 205, 170),
    "medium blue": (0, 0, 205),
    "medium orchid": (186, 85, 211),
    "medium purple": (147, 112, 219),
    "medium sea green": (60, 179, 113),
    "medium slate blue": (123, 104, 238),
    "medium spring green": (0, 250, 154),
    "medium turquoise": (72, 209, 204),
    "medium violet red": (199, 21, 133),
    "midnight blue": (25, 25, 112),
    "mint cream": (245, 255, 250),
    "misty rose": (255, 228, 225),
    "moccasin": (255, 228, 181),
    "navajo white": (255, 222, 173),
    "navy": (0, 0, 128),
    "old lace": (253, 245, 230),
    "olive": (128, 128, 0),
    "olive drab": (107, 142, 35),
    "orange": (255, 165, 0),
    "orange red": (255, 69, 0),
    "orchid": (218, 112, 214),
    "pale golden rod": (238, 232, 170),
    "pale green": (152, 251, 152),
    "pale turquoise": (175, 238, 238),
    "pale violet red": (219, 112, 147),
    "papaya whip": (255, 239, 213),
    "peach puff": (255, 218, 185),
    "peru": (205, 133, 63),
    "pink": (255, 192, 203),
    "plum": (221, 160, 221),
    "powder blue": (176, 224, 230),
    "purple": (128, 0, 128),
    "rebecca purple": (102, 51, 153),
    "red": (255, 0, 0),
    "rosy brown": (188, 143, 143),
    "royal blue": (65, 105, 225),
    "saddle brown": (139, 69, 19),
    "salmon": (250, 128, 114),
    "sandy brown": (244, 164, 96),
    "sea green": (46, 139, 87),
    "sea shell": (255, 245, 238),
    "sienna": (160, 82, 45),
    "silver": (192, 192, 192),
    "sky blue": (135, 206, 235),
    "slate blue": (106, 90, 205),
    "slate gray": (112, 128, 144),
    "snow": (255, 250, 250),
    "spring green": (0, 255, 127),
    "steel blue": (70, 130, 180),
    "tan": (210, 180, 140),
    "teal": (0, 128, 128),
    "thistle": (216, 191, 216),
    "tomato": (255, 99, 71),
    "turquoise": (64, 224, 208),
    "violet": (238, 130, 238),
    "wheat": (245, 222, 179),
    "white": (255, 255, 255),
    "white smoke": (245, 245, 245),
    "yellow": (255, 255, 0),
    "yellow green": (154, 205, 50),
}

COLOUR_NAMES: tuple[str, ...] = tuple(NAMED_COLOURS)
_PROMPT = re.compile(r"(?P<circle>[a-z ]+) circle with (?P<background>[a-z ]+) background")


def parse_prompt(prompt: str) -> tuple[str, str] | None:
    """(circle colour, background colour) of a Fill50K prompt, or None when `prompt` is not one (a colour name
    outside `NAMED_COLOURS`, or other words)."""
    match = _PROMPT.fullmatch(prompt)
    if match is None or not {match["circle"], match["background"]} <= NAMED_COLOURS.keys():
        return None
    return match["circle"], match["background"]

# --------------------------------------------------------------------------------------------
# One item: sampling and drawing
# --------------------------------------------------------------------------------------------

MIN_SIZE = 64
# Training reads images of at most 8192x8192 px by default (--max_image_pixels).
MAX_SIZE = 8192
# The generator holds one record per item in memory (Fill50K has 50,000).
MAX_COUNT = 10_000_000
OUTLINE_BGR = (255, 255, 255)
OUTLINE_THICKNESS = 2
# Fast settings: a level-1 zlib stream without PNG row filters suits these flat images.
PNG_PARAMS = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_NONE]


@dataclass(frozen=True)
class Fill50KItem:
    """Everything that defines one item: circle centre (x, y) and radius in pixels, two colour names."""

    index: int
    centre: tuple[int, int]
    radius: int
    circle_colour: str
    background_colour: str

    @property
    def prompt(self) -> str:
        """The caption, e.g. "burly wood circle with orange background"."""
        return f"{self.circle_colour} circle with {self.background_colour} background"

    def record(self) -> dict[str, str]:
        """The item's line of prompt.json."""
        return {
            "source": f"source/{self.index}.png",
            "target": f"target/{self.index}.png",
            "prompt": self.prompt,
        }


def radius_range(size: int) -> tuple[int, int]:
    """The smallest and largest circle radius (inclusive) of an item of `size` px."""
    return size // 16, size * 5 // 16


def sample_item(seed: int, index: int, size: int) -> Fill50KItem:
    """Draw item `index` from its own random stream, seeded by (seed, index)."""
    rng = np.random.default_rng([seed, index])
    centre = (int(rng.integers(size)), int(rng.integers(size)))
    radius = int(rng.integers(*radius_range(size), endpoint=True))
    background = COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))]
    # Some names share one RGB value ("aqua" and "cyan"): the circle must stay visible.
    candidates = [name for name in COLOUR_NAMES if NAMED_COLOURS[name] != NAMED_COLOURS[background]]
    circle = candidates[rng.integers(len(candidates))]
    return Fill50KItem(index, centre, radius, circle, background)


def draw_pair(item: Fill50KItem, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The item's (source, target) images: uint8 BGR arrays of shape (size, size, 3), as OpenCV writes them."""
    source = np.zeros((size, size, 3), np.uint8)
    cv2.circle(source, item.centre, item.radius, OUTLINE_BGR, OUTLINE_THICKNESS, cv2.LINE_AA)
    target = _solid(size, _bgr(item.background_colour))
    cv2.circle(target, item.centre, item.radius, _bgr(item.circle_colour), cv2.FILLED, cv2.LINE_AA)
    return source, target


def _solid(size: int, bgr: tuple[int, int, int]) -> np.ndarray:
    image = np.empty((size, size, 3), np.uint8)
    image[0] = bgr
    image[1:] = image[0]  # Copying whole rows is far faster than broadcasting one pixel over the image.
    return image


def _bgr(name: str) -> tuple[int, int, int]:
    red, green, blue = NAMED_COLOURS[name]
    return blue, green, red


# --------------------------------------------------------------------------------------------
# Writing items
# --------------------------------------------------------------------------------------------


def write_items(folder: Path, seed: int, indices: range, size: int) -> list[dict[str, str]]:
    """Write items `indices` into folder/source and folder/target; returns their prompt.json records."""
    records = []
    for index in indices:
        item = sample_item(seed, index, size)
        source, target = draw_pair(item, size)
        record = item.record()
        _write_png(folder / record["source"], source)
        _write_png(folder / record["target"], target)
        records.append(record)
    return records


def _write_png(path: Path, image: np.ndarray) -> None:
    if not cv2.imwrite(str(path), image, PNG_PARAMS):
        raise OSError(f"OpenCV could not write {path}.")


def _write_chunk(task: tuple[Path, int, range, int]) -> tuple[range, list[dict[str, str]]]:
    folder, seed, indices, size = task
    return indices, write_items(folder, seed, indices, size)


def _map_chunks(
    folder: Path, seed: int, chunks: list[range], size: int, workers: int
) -> Iterator[tuple[range, list[dict[str, str]]]]:
    """Yield (indices, records) per chunk as chunks finish, in this process or in a pool."""
    tasks = [(folder, seed, chunk, size) for chunk in chunks]
    if workers == 1:
        yield from map(_write_chunk, tasks)
        return
    # "spawn" keeps workers independent of whatever threads the calling process runs.
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap_unordered(_write_chunk, tasks)


def _render_all(
    folder: Path, count: int, size: int, seed: int, workers: int, show_progress: bool
) -> list[dict[str, str]]:
    """Write all `count` items with a progress bar; returns their records in index order."""
    chunk_size = max(1, min(64, count // (4 * workers)))
    chunks = [range(start, min(start + chunk_size, count)) for start in range(0, count, chunk_size)]
    records: list = [None] * count
    with tqdm(total=count, unit="pair", desc="Fill50K", disable=not show_progress) as progress:
        for indices, chunk_records in _map_chunks(folder, seed, chunks, size, workers):
            records[indices.start : indices.stop] = chunk_records
            progress.update(len(indices))
    return records


def _write_prompt_file(path: Path, records: list[dict[str, str]]) -> None:
    with open(path, "w", encoding="utf-8") as file:
        file.writelines(json.dumps(record) + "\n" for record in records)


# --------------------------------------------------------------------------------------------
# The data set
# --------------------------------------------------------------------------------------------


def check_arguments(out: Path, count: int, size: int, seed: int, workers: int, force: bool) -> None:
    """Raise a one-sentence error for any argument that `generate_fill50k` cannot honour."""
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}.")
    if count > MAX_COUNT:
        raise ValueError(f"count must be at most {MAX_COUNT} (the records are held in memory), got {count}.")
    if size < MIN_SIZE or size % 8:
        raise ValueError(f"size must be a multiple of 8 and at least {MIN_SIZE}, got {size}.")
    if size > MAX_SIZE:
        raise ValueError(f"size must be at most {MAX_SIZE} (the largest images training reads), got {size}.")
    if seed < 0:
        raise ValueError(f"seed must be zero or positive, got {seed}.")
    if seed > SEED_MAX:
        raise ValueError(f"seed must be at most {SEED_MAX}, got {seed}.")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}.")
    if workers > MAX_PROCESSES:
        raise ValueError(f"workers must be at most {MAX_PROCESSES} (each is a process), got {workers}.")
    if force and (out / "prompt.json").is_file() and not (out / MARKER_NAME).is_file():
        raise FileExistsError(f"output folder '{out}' holds a data set that tool_make_fill50k.py did not make (it has "
                              f"no {MARKER_NAME}; the unzipped fill50k.zip, say), so it is not replaced even with "
                              f"--force; delete it by hand or choose another --out")
    check_output_path(out, overwrite=force, folder=True, overwrite_flag="--force", marker=MARKER_NAME,
                      kind="data set made by tool_make_fill50k.py", marker_fields={"generator": GENERATOR})


def _write_marker(folder: Path, count: int, size: int, seed: int) -> None:
    marker = {"generator": GENERATOR, "version": MARKER_VERSION, "count": count, "size": size, "seed": seed}
    (folder / MARKER_NAME).write_text(json.dumps(marker) + "\n", encoding="utf-8")


def generate_fill50k(
    out: str | os.PathLike,
    count: int = 50_000,
    size: int = 512,
    seed: int = 0,
    workers: int = 1,
    force: bool = False,
    show_progress: bool = True,
) -> Path:
    """Write `count` Fill50K pairs of `size` px into the folder `out`, all or nothing; returns its path.

    Args:
        out: the data set folder; it must not exist unless `force`, its parent must.
        workers: processes drawing and encoding; the bytes written do not depend on it.
        force: replace an existing `out` that this generator made (never another folder), once the new data set is
            complete.
    """
    out = Path(out).absolute()
    check_arguments(out, count, size, seed, workers, force)
    started = time.perf_counter()
    with atomic_path(out, folder=True) as folder:
        (folder / "source").mkdir()
        (folder / "target").mkdir()
        records = _render_all(folder, count, size, seed, workers, show_progress)
        _write_prompt_file(folder / "prompt.json", records)
        _write_marker(folder, count, size, seed)
        if out.exists() and not force:
            raise FileExistsError(f"{out} appeared while the data set was written; use --force to replace it.")
    logger.info("Wrote %d Fill50K pairs of %dx%d px to %s in %.1f s.", count, size, size, out,
                time.perf_counter() - started)
    return out
