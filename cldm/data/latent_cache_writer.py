"""Writing a latent cache (`tool_cache_latents.py`): every target's VAE posterior moments and every distinct
prompt's text embedding, encoded once with the weights training starts from, into a folder that appears complete
or not at all. The format is `cldm.data.latent_cache`'s."""
from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from cldm.checkpoints.atomic import atomic_path
from cldm.checkpoints.paths import check_output_path
from cldm.data.dataset import MyDataset
from cldm.data.images import DEFAULT_MAX_IMAGE_PIXELS, check_pixel_limit, check_resolution_pixels
from cldm.data.latent_cache import (
    EMBEDDINGS_NAME,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    MOMENTS_NAME,
    STORAGE_DTYPES,
    to_stored,
    data_set_fingerprint,
    default_cache_folder,
    encoder_fingerprints,
)
from cldm.data.layouts import Columns
from cldm.model import check_config_path, create_model, load_state_dict, load_weights
from ldm.checkpoint import PathLike

logger = logging.getLogger(__name__)


def check_cache_output(out: PathLike, overwrite: bool) -> None:
    """Refuse an existing output unless `overwrite` and it is a latent cache (never replace another folder)."""
    check_output_path(out, overwrite=overwrite, folder=True, marker=MANIFEST_NAME, kind="latent cache",
                      marker_fields={"format": FORMAT_NAME})


def distinct_prompts(records: Iterable[Mapping[str, str]]) -> list[str]:
    """The empty prompt, then every other prompt once, in order of first appearance."""
    return list(dict.fromkeys(["", *(record["prompt"] for record in records)]))


class _Targets(Dataset):
    """The target images of a `MyDataset`, without reading its source images."""

    def __init__(self, data_set: MyDataset) -> None:
        self.data_set = data_set

    def __len__(self) -> int:
        return len(self.data_set)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.data_set.target(index)


@torch.no_grad()
def write_latent_cache(model: pl.LightningModule, data_set: MyDataset, out: PathLike, *, resolution: int | None,
                       dtype: str = "bfloat16", batch_size: int = 32, num_workers: int = 0,
                       device: str | torch.device = "cpu", overwrite: bool = False) -> Path:
    """Encode every target of `data_set` and each distinct prompt, and write the cache to `out` atomically.

    Args:
        model: a LatentDiffusion with the weights training will start from.
        data_set: a `MyDataset` without prompt dropout, at `resolution` (its `root` and `data` are fingerprinted,
            its `resize` and `crop` recorded).
        resolution: the data set's `--resolution` (None: the images' own size), recorded in the manifest.
        dtype: stored dtype of moments and embeddings, one of `STORAGE_DTYPES`.
        overwrite: replace an existing cache at `out` (never a folder that is not one).
    """
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"--dtype {dtype} is not one of {', '.join(STORAGE_DTYPES)}")
    out = Path(out)
    check_cache_output(out, overwrite)
    records = data_set.data
    fingerprint = data_set_fingerprint(data_set.root, records)  # before reading: a later edit makes the cache stale
    prompts = distinct_prompts(records)
    rows = {prompt: row for row, prompt in enumerate(prompts)}
    model.first_stage_model.to(device)
    model.cond_stage_model.to(device)  # takes prompts and puts their tokens on its weights' device
    loader = DataLoader(_Targets(data_set), batch_size=batch_size, num_workers=num_workers)
    with atomic_path(out, folder=True) as folder:
        moments_shape = _write_moments(model, loader, folder / MOMENTS_NAME, len(records), dtype, device)
        embeddings_shape = _write_text_embeddings(model, prompts, folder / EMBEDDINGS_NAME, batch_size, dtype)
        manifest = {
            "format": FORMAT_NAME, "version": FORMAT_VERSION, "dtype": dtype,
            "storage": "numpy .npy; bfloat16 as its uint16 bit patterns" if dtype == "bfloat16" else "numpy .npy",
            "resolution": resolution, "resize": data_set.resize, "crop": data_set.crop,
            "moments_shape": moments_shape, "embeddings_shape": embeddings_shape,
            **encoder_fingerprints(model.state_dict()), "data_set_sha256": fingerprint,
            "data_set_fingerprint": "sha256 of prompt.json's bytes and each target's path, size and mtime",
            "prompts": prompts, "item_prompt_rows": [rows[record["prompt"]] for record in records],
        }
        (folder / MANIFEST_NAME).write_text(json.dumps(manifest) + "\n", encoding="utf-8")
    logger.info("Cached %d latents and %d prompt embeddings (%s) in %s", len(records), len(prompts), dtype, out)
    return out


