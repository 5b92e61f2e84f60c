"""Writing flat state dicts as .safetensors or .ckpt/.pth/.pt files, atomically."""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from safetensors.torch import save_file

from cldm.checkpoints.atomic import atomic_path
from cldm.checkpoints.paths import checkpoint_format
from ldm.checkpoint import PathLike

logger = logging.getLogger(__name__)

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
