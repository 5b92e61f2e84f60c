"""Checkpoint files: safe reading, atomic writing, output checks and telling which model a state dict holds."""
from __future__ import annotations

import errno
import logging
import mmap
import os
import pickle
import re
import secrets
import shutil
import zipfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike

SAFETENSORS_SUFFIX = ".safetensors"
TORCH_SUFFIXES = (".ckpt", ".pth", ".pt")

UNET_PREFIX = "model.diffusion_model."
CONTROL_PREFIX = "control_model."

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

# `atomic_path` writes `.<name>.<8 hex digits>.tmp` next to the target.
_TEMPORARY_SUFFIX = ".tmp"
_TEMPORARY_NAME = re.compile(r"^\..+\.[0-9a-f]{8}\.tmp$")

# ---------------------------------------------------------------------------------------------
# Paths: what the user gave us
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


def checkpoint_format(path: PathLike) -> str:
    """"safetensors" or "torch", chosen by the file extension of an output path."""
    suffix = Path(path).suffix.lower()
    if suffix == SAFETENSORS_SUFFIX:
        return "safetensors"
    if suffix in TORCH_SUFFIXES:
        return "torch"
    raise ValueError(
        f"cannot tell the checkpoint format of '{path}' from its extension '{suffix}'; "
        f"use one of {', '.join((SAFETENSORS_SUFFIX, *TORCH_SUFFIXES))}"
    )