def _write_moments(model: pl.LightningModule, loader: DataLoader, path: Path, count: int, dtype: str,
                   device: str | torch.device) -> list[int]:
    """Encode the targets batch by batch into the memory-mapped file `path`; returns its shape."""
    stored = None
    start = 0
    for batch in tqdm(loader, desc="VAE encoder", unit="batch"):
        x = batch.permute(0, 3, 1, 2).contiguous().float().to(device)  # (B, 3, H, W) in [-1, 1]
        moments = to_stored(model.encode_first_stage(x).parameters, dtype)  # (B, 2C, H/8, W/8)
        if stored is None:
            stored = np.lib.format.open_memmap(path, mode="w+", dtype=moments.dtype, shape=(count, *moments.shape[1:]))
        stored[start:start + len(moments)] = moments
        start += len(moments)
    stored.flush()
    return list(stored.shape)


def _write_text_embeddings(model: pl.LightningModule, prompts: list[str], path: Path, batch_size: int,
                           dtype: str) -> list[int]:
    """Embed the prompts batch by batch into the memory-mapped file `path`; returns its shape."""
    stored = None
    for start in tqdm(range(0, len(prompts), batch_size), desc="text encoder", unit="batch"):
        embeddings = to_stored(model.get_learned_conditioning(prompts[start:start + batch_size]), dtype)
        if stored is None:
            shape = (len(prompts), *embeddings.shape[1:])
            stored = np.lib.format.open_memmap(path, mode="w+", dtype=embeddings.dtype, shape=shape)
        stored[start:start + len(embeddings)] = embeddings
    stored.flush()
    return list(stored.shape)


def cache_latents(config: PathLike, resume_path: PathLike, data_root: PathLike, out: PathLike | None = None, *,
                  resolution: int | None = None, dtype: str = "bfloat16", batch_size: int = 32,
                  num_workers: int | None = None, device: str | torch.device | None = None,
                  overwrite: bool = False, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, resize: str = "crop",
                  crop: str = "center", columns: Columns = Columns()) -> Path:
    """The work of tool_cache_latents.py: check the inputs, build the model of `config` with the weights of
    `resume_path`, and write the cache of the data set at `data_root` to `out` (default `<data_root>/latent_cache`).
    Images with more than `max_image_pixels` pixels are refused, as in training; `resize` and `crop` frame them as
    training's flags do (`crop` "random" is refused: a cache holds one crop per image); `columns` name the columns
    of a metadata.jsonl.
    """
    if batch_size < 1:
        raise ValueError(f"--batch_size must be a positive number, got {batch_size}")
    if resolution is not None and (resolution <= 0 or resolution % 64):
        raise ValueError(f"--resolution must be a positive multiple of 64, got {resolution}")
    check_pixel_limit(max_image_pixels, "--max_image_pixels")
    check_resolution_pixels(resolution, max_image_pixels)
    if crop == "random":
        raise ValueError("--crop random draws a new crop at every visit of an image and a latent cache holds one; "
                         "cache with --crop center and train with it, or train without a cache")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    num_workers = num_workers if num_workers is not None else (4 if device.type == "cuda" else 0)
    out = Path(out) if out is not None else default_cache_folder(data_root)

    # 1. cheap checks before building the model
    check_config_path(config)
    data_set = MyDataset(root=str(data_root), resolution=resolution, max_image_pixels=max_image_pixels,
                         resize=resize, columns=columns)
    check_cache_output(out, overwrite)

    # 2. the model with the weights training starts from, and the cache
    model = create_model(config).eval()
    load_weights(model, load_state_dict(resume_path), source=str(resume_path), config=str(config))
    return write_latent_cache(model, data_set, out, resolution=resolution, dtype=dtype, batch_size=batch_size,
                              num_workers=num_workers, device=device, overwrite=overwrite)
