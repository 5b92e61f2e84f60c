"""The latent and text-embedding cache of a data set, so that training runs neither the VAE encoder nor the text
encoder (`tool_cache_latents.py` writes it, `tutorial_train.py --latent_cache` reads it).

A cache is a folder, by default `<data root>/latent_cache/`, of three files:

* `moments.npy` (N, 2C, H/8, W/8): item i's VAE posterior moments, mean and log-variance concatenated on the channel
  axis (the `parameters` of `DiagonalGaussianDistribution`, before its clamp and before `scale_factor`). Training
  samples z = mean + std * noise from them at every step, as it does from the encoder's output.
* `text_embeddings.npy` (P, 77, D): the embedding of each distinct prompt; row 0 is the empty prompt, which prompt
  dropout uses.
* `manifest.json`: format and version, dtype, resolution and resize mode (`resize`: "crop" or "stretch", and
  `crop`: always "center"; a manifest without them was made by the original's stretch), array shapes, the prompt of
  each row, the row of each item, and the fingerprints that tell a stale cache (`FINGERPRINTS`).

The arrays are plain `.npy` files, memory-mapped when read (`numpy.load(mmap_mode="r")`); NumPy has no bfloat16, so
bfloat16 values are stored as their uint16 bit patterns (`tensor.view(torch.int16)`), float16 and float32 as they
are. The data set's fingerprint hashes the bytes of prompt.json and each target image's path, size and modification
time (`os.stat`, not the pixels): a start of training then costs one stat per image instead of reading the whole
data set, and any rewrite of an image changes its time; copying the data set without keeping times (`cp` without
`-p`) makes the cache look stale, and rerunning the tool fixes that.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cldm.data.layouts import index_path
from ldm.checkpoint import PathLike
from ldm.models.diffusion.ddpm import LATENT_MOMENTS_KEY, TEXT_EMBEDDING_KEY

logger = logging.getLogger(__name__)

FORMAT_NAME = "controlnet-latent-cache"
FORMAT_VERSION = 1
DEFAULT_FOLDER_NAME = "latent_cache"
MANIFEST_NAME = "manifest.json"
MOMENTS_NAME = "moments.npy"
EMBEDDINGS_NAME = "text_embeddings.npy"
# Stored dtype -> (torch dtype of the values, NumPy dtype of the file).
STORAGE_DTYPES = {"bfloat16": (torch.bfloat16, np.uint16), "float16": (torch.float16, np.float16),
                  "float32": (torch.float32, np.float32)}
EMPTY_PROMPT_ROW = 0
# State-dict prefixes of the networks a cache stands in for: the moments are quant_conv(encoder(x)).
VAE_ENCODER_PREFIXES = ("first_stage_model.encoder.", "first_stage_model.quant_conv.")
TEXT_ENCODER_PREFIXES = ("cond_stage_model.",)
# Manifest key -> what it fingerprints, as an error message names it.
FINGERPRINTS = {"vae_encoder_sha256": "the VAE encoder's weights", "text_encoder_sha256": "the text encoder's weights",
                "data_set_sha256": "the data set (prompt.json or a target image)"}
# What reading a cache needs from its manifest (it also records how the data set was fingerprinted and the storage).
MANIFEST_KEYS = ("dtype", "resolution", "moments_shape", "embeddings_shape", *FINGERPRINTS, "prompts",
                 "item_prompt_rows")
REMAKE = ("rerun tool_cache_latents.py --overwrite with this run's --config, --resume_path, --data_root, --resolution "
          "and --resize")
# The resize mode of a manifest that names none: caches were stretched before `--resize` existed.
UNNAMED_RESIZE_MODE = "stretch"


# ---------------------------------------------------------------------------------------------
# Fingerprints
# ---------------------------------------------------------------------------------------------

def weights_fingerprint(state_dict: Mapping[str, torch.Tensor], prefixes: Sequence[str]) -> str:
    """SHA-256 of the names, shapes and values of the state-dict tensors under `prefixes`, floating-point values
    rounded to bfloat16: the same for float32 weights and for their bfloat16 copies (`--frozen_dtype bfloat16` stores
    the frozen encoders so, in the checkpoints a run resumes from), which encode to the same cache within its
    default precision."""
    digest = hashlib.sha256()
    for key in sorted(key for key in state_dict if key.startswith(tuple(prefixes))):
        tensor = state_dict[key].detach().cpu()
        tensor = tensor.to(torch.bfloat16).view(torch.int16) if tensor.is_floating_point() else tensor
        digest.update(f"{key}{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def encoder_fingerprints(state_dict: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """The fingerprints of the VAE encoder and the text encoder in a full model's state dict."""
    return {"vae_encoder_sha256": weights_fingerprint(state_dict, VAE_ENCODER_PREFIXES),
            "text_encoder_sha256": weights_fingerprint(state_dict, TEXT_ENCODER_PREFIXES)}