def check_output_path(path: PathLike, overwrite: bool = False) -> None:
    """Refuse an output that exists (unless `overwrite`) or whose folder is missing or not writable."""
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"output '{path}' is a folder; give a file name inside it")
    if target.exists() and not overwrite:
        raise FileExistsError(f"output '{path}' already exists; choose another name or delete it first")
    folder = target.parent
    if not folder.exists():
        raise FileNotFoundError(f"output folder '{folder}' does not exist; create it first")
    if not folder.is_dir():
        raise NotADirectoryError(f"output folder '{folder}' is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"output folder '{folder}' is not writable; choose another folder")


def check_output_folder(path: PathLike, overwrite: bool, marker: str, kind: str) -> None:
    """Refuse an existing output folder (unless `overwrite` and it is empty or holds the file `marker` that makes it
    a `kind`) or an unusable parent folder."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"output '{path}' is a file, not a folder; choose another name")
    if target.exists() and not overwrite:
        raise FileExistsError(f"output folder '{path}' already exists; choose another name or pass --overwrite")
    if target.exists() and any(target.iterdir()) and not (target / marker).is_file():
        raise FileExistsError(f"output folder '{path}' is not empty and holds no {marker}; it is not a {kind}, so it "
                              "is not replaced even with --overwrite")
    parent = target.absolute().parent
    if not parent.is_dir():
        raise FileNotFoundError(f"output folder's parent '{parent}' does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"output folder's parent '{parent}' is not writable; choose another place")


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


# ---------------------------------------------------------------------------------------------
# Writing: temporary file in the same folder, fsync, rename
# ---------------------------------------------------------------------------------------------


def _fsync_path(path: Path) -> None:
    """Flush `path` (a file or a folder) to disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# Errors of a write that ran out of space; torch and safetensors report them without an errno.
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_OS_ERROR_CODE = re.compile(r"\(os error (\d+)\)")  # safetensors' (Rust's) wording
_NEARLY_FULL_BYTES = 16 * 2**20


def _ran_out_of_space(error: Exception, folder: Path) -> bool:
    """Whether a failed write failed for lack of disk space (or quota)."""
    code = getattr(error, "errno", None)
    if code is None:
        match = _OS_ERROR_CODE.search(str(error))
        code = int(match.group(1)) if match else None
    if code is not None:
        return code in _DISK_FULL_ERRNOS
    if not isinstance(error, RuntimeError):
        return False
    try:  # torch.save reports a failed write as a RuntimeError without the cause: look at the disk itself
        return shutil.disk_usage(folder).free < _NEARLY_FULL_BYTES
    except OSError:
        return False


def _disk_full_error(target: Path) -> OSError:
    error = OSError(f"No space left on device while writing '{target}'; free some space or choose another folder "
                    f"(nothing was written)")
    error.errno = errno.ENOSPC
    return error


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is fsync'd and renamed to `path`, on failure removed.

    A write that runs out of disk space raises an OSError (errno ENOSPC) that names `path`.
    """
    target = Path(path)
    temp = target.with_name(f".{target.name}.{secrets.token_hex(4)}{_TEMPORARY_SUFFIX}")
    os.close(os.open(temp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # reserve the name; umask applies
    permissions = temp.stat().st_mode & 0o777
    try:
        yield temp
        os.chmod(temp, permissions)  # writers that recreate the file (safetensors) would leave it private (0600)
        _fsync_path(temp)
        os.replace(temp, target)
    except Exception as error:
        out_of_space = _ran_out_of_space(error, target.parent)  # asked before the partial file frees its space
        temp.unlink(missing_ok=True)
        if out_of_space:
            raise _disk_full_error(target) from error
        raise
    except BaseException:  # KeyboardInterrupt, SystemExit: never leave a partial file behind either
        temp.unlink(missing_ok=True)
        raise
    try:
        _fsync_path(target.parent)  # make the rename itself durable
    except OSError:
        logger.debug("could not fsync folder %s (not supported on this platform)", target.parent)


def stale_temporary_files(folder: PathLike) -> list[Path]:
    """Temporary files that `atomic_path` left in `folder` when its process was killed mid-write."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(path for path in folder.iterdir() if _TEMPORARY_NAME.match(path.name) and path.is_file())


@contextmanager
def atomic_write(path: PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a file for writing that appears at `path` complete, or not at all."""
    if mode not in ("w", "wb", "wt"):
        raise ValueError(f"atomic_write supports the modes 'w', 'wt' and 'wb', not '{mode}'")
    with atomic_path(path) as temp, open(temp, mode) as file:
        yield file


@contextmanager
def atomic_folder(path: PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to `path`; on success it replaces `path`, on failure it is removed."""
    target = Path(path).absolute()
    token = secrets.token_hex(4)
    temp = target.with_name(f".{target.name}.{token}.tmp")
    temp.mkdir()
    try:
        yield temp
        if target.exists():  # --overwrite: move the old folder aside first, delete it once the new one is in place
            old = target.with_name(f".{target.name}.{token}.old")
            os.replace(target, old)
            try:
                os.replace(temp, target)
            except BaseException:
                os.replace(old, target)
                raise
            shutil.rmtree(old)
        else:
            os.replace(temp, target)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def _tensors_to_save(state_dict: Mapping[str, Any], unshare: bool) -> dict[str, torch.Tensor]:
    """Detached contiguous tensors; with `unshare`, no two of them share storage (safetensors requires it)."""
    tensors: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for key, value in state_dict.items():
        if not torch.is_tensor(value):
            raise ValueError(f"cannot save state dict entry '{key}': it is a {type(value).__name__}, not a tensor")
        if value.is_meta:
            raise ValueError(f"cannot save state dict entry '{key}': it is on the meta device and holds no data")
        tensor = value.detach().contiguous()
        if unshare and tensor.numel() > 0:
            storage = tensor.untyped_storage().data_ptr()
            if storage in seen_storages:
                tensor = tensor.clone()
            seen_storages.add(tensor.untyped_storage().data_ptr())
        tensors[key] = tensor
    return tensors


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: PathLike) -> None:
    """Write a flat state dict as .safetensors or .ckpt/.pth/.pt (by extension), atomically."""
    file_format = checkpoint_format(path)
    tensors = _tensors_to_save(state_dict, unshare=file_format == "safetensors")
    with atomic_path(path) as temp:
        if file_format == "safetensors":
            save_file(tensors, temp, metadata={"format": "pt"})
        else:
            torch.save(tensors, temp)
    logger.info("Saved %d tensors to %s", len(tensors), path)


# ---------------------------------------------------------------------------------------------
# Which model is this? (key names and shapes)
# ---------------------------------------------------------------------------------------------

BASE_MODEL_DESCRIPTIONS = {
    "sd1": "a Stable Diffusion 1.x model",
    "sd2": "a Stable Diffusion 2.x model",
    "controlnet-sd1": "a Stable Diffusion 1.x model with a ControlNet",
    "controlnet-sd2": "a Stable Diffusion 2.x model with a ControlNet",
    "controlnet-only": "ControlNet weights without a base model",
    "diffusers": "a diffusers-format model",
    "unknown": "no known Stable Diffusion layout",
}

_CONTEXT_DIM_VERSIONS = {768: "sd1", 1024: "sd2"}
# ControlNet weights stored without the `control_model.` prefix.
_BARE_CONTROLNET_PREFIXES = ("input_hint_block.", "zero_convs.", "middle_block_out.")
_DIFFUSERS_PREFIXES = ("conv_in.", "time_embedding.", "controlnet_cond_embedding.")
_DIFFUSERS_PARTS = ("down_blocks.", "mid_block.", "up_blocks.")


def _shape(value: Any) -> tuple[int, ...] | None:
    shape = getattr(value, "shape", None)
    return None if shape is None else tuple(shape)


def _sd_version(state_dict: Mapping[str, Any]) -> str | None:
    """"sd1"/"sd2" from the cross-attention width, else the proj_in layout, else the text encoder's keys."""
    branches = (UNET_PREFIX, CONTROL_PREFIX)
    for key, value in state_dict.items():
        shape = _shape(value)
        if key.startswith(branches) and key.endswith("attn2.to_k.weight") and shape and len(shape) == 2:
            if shape[1] in _CONTEXT_DIM_VERSIONS:
                return _CONTEXT_DIM_VERSIONS[shape[1]]
    for key, value in state_dict.items():
        shape = _shape(value)
        if key.startswith(branches) and key.endswith("proj_in.weight") and shape and len(shape) in (2, 4):
            return "sd1" if len(shape) == 4 else "sd2"  # SD2.x configs use linear projections in transformers
    if any(key.startswith("cond_stage_model.transformer.") for key in state_dict):
        return "sd1"
    if any(key.startswith("cond_stage_model.model.") for key in state_dict):
        return "sd2"
    return None


def detect_base_model(state_dict: Mapping[str, Any]) -> str:
    """Which model a state dict holds: one of the keys of `BASE_MODEL_DESCRIPTIONS`."""
    keys = list(state_dict)
    has_unet = any(key.startswith(UNET_PREFIX) for key in keys)
    has_control = any(key.startswith(CONTROL_PREFIX) for key in keys)
    if not has_unet:
        if has_control or any(key.startswith(_BARE_CONTROLNET_PREFIXES) for key in keys):
            return "controlnet-only"
        if any(key.startswith(_DIFFUSERS_PREFIXES) or any(p in key for p in _DIFFUSERS_PARTS) for key in keys):
            return "diffusers"
        return "unknown"
    if any(key.startswith("conditioner.") for key in keys):  # SDXL and later
        return "unknown"
    version = _sd_version(state_dict)
    if version is None:
        return "unknown"
    return f"controlnet-{version}" if has_control else version


def _first_names(keys: Iterable[str], count: int = 3) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:count])
    return shown + (", ..." if len(keys) > count else "")


