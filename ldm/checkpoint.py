"""Reading checkpoint files (.safetensors, .ckpt, .pth) without running pickled code, with one-sentence errors:
whole (`read_state_dict`) or one tensor at a time (`open_state_dict`)."""
from __future__ import annotations

import errno
import logging
import mmap
import os
import pickle
import re
import zipfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
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


def _check_not_empty(path: PathLike) -> Path:
    """`path` as a Path, once it is known to be an existing, readable, non-empty file."""
    path = Path(path)
    check_input_path(path)
    if path.stat().st_size == 0:
        raise _not_a_checkpoint(path, "the file is empty")
    return path


def read_checkpoint(path: PathLike, location: str | torch.device = "cpu", mmap: bool = True) -> Any:
    """Everything a .safetensors/.ckpt/.pth file holds, read without running pickled code.

    Args:
        location: device the tensors are loaded to.
        mmap: memory-map the tensors of zip-format torch files instead of reading them (cheap to inspect).
    """
    path = _check_not_empty(path)
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


# ---------------------------------------------------------------------------------------------
# Reading one tensor at a time
# ---------------------------------------------------------------------------------------------

# The dtype names of the safetensors format (its header's "dtype" field).
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "C64": torch.complex64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
}


class StateDictReader(Mapping[str, torch.Tensor]):
    """The tensors of a checkpoint file, read from the file one at a time.

    `meta` holds every key's shape and dtype (tensors on the meta device) for cheap inspection. Looking a key up
    reads that tensor into memory of its own, which is freed with the tensor: code that keeps only what it needs
    holds only that, and the file's pages do not stay mapped into the process as a memory-mapped read's do.
    Every lookup reads the file again. (A legacy, non-zip torch file is read whole when opened, and lookups return
    its tensors.)
    """

    def __init__(self, meta: dict[str, torch.Tensor], read: Callable[[str], torch.Tensor]) -> None:
        self.meta = meta
        self._read = read

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.meta:
            raise KeyError(key)
        return self._read(key)

    def __contains__(self, key: object) -> bool:
        return key in self.meta

    def __iter__(self) -> Iterator[str]:
        return iter(self.meta)

    def __len__(self) -> int:
        return len(self.meta)


def _open_safetensors(path: Path) -> StateDictReader:
    """Header now, each tensor by `pread` when looked up (safetensors' "pread" backend)."""
    try:
        file = safe_open(path, framework="pt", device="cpu", backend="pread")
        meta = {}
        for key in file.offset_keys():  # the order load_file gives (that of the data)
            tensor_slice = file.get_slice(key)
            dtype = _SAFETENSORS_DTYPES.get(tensor_slice.get_dtype())
            if dtype is None:
                raise _not_a_checkpoint(path, f"tensor '{key}' has the unknown dtype '{tensor_slice.get_dtype()}'")
            meta[key] = torch.empty(tensor_slice.get_shape(), dtype=dtype, device="meta")
    except SafetensorError as error:
        raise _not_a_checkpoint(path, str(error)) from error

    def read(key: str) -> torch.Tensor:
        try:
            return file.get_tensor(key)
        except SafetensorError as error:
            raise _not_a_checkpoint(path, str(error)) from error

    return StateDictReader(_tensors_only(meta, path), read)


def _read_stored_tensor(path: Path, meta: torch.Tensor) -> torch.Tensor:
    """The tensor that `meta` (loaded with map_location="meta") describes, read from its storage's record in the
    zip file `path`."""
    storage = meta.untyped_storage()
    nbytes = storage.nbytes()
    data = torch.empty(nbytes, dtype=torch.uint8)
    with open(path, "rb") as file:
        file.seek(storage._checkpoint_offset)  # where torch.load(map_location="meta") found the record's bytes
        read = file.readinto(data.numpy()) if nbytes else 0
    if read != nbytes:
        raise _not_a_checkpoint(path, f"the file ends inside the data of a tensor of shape {list(meta.shape)}")
    return torch.empty(0, dtype=meta.dtype).set_(data.untyped_storage(), meta.storage_offset(), meta.shape,
                                                 meta.stride())


def _open_torch_checkpoint(path: Path) -> StateDictReader:
    """Keys, shapes and record offsets now (a meta-device load), each tensor's bytes when looked up; a legacy
    (non-zip) torch file cannot be read in parts and is read whole."""
    if not zipfile.is_zipfile(path):
        state_dict = read_state_dict(path)
        return StateDictReader({key: value.to("meta") for key, value in state_dict.items()}, state_dict.__getitem__)
    meta = read_state_dict(path, location="meta")
    return StateDictReader(meta, lambda key: _read_stored_tensor(path, meta[key]))


def open_state_dict(path: PathLike) -> StateDictReader:
    """The flat state dict of a .safetensors/.ckpt/.pth file as a `StateDictReader`: its keys, shapes and dtypes
    read now, each tensor read from the file when it is looked up (on the CPU, no pickled code run)."""
    path = _check_not_empty(path)
    if path.suffix.lower() == SAFETENSORS_SUFFIX:
        return _open_safetensors(path)
    return _open_torch_checkpoint(path)