def data_set_fingerprint(root: PathLike, records: Iterable[Mapping[str, str]]) -> str:
    """SHA-256 of the bytes of `<root>/prompt.json` (or metadata.jsonl) and each target's path, size and modification
    time."""
    index = index_path(str(root))
    digest = hashlib.sha256(Path(index).read_bytes())
    for record in records:
        path = Path(root, record["target"])
        if not path.is_file():
            raise FileNotFoundError(f"Image {path} listed in {os.path.basename(index)} does not exist.")
        stat = path.stat()
        digest.update(f"{record['target']}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Stored dtypes
# ---------------------------------------------------------------------------------------------

def to_stored(values: torch.Tensor, dtype: str) -> np.ndarray:
    """`values` rounded to `dtype`, as the NumPy array the file holds."""
    values = values.detach().to(device="cpu", dtype=STORAGE_DTYPES[dtype][0])
    return values.view(torch.int16).numpy().view(np.uint16) if dtype == "bfloat16" else values.numpy()


def _from_stored(stored: np.ndarray, dtype: str) -> torch.Tensor:
    """A tensor of the values of `stored` (copied out of the memory map)."""
    if dtype == "bfloat16":
        return torch.from_numpy(stored.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(stored.copy())


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------

class LatentCache:
    """A cache folder, checked when opened; its arrays are memory-mapped on first use in each process.

    Args:
        folder: the cache folder.
        manifest: its manifest.json, parsed.
    """

    def __init__(self, folder: Path, manifest: dict[str, Any]) -> None:
        self.folder = folder
        self.manifest = manifest
        self.dtype: str = manifest["dtype"]
        self._arrays: dict[str, np.ndarray] | None = None

    @classmethod
    def open(cls, folder: PathLike) -> LatentCache:
        """Open a cache; a missing, foreign, damaged or truncated one raises with one sentence naming the fix."""
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"latent cache {folder} does not exist; make it with tool_cache_latents.py "
                                    f"(--data_root, --config, --resume_path and --resolution as for training)")
        cache = cls(folder, read_manifest(folder))
        cache.arrays()  # refuses truncated files now rather than in a DataLoader worker
        return cache

    def arrays(self) -> dict[str, np.ndarray]:
        """The moments and the text embeddings, memory-mapped (each process maps them once)."""
        if self._arrays is None:
            shapes = {MOMENTS_NAME: self.manifest["moments_shape"], EMBEDDINGS_NAME: self.manifest["embeddings_shape"]}
            self._arrays = {name: _map_array(self.folder / name, shape, STORAGE_DTYPES[self.dtype][1])
                            for name, shape in shapes.items()}
        return self._arrays

    def __getstate__(self) -> dict[str, Any]:
        """Pickled for DataLoader workers without the maps (which would copy the arrays); each worker maps anew."""
        return {**self.__dict__, "_arrays": None}

    def __len__(self) -> int:
        return self.manifest["moments_shape"][0]

    def item(self, index: int, prompt: str) -> dict[str, torch.Tensor]:
        """The batch entries of item `index` with `prompt` (its own, or "" when dropped), in the stored dtype."""
        row = self.manifest["item_prompt_rows"][index] if prompt else EMPTY_PROMPT_ROW
        arrays = self.arrays()
        return {LATENT_MOMENTS_KEY: _from_stored(arrays[MOMENTS_NAME][index], self.dtype),
                TEXT_EMBEDDING_KEY: _from_stored(arrays[EMBEDDINGS_NAME][row], self.dtype)}

    def null_text_embedding(self) -> torch.Tensor:
        """The empty prompt's embedding (77, D) in float32, the unconditional conditioning of guided sampling."""
        return _from_stored(self.arrays()[EMBEDDINGS_NAME][EMPTY_PROMPT_ROW], self.dtype).float()

    def check_image_size(self, size: tuple[int, int], path: PathLike) -> None:
        """Refuse a hint image of another size than the cached latents' images."""
        height, width = (8 * side for side in self.manifest["moments_shape"][2:])
        if tuple(size) != (height, width):
            raise ValueError(f"{path} is {size[1]}x{size[0]} px but latent cache {self.folder} holds latents of "
                             f"{width}x{height} px images; {REMAKE}")

    def check_data_set(self, root: PathLike, records: Sequence[Mapping[str, str]], resolution: int | None,
                       resize: str = "crop") -> None:
        """Refuse a cache made at another resolution, with another resize mode (where a resolution is set), or of
        another version of the data set."""
        if resolution != self.manifest["resolution"]:
            made, wanted = (f"--resolution {value}" if value else "no --resolution" for value in
                            (self.manifest["resolution"], resolution))
            self._refuse(f"it was made with {made} and this run has {wanted}")
        made_resize = self.manifest.get("resize", UNNAMED_RESIZE_MODE)
        if resolution is not None and resize != made_resize:
            self._refuse(f"it was made with --resize {made_resize} and this run has --resize {resize}")
        if len(records) != len(self):
            self._refuse(f"it holds {len(self)} items and {index_path(str(root))} lists {len(records)}")
        if data_set_fingerprint(root, records) != self.manifest["data_set_sha256"]:
            self._refuse(f"{FINGERPRINTS['data_set_sha256']} changed since it was made")

    def check_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Refuse a cache made with other VAE-encoder or text-encoder weights than those in `state_dict`."""
        for key, fingerprint in encoder_fingerprints(state_dict).items():
            if fingerprint != self.manifest[key]:
                self._refuse(f"{FINGERPRINTS[key]} differ from those it was made with")

    def _refuse(self, what: str) -> None:
        raise ValueError(f"latent cache {self.folder} does not fit this run: {what}; {REMAKE}")


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a cache folder; refuses a folder that is not a cache of this format and version."""
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder} holds no {MANIFEST_NAME}, so it is not a latent cache; make one with "
                                f"tool_cache_latents.py")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); {REMAKE}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ValueError(f"{path} is not the manifest of a latent cache (no \"format\": \"{FORMAT_NAME}\"); make "
                         f"one with tool_cache_latents.py")
    if manifest.get("version") != FORMAT_VERSION:
        raise ValueError(f"latent cache {folder} has format version {manifest.get('version')} and this code reads "
                         f"version {FORMAT_VERSION}; {REMAKE}")
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    if missing or manifest["dtype"] not in STORAGE_DTYPES:
        raise ValueError(f"{path} lacks {', '.join(missing) or 'a known dtype'}; {REMAKE}")
    return manifest


def _map_array(path: Path, shape: Sequence[int], dtype: type) -> np.ndarray:
    """`path` memory-mapped read-only; refuses a missing, truncated or reshaped file."""
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is missing, truncated or damaged ({error}); {REMAKE}") from None
    if array.shape != tuple(shape) or array.dtype != dtype:
        raise ValueError(f"{path} holds {array.dtype} {list(array.shape)} and its manifest says "
                         f"{np.dtype(dtype)} {list(shape)}; {REMAKE}")
    return array


def default_cache_folder(data_root: PathLike) -> Path:
    """`<data root>/latent_cache`, where the tool writes and training looks by default."""
    return Path(data_root, DEFAULT_FOLDER_NAME)
