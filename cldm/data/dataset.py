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
from cldm.data.images import DEFAULT_MAX_IMAGE_PIXELS, TooManyPixelsError, UnreadableImageError, header_size, read_color
from cldm.data.latent_cache import LatentCache
from cldm.data.layouts import IMAGE_KEYS, Columns, index_path, read_records


def _check_same_size(item: dict[str, str], source_size: tuple[int, int], target_size: tuple[int, int]) -> None:
    """Refuse an item whose source and target differ in (width, height)."""
    if tuple(source_size) != tuple(target_size):
        raise ValueError(
            f"Source {item['source']} is {source_size[0]}x{source_size[1]} px but target {item['target']} "
            f"is {target_size[0]}x{target_size[1]} px; they must match."
        )


def _hint_array(source: np.ndarray) -> np.ndarray:
    """A uint8 image as float32 in [0, 1], as the original's `x.astype(np.float32) / 255.0`."""
    hint = source.astype(np.float32)
    hint /= 255.0
    return hint


def _target_array(target: np.ndarray) -> np.ndarray:
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
    tutorial's data set. Prompt dropout of a `Visit` (what the training's sampler yields) draws from
    ``(visit seed, epoch, index)``, so a resumed run and any number of DataLoader workers drop the same
    prompts. Indexed by an integer, it draws from a NumPy generator made once per process: from
    ``(seed, DataLoader worker id)`` when `seed` is set, else from ``torch.initial_seed()``, which
    DataLoader workers derive from the main process's torch seed.

    Args:
        root: the data set folder holding prompt.json or metadata.jsonl.
        resolution: if set, both images are resized to resolution x resolution (a positive multiple of 8).
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
        columns: Columns = Columns(),
    ) -> None:
        if resolution is not None and (resolution <= 0 or resolution % 8):
            raise ValueError(f"resolution must be a positive multiple of 8, got {resolution}.")
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
        _check_same_size(item, source.shape[1::-1], target.shape[1::-1])
        if self.resolution is not None:
            source, target = self._resize(source), self._resize(target)
        prompt = self._prompt(item, idx)
        return dict(jpg=_target_array(target), txt=prompt, hint=_hint_array(source))

    def target(self, index: int) -> np.ndarray:
        """Only the target image of item `index`, as `jpg` of an item (what the latent cache encodes)."""
        target = self._read_rgb(self.data[index]["target"])
        return _target_array(self._resize(target) if self.resolution is not None else target)

    def _prompt(self, item: dict[str, str], idx: int | Visit) -> str:
        """The item's prompt, or "" when this visit drops it."""
        if self.prompt_dropout > 0 and self._dropout_rng(idx).random() < self.prompt_dropout:
            return ""
        return item["prompt"]

    def _cached_item(self, item: dict[str, str], idx: int | Visit,
                     index: int) -> dict[str, np.ndarray | str | torch.Tensor]:
        """The hint as usual, the prompt, and the cached moments and prompt embedding in place of the target."""
        source = self._read_rgb(item["source"])
        if self.resolution is not None:
            source = self._resize(source)
        self.latent_cache.check_image_size(source.shape[:2], os.path.join(self.root, item["source"]))
        prompt = self._prompt(item, idx)
        return dict(txt=prompt, hint=_hint_array(source), **self.latent_cache.item(index, prompt))

    def check_item(self, index: int, reduction: int = 8) -> tuple[int, int]:
        """(width, height) of item `index`, from its images' headers; both images are decoded, one at a time and
        at 1/`reduction` of their size, to check that they can be."""
        item = self.data[index]
        sizes = [self._image_size(item[key]) for key in IMAGE_KEYS]
        _check_same_size(item, *sizes)
        for key in IMAGE_KEYS:
            self._read_rgb(item[key], reduction)
        return sizes[0]

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
        except UnreadableImageError:
            raise ValueError(f"Image {path} could not be read; it is not an image file OpenCV can decode.") from None
        except TooManyPixelsError as error:
            raise ValueError(f"Image {path} is {error.size_text()}, more than the {error.limit} pixels allowed; "
                             f"shrink it, or raise the limit with --max_image_pixels.") from None

    def _resize(self, image: np.ndarray) -> np.ndarray:
        shrinking = image.shape[0] * image.shape[1] > self.resolution**2
        interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
        return cv2.resize(image, (self.resolution, self.resolution), interpolation=interpolation)

    def _dropout_rng(self, idx: int | Visit) -> np.random.Generator:
        """A generator of this visit; for an integer index, this process's generator, made on first use so that
        each DataLoader worker draws its own stream."""
        if isinstance(idx, Visit):
            return np.random.default_rng([idx.seed, idx.epoch, idx.index])
        worker = get_worker_info()
        owner = (os.getpid(), worker.id if worker is not None else -1)
        if self._rng_owner != owner:
            entropy = torch.initial_seed() if self.seed is None else [self.seed, owner[1] + 1]
            self._rng = np.random.default_rng(entropy)
            self._rng_owner = owner
        return self._rng
