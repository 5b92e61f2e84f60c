"""Lightning callbacks of the training job: exact resume of random streams and a non-finite loss guard."""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint

logger = logging.getLogger(__name__)


class RandomStateCheckpoint(Callback):
    """Saves the Python, NumPy, torch CPU and CUDA random states in checkpoints and restores them on resume.

    Lightning restores weights, optimizer, step and epoch but not the random streams, so a resumed run
    would draw different timesteps, noise and data order than an uninterrupted one.
    """

    def state_dict(self) -> dict[str, Any]:
        numpy_state = np.random.get_state()
        state = {
            "python": random.getstate(),
            "numpy": {"keys": torch.from_numpy(numpy_state[1].astype(np.int64)), "pos": int(numpy_state[2]),
                      "has_gauss": int(numpy_state[3]), "cached_gaussian": float(numpy_state[4])},
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        version, internal, gauss = state_dict["python"]
        random.setstate((version, tuple(internal), gauss))
        numpy_state = state_dict["numpy"]
        np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                             numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
        torch.set_rng_state(state_dict["torch"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss."""


class NonFiniteLossGuard(Callback):
    """Stops training (or skips the batch) when the loss is NaN or infinite, before the optimizer step.

    Args:
        checkpoint_dir: where the run's checkpoints are, to name the last good one in the message.
        skip: skip such batches (no optimizer step) instead of stopping.
    """

    def __init__(self, checkpoint_dir: str | Path, skip: bool = False):
        super().__init__()
        self.checkpoint_dir = Path(checkpoint_dir)
        self.skip = skip
        self.skipped = 0

    def _last_good_checkpoint(self) -> str:
        last = self.checkpoint_dir / "last.ckpt"
        return str(last) if last.is_file() else "none saved yet"

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if torch.isfinite(loss).all():
            return
        step = trainer.global_step
        if not self.skip:
            raise NonFiniteLossError(
                f"the loss became {loss.item()} at step {step}; training stopped. Last good checkpoint: "
                f"{self._last_good_checkpoint()} (lower --learning_rate, use --precision 32, or pass "
                f"--skip_nonfinite to skip such batches)")
        self.skipped += 1
        logger.warning("non-finite loss at step %d: batch skipped (%d so far)", step, self.skipped)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        """Drop non-finite gradients so the optimizer leaves every parameter (and its state) unchanged."""
        if self.skip and any(p.grad is not None and not torch.isfinite(p.grad).all()
                             for group in optimizer.param_groups for p in group["params"]):
            optimizer.zero_grad(set_to_none=True)


class StepCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` that also saves on interruption (SIGTERM, Ctrl-C, errors), but never after a
    non-finite loss, so the last good checkpoint stays the one on disk."""

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, NonFiniteLossError):
            return
        super().on_exception(trainer, pl_module, exception)
