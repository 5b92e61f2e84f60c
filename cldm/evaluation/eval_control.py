"""What tool_eval_control.py runs: score a checkpoint, or images generated elsewhere, on the last items of a data
set, print a table of the metrics and write the per-item JSON and a grid of (hint, sample) pairs on request."""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from cldm.checkpoints.atomic import atomic_write
from cldm.checkpoints.paths import check_output_path
from cldm.data.dataset import MyDataset
from cldm.data.images import (
    DEFAULT_MAX_IMAGE_PIXELS, TooManyPixelsError, UnreadableImageError, check_pixel_limit, check_resolution_pixels,
    read_color,
)
from cldm.data.layouts import Columns
from cldm.evaluation.evaluate import (
    DEFAULT_BATCH_SIZE,
    EvalItem,
    EvaluationResult,
    dataset_items,
    sample_items,
    score_images,
    write_grid,
)
from cldm.sampling import LATENT_FACTOR, WeightSources, autocast_context, choose_device, load_control_ldm
from ldm.checkpoint import PathLike

logger = logging.getLogger(__name__)

# `--images` holds `<index>.<one of these>` per item.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class EvalSettings:
    """How the items are sampled (the defaults are those of training's evaluation and of the apps)."""

    ddim_steps: int = 20
    guidance_scale: float = 9.0
    eta: float = 0.0
    seed: int = 0
    batch_size: int = DEFAULT_BATCH_SIZE
    precision: str = "32"


# ---------------------------------------------------------------------------------------------
# Items and images
# ---------------------------------------------------------------------------------------------


def held_out_indices(length: int, count: int, source: PathLike) -> range:
    """The last `count` of `length` items: the ones training's `--val_items count` holds out of `source`."""
    if count < 1:
        raise ValueError(f"--items must be at least 1, got {count}")
    if count > length:
        raise ValueError(f"--items {count} is more than the {length} items in {source}; use at most {length}")
    return range(length - count, length)


