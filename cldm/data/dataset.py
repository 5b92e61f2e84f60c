"""The tutorial's data set: folders of (source, target, prompt) items for ControlNet training.

A data set folder holds ``prompt.json`` (the Fill50K layout: JSON Lines, one ``{"source", "target", "prompt"}``
object per line, image paths relative to the folder) or ``metadata.jsonl`` (the image-folder layout of diffusers'
users), and the images it lists; `cldm.data.layouts` reads either. Make Fill50K with ``python tool_make_fill50k.py``
or unzip ``training/fill50k.zip`` into ``training/fill50k/``.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from cldm.data.data_order import Visit
from cldm.data.geometry import ASPECT_TOLERANCE_PX, CROP_POSITIONS, RESIZE_MODES, frame, resize, same_aspect_ratio
from cldm.data.images import (
    DEFAULT_MAX_IMAGE_PIXELS, TooManyPixelsError, UnreadableImageError, header_size, image_error, read_color,
)
from cldm.data.latent_cache import LatentCache
from cldm.data.layouts import IMAGE_KEYS, Columns, index_path, read_records

# Key of a visit's crop draws, beside (seed, epoch, index), so that they are independent of prompt dropout's.
CROP_STREAM = 1


def check_same_aspect_ratio(item: dict[str, str], source_size: tuple[int, int],
                             target_size: tuple[int, int]) -> None:
    """Refuse an item whose source and target differ in aspect ratio (a source of another size is resized)."""
    if not same_aspect_ratio(source_size, target_size):
        raise ValueError(
            f"Source {item['source']} is {source_size[0]}x{source_size[1]} px but target {item['target']} "
            f"is {target_size[0]}x{target_size[1]} px; they must have the same aspect ratio (within "
            f"{ASPECT_TOLERANCE_PX} px), so that one crop fits both."
        )


def hint_array(source: np.ndarray) -> np.ndarray:
    """A uint8 image as float32 in [0, 1], as the original's `x.astype(np.float32) / 255.0`."""
    hint = source.astype(np.float32)
    hint /= 255.0
    return hint


def target_array(target: np.ndarray) -> np.ndarray:
    """The target in [-1, 1], the range the autoencoder expects; in place, the float32 result equals the
    original's `x.astype(np.float32) / 127.5 - 1.0`."""
    jpg = target.astype(np.float32)
    jpg /= 127.5
    jpg -= 1.0
    return jpg


