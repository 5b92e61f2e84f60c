"""Run tutorial_train.py and have it signal itself at one chosen point, for the crash-safety tests.

    python tests/helpers/interrupting_train.py POINT STEP SIGNAL -- <tutorial_train.py arguments>

When the trainer's global step equals STEP, the process sends itself SIGNAL (KILL, TERM or INT) at POINT:
    step  in the middle of a training step: after the backward pass, before the optimizer update;
    save  in the middle of writing the step's checkpoint (the file last.ckpt is to link to next): half of its
          bytes are in the temporary file (fsync'd);
    log   in the middle of image logging: inside `log_images`, after sampling, before the grids are saved.
"""
from __future__ import annotations

import io
import os
import signal
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch

import tutorial_train
from cldm.training import job as training
from cldm.checkpoints.lightning_io import AtomicCheckpointIO
from cldm.checkpoints.atomic import atomic_write
from cldm.cli import run


def _signal_self(signum: int) -> None:
    os.kill(os.getpid(), signum)


class TruncatingCheckpointIO(AtomicCheckpointIO):
    """Writes half of the step checkpoint of global step `step` through the real temporary-file path, then
    signals."""

    def __init__(self, step: int, signum: int):
        super().__init__()
        self.step, self.signum = step, signum

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        if checkpoint["global_step"] != self.step or not Path(path).name.startswith("step-"):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        data = buffer.getvalue()
        with atomic_write(path) as file:
            file.write(data[: len(data) // 2])
            file.flush()
            os.fsync(file.fileno())
            _signal_self(self.signum)


class Interrupter(pl.Callback):
    """Signals the process mid-step or mid-logging at global step `step`."""

    def __init__(self, point: str, step: int, signum: int):
        self.point, self.step, self.signum = point, step, signum

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.point != "log":
            return
        sample = pl_module.log_images

        def log_images(*args, **kwargs):
            images = sample(*args, **kwargs)
            if pl_module.global_step == self.step:
                _signal_self(self.signum)
            return images

        pl_module.log_images = log_images

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        if self.point == "step" and trainer.global_step == self.step:
            _signal_self(self.signum)


def main(argv: list[str]) -> int:
    point, step, signal_name, separator, *train_argv = argv
    assert point in ("step", "save", "log") and separator == "--", argv
    signum = getattr(signal, f"SIG{signal_name}")
    build_trainer = training.build_trainer

    def build_interrupted_trainer(args, sampler, settings) -> pl.Trainer:
        trainer = build_trainer(args, sampler, settings)
        trainer.callbacks.append(Interrupter(point, int(step), signum))
        if point == "save":
            trainer.strategy.checkpoint_io = TruncatingCheckpointIO(int(step), signum)
        return trainer

    training.build_trainer = build_interrupted_trainer
    return run(tutorial_train.main, train_argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