def load_items(data_root: PathLike, count: int, resolution: int | None = None, resize: str = "crop",
               columns: Columns = Columns(), max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> list[EvalItem]:
    """The last `count` items of the data set in `data_root` (framed to `resolution` by `resize` as training does;
    `columns` name the columns of a metadata.jsonl); images over `max_image_pixels` are refused, as in training."""
    check_pixel_limit(max_image_pixels, "--max_image_pixels")
    check_resolution_pixels(resolution, max_image_pixels)
    dataset = MyDataset(root=str(data_root), resolution=resolution, resize=resize, columns=columns,
                        max_image_pixels=max_image_pixels)
    indices = held_out_indices(len(dataset), count, dataset.index_path)
    return dataset_items(dataset, indices)


def check_sample_sizes(items: Sequence[EvalItem]) -> None:
    """Refuse hints whose sides are not multiples of the latent factor (the sample would have another size)."""
    for item in items:
        height, width = item.hint.shape[:2]
        if height % LATENT_FACTOR or width % LATENT_FACTOR:
            raise ValueError(f"the hint of item {item.index} is {width}x{height} px; sampling needs sides that are "
                             f"multiples of {LATENT_FACTOR}: pass --resolution")


def _image_path(folder: Path, index: int) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        path = folder / f"{index}{suffix}"
        if path.is_file():
            return path
    return None


def _read_rgb(path: Path) -> np.ndarray:
    try:
        return cv2.cvtColor(read_color(path), cv2.COLOR_BGR2RGB)
    except (UnreadableImageError, TooManyPixelsError) as error:
        raise ValueError(f"image '{path}' cannot be scored: {error}") from None


def read_generated_images(folder: PathLike, items: Sequence[EvalItem]) -> list[np.ndarray]:
    """The image `<index>.png` (or .jpg, .jpeg, .webp) of each item from `folder`, as uint8 RGB of its hint's size;
    `index` is the item's line in prompt.json counted from 0 (for Fill50K, the number in its file names)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--images '{folder}' is not a folder; pass the folder of generated images")
    paths = [_image_path(folder, item.index) for item in items]
    missing = [item.index for item, path in zip(items, paths) if path is None]
    if missing:
        raise ValueError(f"--images '{folder}' has no image for {len(missing)} of the {len(items)} items (the first: "
                         f"{missing[0]}.png); name each image after its item's line in prompt.json, counted from 0 "
                         f"(the items scored are the data set's last --items)")
    images = []
    for item, path in zip(items, paths):
        image = _read_rgb(path)
        if image.shape != item.hint.shape:
            (height, width), (hint_height, hint_width) = image.shape[:2], item.hint.shape[:2]
            raise ValueError(f"image '{path}' is {width}x{height} px but the hint of item {item.index} is "
                             f"{hint_width}x{hint_height} px; generate at the hint's size or pass --resolution")
        images.append(image)
    return images


# ---------------------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------------------


def format_table(result: EvaluationResult) -> str:
    """One line per metric: mean, std, min, max over the items where it is defined, and how many those are."""
    lines = [f"{'metric':<24}{'mean':>10}{'std':>10}{'min':>10}{'max':>10}{'items':>8}"]
    for name, summary in result.summary().items():
        lines.append(f"{name:<24}{summary.mean:>10.4f}{summary.std:>10.4f}{summary.min:>10.4f}{summary.max:>10.4f}"
                     f"{summary.count:>8}")
    return "\n".join(lines)


def write_per_item_json(result: EvaluationResult, path: PathLike) -> None:
    """The per-item records (`EvaluationResult.per_item`) as a JSON list, atomically."""
    with atomic_write(path, "w") as file:
        json.dump(result.per_item(), file, indent=1)
        file.write("\n")


def _check_outputs(json_path: PathLike | None, grid: PathLike | None, overwrite: bool) -> None:
    if grid is not None and Path(grid).suffix.lower() != ".png":
        raise ValueError(f"--grid '{grid}' must be a .png file")
    if json_path is not None and grid is not None and Path(json_path).absolute() == Path(grid).absolute():
        raise ValueError(f"--json and --grid are both '{grid}'; give two names")
    for path in (json_path, grid):
        if path is not None:
            check_output_path(path, overwrite=overwrite)


# ---------------------------------------------------------------------------------------------
# The tool
# ---------------------------------------------------------------------------------------------


def evaluate_to_files(data_root: PathLike, count: int, *, weights: WeightSources | None = None,
                      images: PathLike | None = None, settings: EvalSettings | None = None,
                      resolution: int | None = None, device_name: str | None = None, json_path: PathLike | None = None,
                      grid: PathLike | None = None, overwrite: bool = False, resize: str = "crop",
                      columns: Columns = Columns(),
                      max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> EvaluationResult:
    """Score the last `count` items of `data_root`: sampled from `weights` with fixed seeds, or the images of the
    folder `images`; write the per-item JSON and the grid when asked. Every check runs before the model loads."""
    # 1. cheap checks, then the items
    settings = settings or EvalSettings()
    _check_outputs(json_path, grid, overwrite)
    if (images is None) == (weights is None):
        raise ValueError("give a checkpoint to sample from (--ckpt, or --base and --control) or --images with images "
                         "generated elsewhere, one of the two")
    device = choose_device(device_name)
    autocast_context(settings.precision, device)
    items = load_items(data_root, count, resolution, resize, columns, max_image_pixels)

    # 2. the images: read, or sampled
    if images is not None:
        generated = read_generated_images(images, items)
    else:
        check_sample_sizes(items)
        model = load_control_ldm(weights.config, ckpt=weights.ckpt, base=weights.base, control=weights.control)
        model = model.to(device)
        start = time.perf_counter()
        generated = sample_items(
            model, items, ddim_steps=settings.ddim_steps, guidance_scale=settings.guidance_scale, seed=settings.seed,
            eta=settings.eta, batch_size=settings.batch_size,
            autocast=lambda: autocast_context(settings.precision, device))
        logger.info("Sampled %d items with %d DDIM steps in %.1f s", len(items), settings.ddim_steps,
                    time.perf_counter() - start)

    # 3. scores and files
    result = score_images(generated, items)
    if json_path is not None:
        write_per_item_json(result, json_path)
    if grid is not None:
        write_grid(result, grid)
    return result