class MyDataset(Dataset):
    """Items of ``<root>/prompt.json`` or ``<root>/metadata.jsonl`` (`cldm.data.layouts`) as
    ``dict(jpg=target in [-1, 1], txt=prompt, hint=source in [0, 1])``.

    Both images are float32 RGB arrays of shape (H, W, 3). With the defaults this is the original
    tutorial's data set. A source of another size than its target (and of its aspect ratio) is resized to the
    target's size. Prompt dropout and random crops of a `Visit` (what the training's sampler yields) draw from
    ``(visit seed, epoch, index)``, so a resumed run and any number of DataLoader workers drop the same
    prompts and cut the same crops. Indexed by an integer, they draw from a NumPy generator made once per process:
    from ``(seed, DataLoader worker id)`` when `seed` is set, else from ``torch.initial_seed()``, which
    DataLoader workers derive from the main process's torch seed.

    Args:
        root: the data set folder holding prompt.json or metadata.jsonl.
        resolution: if set, both images become resolution x resolution (a positive multiple of 8), as `resize` says.
        resize: "crop": resize the short side to `resolution` and crop the long one (`cldm.data.geometry`);
            "stretch": resize the whole image, squashing a non-square one (the original's). Square images give the
            same pixels either way.
        crop: where "crop" cuts: "center", or "random" (drawn per visit).
        prompt_dropout: probability of replacing the prompt with "" (the paper drops 50 % for CFG training).
        seed: seed of the prompt-dropout draws; None follows torch's seeding.
        latent_cache: a cache of this data set (tool_cache_latents.py): items then hold the target's posterior
            moments and the prompt's embedding (`LatentCache.item`) instead of `jpg`, and no target is read.
        max_image_pixels: an image whose header gives more pixels is refused before it is decoded.
        columns: the columns of a metadata.jsonl (`cldm.data.layouts.Columns`; diffusers' names by default).
    """

    def __init__(
        self,
        root: str = "./training/fill50k",
        resolution: int | None = None,
        prompt_dropout: float = 0.0,
        seed: int | None = None,
        latent_cache: LatentCache | None = None,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        resize: str = "crop",
        crop: str = "center",
        columns: Columns = Columns(),
    ) -> None:
        if resolution is not None and (resolution <= 0 or resolution % 8):
            raise ValueError(f"resolution must be a positive multiple of 8, got {resolution}.")
        if resize not in RESIZE_MODES or crop not in CROP_POSITIONS:
            raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)} and crop one of "
                             f"{', '.join(CROP_POSITIONS)}, got {resize!r} and {crop!r}.")
        if not 0.0 <= prompt_dropout <= 1.0:
            raise ValueError(f"prompt_dropout must be a probability between 0 and 1, got {prompt_dropout}.")
        if seed is not None and seed < 0:
            raise ValueError(f"seed must be zero or positive, got {seed}.")
        if os.path.exists(root) and not os.path.isdir(root):
            raise NotADirectoryError(f"Data set folder {root} is a file; pass the folder that holds prompt.json, "
                                     f"source/ and target/.")
        if not os.path.isdir(root):
            raise FileNotFoundError(
                f"Data set folder {root} does not exist; make it with tool_make_fill50k.py or unzip fill50k.zip there."
            )
        self.index_path = index_path(root)
        self.root = root
        self.resolution = resolution
        self.prompt_dropout = prompt_dropout
        self.seed = seed
        self.latent_cache = latent_cache
        self.max_image_pixels = max_image_pixels
        self.resize = resize
        self.crop = crop
        self.out_sizes: list[tuple[int, int]] | None = None  # (width, height) of each item instead (--buckets)
        self.data = read_records(self.index_path, columns)
        self._rng: np.random.Generator | None = None
        self._rng_owner: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, idx: int | Visit) -> dict[str, np.ndarray | str | torch.Tensor]:
        index = idx.index if isinstance(idx, Visit) else idx
        item = self.data[index]
        if self.latent_cache is not None:
            return self._cached_item(item, idx, index)
        source = self._read_rgb(item["source"])
        target = self._read_rgb(item["target"])
        check_same_aspect_ratio(item, source.shape[1::-1], target.shape[1::-1])
        source, target = self._frame([source, target], target.shape[1::-1], idx)
        prompt = self._prompt(item, idx)
        return dict(jpg=target_array(target), txt=prompt, hint=hint_array(source))

    def target(self, index: int) -> np.ndarray:
        """Only the target image of item `index`, as `jpg` of an item (what the latent cache encodes)."""
        target = self._read_rgb(self.data[index]["target"])
        return target_array(self._frame([target], target.shape[1::-1], index)[0])

    def _prompt(self, item: dict[str, str], idx: int | Visit) -> str:
        """The item's prompt, or "" when this visit drops it."""
        if self.prompt_dropout > 0 and self._visit_rng(idx).random() < self.prompt_dropout:
            return ""
        return item["prompt"]

    def _cached_item(self, item: dict[str, str], idx: int | Visit,
                     index: int) -> dict[str, np.ndarray | str | torch.Tensor]:
        """The hint as usual (framed by the target's size, read from its header), the prompt, and the cached moments
        and prompt embedding in place of the target."""
        source = self._read_rgb(item["source"])
        target_size = self._image_size(item["target"])
        check_same_aspect_ratio(item, source.shape[1::-1], target_size)
        source, = self._frame([source], target_size, idx)
        self.latent_cache.check_image_size(source.shape[:2], os.path.join(self.root, item["source"]))
        prompt = self._prompt(item, idx)
        return dict(txt=prompt, hint=hint_array(source), **self.latent_cache.item(index, prompt))

    def check_item(self, index: int, reduction: int = 8) -> tuple[int, int]:
        """(width, height) of item `index`'s target (to which its source is resized), from its images' headers; both
        images are decoded, one at a time and at 1/`reduction` of their size, to check that they can be."""
        item = self.data[index]
        sizes = [self._image_size(item[key]) for key in IMAGE_KEYS]
        check_same_aspect_ratio(item, *sizes)
        for key in IMAGE_KEYS:
            self._read_rgb(item[key], reduction)
        return sizes[1]

    def target_size(self, index: int) -> tuple[int, int]:
        """(width, height) of item `index`'s target, from its header (nothing is decoded)."""
        return self._image_size(self.data[index]["target"])

    def _image_size(self, relative_path: str) -> tuple[int, int]:
        """(width, height) from the image's header."""
        with self._reading(relative_path) as path:
            return header_size(path, self.max_image_pixels)

    def _read_rgb(self, relative_path: str, reduction: int = 1) -> np.ndarray:
        """uint8 RGB (H, W, 3); IMREAD_COLOR turns gray, RGBA and 16-bit files into 8-bit BGR first."""
        with self._reading(relative_path) as path:
            image = read_color(path, self.max_image_pixels, reduction)
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)

    @contextlib.contextmanager
    def _reading(self, relative_path: str) -> Iterator[str]:
        """The image's path; a missing, unreadable or too large image becomes one sentence naming it."""
        path = os.path.join(self.root, relative_path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"Image {path} listed in {os.path.basename(self.index_path)} does not exist.")
        try:
            yield path
        except (UnreadableImageError, TooManyPixelsError) as error:
            raise image_error(f"Image {path}", error) from None

    def _frame(self, images: list[np.ndarray], target_size: tuple[int, int], idx: int | Visit) -> list[np.ndarray]:
        """The images of one item at the target's (width, height) `target_size`, then at `resolution` x
        `resolution` (or the item's size in `out_sizes`) as `resize` and `crop` say (all cut by one box)."""
        images = [resize(image, target_size) for image in images]
        if self.resolution is None:
            return images
        rng = self._visit_rng(idx, CROP_STREAM) if self.crop == "random" else None
        index = idx.index if isinstance(idx, Visit) else idx
        out_size = (self.resolution, self.resolution) if self.out_sizes is None else self.out_sizes[index]
        return frame(images, out_size, self.resize, rng)

    def _visit_rng(self, idx: int | Visit, *stream: int) -> np.random.Generator:
        """A generator of this visit, one per `stream` key (none for prompt dropout); for an integer index, this
        process's generator, made on first use so that each DataLoader worker draws its own stream."""
        if isinstance(idx, Visit):
            return np.random.default_rng([idx.seed, idx.epoch, idx.index, *stream])
        worker = get_worker_info()
        owner = (os.getpid(), worker.id if worker is not None else -1)
        if self._rng_owner != owner:
            entropy = torch.initial_seed() if self.seed is None else [self.seed, owner[1] + 1]
            self._rng = np.random.default_rng(entropy)
            self._rng_owner = owner
        return self._rng