def describe_key_mismatch(
    missing: Iterable[str],
    unexpected: Iterable[str],
    checkpoint_state_dict: Mapping[str, Any],
    config_path: PathLike | None,
    *,
    mismatched_shapes: Iterable[tuple[str, tuple[int, ...], tuple[int, ...]]] = (),
    source: PathLike | None = None,
) -> str:
    """One sentence: how many keys are missing/unexpected/mis-shaped, the first names, what the checkpoint is."""
    missing, unexpected, mismatched_shapes = list(missing), list(unexpected), list(mismatched_shapes)
    problems = []
    if missing:
        problems.append(f"{len(missing)} keys missing ({_first_names(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({_first_names(unexpected)})")
    if mismatched_shapes:
        shapes = [f"{key} {list(got)} vs {list(want)}" for key, got, want in mismatched_shapes]
        problems.append(f"{len(shapes)} with another shape ({_first_names(shapes)})")
    checkpoint = f"checkpoint '{source}'" if source is not None else "the checkpoint"
    config = f"config '{config_path}'" if config_path is not None else "the model"
    kind = BASE_MODEL_DESCRIPTIONS[detect_base_model(checkpoint_state_dict)]
    return f"{checkpoint} does not fit {config}: {'; '.join(problems)}; the checkpoint looks like {kind}"
