"""`AtomicCheckpointIO`: Lightning's checkpoint plugin, made crash-safe when saving and pickle-safe when loading."""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

from cldm.checkpoints.atomic import atomic_path
from ldm.checkpoint import PathLike, read_checkpoint

logger = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Saves each training checkpoint to a temporary file in the same folder, fsyncs it and renames it into place,
    so a checkpoint on disk is complete or absent whatever kills the process (SIGKILL, power loss, a full disk).

    Loads with `ldm.checkpoint.read_checkpoint`: weights_only unpickling with the allow-list of known names, and
    one-sentence errors for truncated, foreign or malicious files. Local paths only.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: PathLike, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint does not take storage_options")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as temp:
            torch.save(checkpoint, temp)
        logger.debug("Saved checkpoint %s", target)

    def load_checkpoint(self, path: PathLike, map_location: Callable | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        """The checkpoint's contents on the CPU (Lightning moves them to the devices); never unpickles code."""
        checkpoint = read_checkpoint(path, location="cpu", mmap=False)
        if not isinstance(checkpoint, dict):
            raise ValueError(f"checkpoint '{path}' holds a {type(checkpoint).__name__}, not a training checkpoint")
        return checkpoint
