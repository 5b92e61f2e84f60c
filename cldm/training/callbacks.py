"""Lightning callbacks of the training job: exact resume of random streams, a non-finite loss guard, a graceful
Ctrl-C and step checkpoints that are saved on interruption."""
from __future__ import annotations

import logging
import os
import random
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint

from cldm.checkpoints.atomic import remove_stale_temporary_files

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


class NonFiniteLossError(ValueError):
    """Training produced a NaN or infinite loss (or gradients)."""


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every value of `tensors` is finite (one device sync, not one per tensor)."""
    return not tensors or bool(torch.stack([torch.isfinite(tensor).all() for tensor in tensors]).all())


def newest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """`last.ckpt` (a link to the newest step checkpoint), else the step checkpoint with the highest step (a run
    killed while it moved the link leaves none), else None."""
    last = checkpoint_dir / "last.ckpt"
    if last.is_file():
        return last
    steps = sorted(checkpoint_dir.glob("step-*.ckpt"))  # zero-padded step numbers sort as text
    return steps[-1] if steps else None


# What NonFiniteLossGuard's message advises the training job's user.
TRAINING_REMEDY = "lowering --learning_rate or using --precision 32, or pass --skip_nonfinite to skip such steps"


class NonFiniteLossGuard(Callback):
    """Stops training (or skips the step) when the loss or the gradients are NaN or infinite, before the optimizer
    step, so the weights and the checkpoints on disk stay finite. All ranks take the same decision.

    Loss and gradients are checked together right before the optimizer step, one host sync per step, once every
    kernel of the backward pass is queued.

    Args:
        checkpoint_dir: where the run's checkpoints are, to name the last good one in the message.
        skip: skip such steps (the optimizer leaves every parameter and its state unchanged) instead of stopping.
        check_before_backward: check the loss before backward too, for an optimizer that updates the parameters
            during backward (`AdamWInBackward`), when the check before the step would come too late.
        remedy: what the message advises doing before training again (the training job's flags by default).
    """

    def __init__(self, checkpoint_dir: str | Path, skip: bool = False, check_before_backward: bool = False,
                 remedy: str = TRAINING_REMEDY):
        super().__init__()
        self.checkpoint_dir = Path(checkpoint_dir)
        self.remedy = remedy
        self.skip = skip
        self.check_before_backward = check_before_backward
        self.skipped = 0
        self._loss: torch.Tensor | None = None

    def _stop_message(self, problem: str, step: int) -> str:
        last = newest_checkpoint(self.checkpoint_dir)
        resume = (f"the last good checkpoint is {last}: resume from it with --resume_from_checkpoint last"
                  if last is not None else "no checkpoint was saved before it: start again")
        return f"{problem} at step {step}, so training stopped; {resume} after {self.remedy}"

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if not self.check_before_backward:
            self._loss = loss.detach()  # checked with the gradients
        elif not trainer.strategy.reduce_boolean_decision(_all_finite([loss.detach()]), all=True):
            raise NonFiniteLossError(self._stop_message(f"the loss became {loss.item()}", trainer.global_step))

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        loss, self._loss = self._loss, None
        checked = [loss] if loss is not None else []
        # With 16-mixed the GradScaler skips steps with infinite gradients (and lowers its scale) by itself.
        if getattr(trainer.precision_plugin, "scaler", None) is None:
            checked += [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if trainer.strategy.reduce_boolean_decision(_all_finite(checked), all=True):
            return
        loss_is_finite = loss is None or bool(torch.isfinite(loss).all())
        if not self.skip:
            problem = "the gradients became non-finite" if loss_is_finite else f"the loss became {loss.item()}"
            raise NonFiniteLossError(self._stop_message(problem, trainer.global_step))
        optimizer.zero_grad(set_to_none=True)  # parameters without a gradient are left alone by the optimizer
        self.skipped += 1
        if trainer.is_global_zero:
            reason = "non-finite gradients" if loss_is_finite else f"loss {loss.item()}"
            logger.warning("step %d skipped (%s); %d skipped so far", trainer.global_step, reason, self.skipped)


class GracefulStop(Callback):
    """Makes Ctrl-C (SIGINT) stop training the way Lightning handles SIGTERM: the current step finishes, a
    checkpoint is saved and `fit` ends interrupted, so the run resumes exactly. A second Ctrl-C stops at once.

    SIGTERM is Lightning's alone during `fit`: its signal connector, installed after `setup`, would also call the
    handler found in place (`cldm.cli.run`'s, which stops at once), so the default handler stands in until
    `teardown`."""

    _previous_handler: Any = None
    _previous_sigterm_handler: Any = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous_sigterm_handler = signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._previous_sigterm_handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._previous_sigterm_handler)
            self._previous_sigterm_handler = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGINT, self._stop_after_this_step)

    def _stop_after_this_step(self, signum: int, frame: Any) -> None:
        signal.signal(signal.SIGINT, self._previous_handler)
        logger.warning("Ctrl-C: stopping after this step and saving a checkpoint (press Ctrl-C again to stop now)")
        os.kill(os.getpid(), signal.SIGTERM)  # Lightning's own SIGTERM handling takes it from here

    def _restore_handler(self) -> None:
        if self._previous_handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_handler()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_handler()


class StepCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` that also saves when training is interrupted (SIGTERM, Ctrl-C, errors) after making
    progress, but never after a non-finite loss, so the last good checkpoint stays the one on disk, and saves the
    final step of a run that ends between two scheduled saves. At start it removes the temporary files of saves
    that a killed process left behind."""

    _start_step: int | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and self.dirpath is not None:
            remove_stale_temporary_files(self.dirpath)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._start_step = trainer.global_step

    def _trained_since_start(self, trainer: pl.Trainer) -> bool:
        """Whether this run made a step since it started (or since the checkpoint it resumed from)."""
        return self._start_step not in (None, trainer.global_step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Lightning saves every `every_n_train_steps` only: a run whose --max_steps is not a multiple of it would
        # end with the steps since the last save unsaved.
        if self._trained_since_start(trainer) and not self._should_skip_saving_checkpoint(trainer):
            monitor_candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, monitor_candidates)
            self._save_last_checkpoint(trainer, monitor_candidates)
        super().on_train_end(trainer, pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, NonFiniteLossError) or not self._trained_since_start(trainer):
            return  # a non-finite loss is never saved, and without a step there is nothing new to save
        try:
            super().on_exception(trainer, pl_module, exception)
        except OSError as error:  # e.g. the disk is full: report the exception that stopped training, not this one
            logger.warning("could not save a checkpoint while stopping: %s", error)


class CachedEncodersOnCPU(pl.Callback):
    """Keeps the VAE encoder and the text encoder on the CPU once Lightning has moved the model to its device: with
    a latent cache training does not run them. Their weights stay in the model and its checkpoints; the VAE
    decoder stays on the device for image logs.

    The text encoder holds a buffer (its position ids), which DistributedDataParallel broadcasts from the device at
    every step, so with more than one process it stays on the device.
    """

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.first_stage_model.encoder.cpu()
        pl_module.first_stage_model.quant_conv.cpu()
        if trainer.world_size == 1:
            pl_module.cond_stage_model.cpu()
