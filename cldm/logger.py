"""`ImageLogger`: a Lightning callback that samples image grids during training and saves them as PNG."""
from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torchvision
from PIL import Image
from pytorch_lightning.callbacks import Callback

from cldm.checkpoints.atomic import atomic_write, remove_stale_temporary_files

logger = logging.getLogger(__name__)


def image_grid(images: torch.Tensor, rescale: bool = True) -> np.ndarray:
    """A (B, C, H, W) batch in [-1, 1] as one uint8 HWC grid, four images per row."""
    grid = torchvision.utils.make_grid(images, nrow=4)
    if rescale:
        grid = (grid + 1.0) / 2.0
    grid = grid.permute(1, 2, 0).squeeze(-1).numpy()
    return (grid * 255).astype(np.uint8)


@contextmanager
def preserved_random_state(device: torch.device) -> Iterator[None]:
    """Run a block without moving any random stream the training loop draws from (Python, NumPy, torch)."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


@contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Run a block with every submodule in eval mode, then give each its own training flag back."""
    modes = [(submodule, submodule.training) for submodule in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for submodule, training in modes:
            submodule.training = training


class ImageLogger(Callback):
    """Every `batch_frequency` batches, calls `pl_module.log_images(batch)` and saves one grid per key.

    Files are `image_log/<split>/<key>_gs-XXXXXX_e-XXXXXX_b-XXXXXX.png` under the logger's save dir.
    Sampling runs on rank 0 only, in eval mode without gradients, and restores the random states and each
    module's training mode afterwards, so logging never changes the training trajectory. An error while
    logging (out of memory, a full disk) is reported and training goes on.

    Args:
        batch_frequency: log when `batch_idx % batch_frequency == 0` (as the original: per epoch).
        max_images: images per grid.
        clamp: clamp images to [-1, 1] before saving.
        rescale: map [-1, 1] to [0, 1] before saving.
        disabled: turn the callback off.
        log_images_kwargs: extra arguments of `log_images` (e.g. `ddim_steps`).
        increase_log_steps, log_on_batch_idx, log_first_step: accepted for the original's signature; unused.
    """

    def __init__(self, batch_frequency: int = 2000, max_images: int = 4, clamp: bool = True,
                 increase_log_steps: bool = True, rescale: bool = True, disabled: bool = False,
                 log_on_batch_idx: bool = False, log_first_step: bool = False,
                 log_images_kwargs: Mapping[str, Any] | None = None):
        super().__init__()
        if batch_frequency < 1:
            raise ValueError(f"batch_frequency must be at least 1, got {batch_frequency}")
        self.batch_freq = batch_frequency
        self.max_images = max_images
        self.clamp = clamp
        self.rescale = rescale
        self.disabled = disabled
        self.log_images_kwargs = dict(log_images_kwargs or {})

    def check_frequency(self, check_idx: int) -> bool:
        return check_idx % self.batch_freq == 0

    @staticmethod
    def image_dir(save_dir: str | None, split: str) -> str:
        """Where the grids of `split` go: `<save_dir>/image_log/<split>`."""
        return os.path.join(save_dir, "image_log", split) if save_dir else split

    @staticmethod
    def save_dir(trainer: pl.Trainer) -> str:
        """The logger's save dir (the run's root folder), where `image_log/` goes."""
        return trainer.logger.save_dir if trainer.logger is not None else trainer.default_root_dir

    def log_local(self, save_dir: str, split: str, images: Mapping[str, torch.Tensor], global_step: int,
                  current_epoch: int, batch_idx: int) -> list[str]:
        """Save one PNG grid per key; returns the paths written."""
        root = self.image_dir(save_dir, split)
        os.makedirs(root, exist_ok=True)
        paths = []
        for key, batch in images.items():
            filename = f"{key}_gs-{global_step:06}_e-{current_epoch:06}_b-{batch_idx:06}.png"
            path = os.path.join(root, filename)
            with atomic_write(path) as handle:
                Image.fromarray(image_grid(batch, self.rescale)).save(handle, format="PNG")
            paths.append(path)
        return paths

    def sample_images(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                      split: str) -> dict[str, torch.Tensor]:
        """Call `log_images` in eval mode, without gradients, under the trainer's precision context."""
        precision = trainer.precision_plugin.forward_context() if trainer is not None else nullcontext()
        with eval_mode(pl_module), preserved_random_state(pl_module.device), torch.inference_mode(), precision:
            images = pl_module.log_images(batch, split=split, **self.log_images_kwargs)
        selected = {}
        for key, value in images.items():
            if isinstance(value, torch.Tensor):
                value = value[: min(value.shape[0], self.max_images)].detach().float().cpu()
                selected[key] = value.clamp(-1.0, 1.0) if self.clamp else value
        return selected

    def log_img(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int,
                split: str = "train") -> None:
        if not callable(getattr(pl_module, "log_images", None)) or self.max_images <= 0:
            return
        try:
            images = self.sample_images(trainer, pl_module, batch, split)
            self.log_local(self.save_dir(trainer), split, images, pl_module.global_step, pl_module.current_epoch,
                           batch_idx)
        except Exception as error:  # a failed sample grid must not end a multi-day run
            logger.warning("image logging failed at step %d and was skipped (training goes on; lower "
                           "--log_max_images or --log_ddim_steps if it runs out of memory): %s: %s",
                           pl_module.global_step, type(error).__name__, error)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Remove the temporary files of grids that a killed run was writing."""
        if self.disabled or trainer.global_rank != 0:
            return
        remove_stale_temporary_files(self.image_dir(self.save_dir(trainer), "train"))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.disabled or trainer.global_rank != 0 or not self.check_frequency(batch_idx):
            return
        self.log_img(trainer, pl_module, batch, batch_idx, split="train")
