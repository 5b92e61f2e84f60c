"""Reading checkpoint files (.safetensors, .ckpt, .pth) without running pickled code, with one-sentence errors."""
from __future__ import annotations

import errno
import logging
import mmap
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike

SAFETENSORS_SUFFIX = ".safetensors"
TORCH_SUFFIXES = (".ckpt", ".pth", ".pt")

# Non-tensor objects that real Stable Diffusion / Lightning checkpoints pickle. Each name is mapped to an inert
# placeholder class: nothing is imported and no code of the named module runs (see `_InertPickledObject`).
ALLOWED_PICKLE_GLOBALS = (
    # SD1.x .ckpt files key their callback state by the ModelCheckpoint class object.
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
    # numpy scalars, arrays and dtypes in callback / loop state (numpy 1.x and 2.x module names).
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.ndarray",
    "numpy.dtype",
)

_GLOBAL_IN_ERROR = re.compile(r"GLOBAL ([\w.]+)")


# ---------------------------------------------------------------------------------------------
# Input paths: what the user gave us
# ---------------------------------------------------------------------------------------------


def detect_path_kind(path: PathLike) -> str:
    """What `path` is on disk: "missing", "diffusers" (a diffusers model folder), "folder" or "file"."""
    path = Path(path)
    if not path.exists():
        return "missing"
    if not path.is_dir():
        return "file"
    diffusers_markers = ("model_index.json", "config.json", "unet")
    return "diffusers" if any((path / marker).exists() for marker in diffusers_markers) else "folder"


def check_input_path(path: PathLike, role: str = "checkpoint") -> None:
    """Raise a one-sentence error unless `path` is an existing single-file checkpoint."""
    kind = detect_path_kind(path)
    if kind == "missing":
        raise FileNotFoundError(f"{role} '{path}' does not exist; check the path")
    if kind == "diffusers":
        raise ValueError(
            f"{role} '{path}' is a diffusers folder; pass the original single-file .ckpt or .safetensors checkpoint"
        )
    if kind == "folder":
        raise IsADirectoryError(f"{role} '{path}' is a folder; pass a .ckpt, .pth or .safetensors file")
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        raise PermissionError(f"{role} '{path}' is not readable (permission denied); check its permissions") from None


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


class _InertPickledObject:
    """Placeholder for an allow-listed pickled global: keeps the pickled arguments and state, runs nothing."""

    pickled_name = ""

    def __init__(self, *args: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<placeholder for {self.pickled_name}>"


def _placeholder(pickled_name: str) -> type:
    """A distinct inert class standing in for the global `pickled_name`."""
    return type(pickled_name.rpartition(".")[2], (_InertPickledObject,), {"pickled_name": pickled_name})


_PLACEHOLDERS = [(_placeholder(name), name) for name in ALLOWED_PICKLE_GLOBALS]


def get_state_dict(d: Mapping[str, Any]) -> Mapping[str, Any]:
    """`d["state_dict"]` when `d` wraps one (Lightning checkpoints do), else `d` itself."""
    return d.get("state_dict", d)


def _pickles_global(path: Path, name: str) -> bool:
    """Whether `path` holds a complete GLOBAL opcode for `name` (a truncated file can end inside one)."""
    module, _, attribute = name.rpartition(".")
    needle = f"{module or 'builtins'}\n{attribute}\n".encode()
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return data.find(needle) >= 0


def _refused_global(path: Path, error: pickle.UnpicklingError) -> str | None:
    """The first pickled global of `path` that the safe loader refused, if that is why loading failed."""
    if zipfile.is_zipfile(path):
        with torch.serialization.safe_globals(_PLACEHOLDERS):
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        return unsafe[0] if unsafe else None
    match = _GLOBAL_IN_ERROR.search(str(error))  # legacy (non-zip) format: only the error names it
    return match.group(1) if match and _pickles_global(path, match.group(1)) else None


def _not_a_checkpoint(path: Path, detail: str) -> ValueError:
    """The error for a file that cannot be parsed; `detail` is cut to its first sentence."""
    detail = detail.strip().splitlines()[0].split(". ")[0] if detail.strip() else "no details"
    return ValueError(f"checkpoint '{path}' is truncated or not a checkpoint ({detail}); re-download or re-export it")


def _read_torch_checkpoint(path: Path, location: str | torch.device, use_mmap: bool) -> Any:
    """`torch.load` with weights_only=True and the allow-listed globals as placeholders (mmap: zip files only)."""
    try:
        with torch.serialization.safe_globals(_PLACEHOLDERS):
            use_mmap = use_mmap and zipfile.is_zipfile(path)
            return torch.load(path, map_location=torch.device(location), weights_only=True, mmap=use_mmap)
    except pickle.UnpicklingError as error:
        refused = _refused_global(path, error)
        if refused is None:
            raise _not_a_checkpoint(path, "its pickle data is damaged") from error
        raise ValueError(
            f"checkpoint '{path}' was refused because it would import '{refused}', which can run arbitrary code "
            f"when loaded; if you trust the file, convert it to .safetensors in a trusted environment and pass that"
        ) from error
    except OSError as error:
        if error.errno != errno.EINVAL:  # a real read error (the disk, the network file system): say so as it is
            raise
        raise _not_a_checkpoint(path, "its zip structure points outside the file") from error
    except Exception as error:  # any parse failure of untrusted bytes means "not a readable checkpoint"
        raise _not_a_checkpoint(path, f"{type(error).__name__} {error}") from error


def _read_safetensors(path: Path, location: str | torch.device) -> dict[str, torch.Tensor]:
    """Memory-mapped read of a .safetensors file."""
    try:
        return load_file(path, device=str(location))
    except SafetensorError as error:
        raise _not_a_checkpoint(path, str(error)) from error


def _tensors_only(state_dict: Mapping[Any, Any], path: Path) -> dict[str, torch.Tensor]:
    """Keep the tensor entries; non-tensor ones (epoch, global_step, ...) are dropped with a log line."""
    tensors = {key: value for key, value in state_dict.items() if isinstance(key, str) and torch.is_tensor(value)}
    dropped = [str(key) for key in state_dict if key not in tensors]
    if dropped:
        logger.info("Ignored %d non-tensor entries of %s: %s", len(dropped), path, ", ".join(dropped[:5]))
    if not tensors:
        raise ValueError(f"checkpoint '{path}' contains no tensors; it is not a model checkpoint")
    return tensors


def read_checkpoint(path: PathLike, location: str | torch.device = "cpu", mmap: bool = True) -> Any:
    """Everything a .safetensors/.ckpt/.pth file holds, read without running pickled code.

    Args:
        location: device the tensors are loaded to.
        mmap: memory-map the tensors of zip-format torch files instead of reading them (cheap to inspect).
    """
    path = Path(path)
    check_input_path(path)
    if path.stat().st_size == 0:
        raise _not_a_checkpoint(path, "the file is empty")
    if path.suffix.lower() == SAFETENSORS_SUFFIX:
        return _read_safetensors(path, location)
    return _read_torch_checkpoint(path, location, mmap)


def read_state_dict(path: PathLike, location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read the flat {key: tensor} state dict of a .safetensors/.ckpt/.pth file without running pickled code."""
    path = Path(path)
    checkpoint = read_checkpoint(path, location)
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"checkpoint '{path}' holds a {type(checkpoint).__name__}, not a state dict")
    state_dict = get_state_dict(get_state_dict(checkpoint))
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"checkpoint '{path}' has a 'state_dict' entry that is a {type(state_dict).__name__}")
    return _tensors_only(state_dict, path)
