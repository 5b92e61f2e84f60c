"""Evaluation during training (`--eval_every_n_steps`): every N optimizer steps, sample a fixed validation set with
fixed seeds on rank 0, log its control metrics as `val/<name>`, write a grid of (hint, sample) pairs beside the
image log and redraw the picture of the run (`run.png`).

The validation set is `--val_data_root`, or the last `--val_items` items of `--data_root`, which training then
never sees (`hold_out`). Sampling goes through `cldm.evaluation.evaluate_control`, which moves no random stream and
leaves every module's training flag as it was, so the weights after any step are those of a run without evaluation.
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.utilities import rank_zero_info

from cldm.checkpoints.atomic import remove_stale_temporary_files
from cldm.data.dataset import MyDataset
from cldm.data.images import DEFAULT_MAX_IMAGE_PIXELS
from cldm.data.layouts import Columns, columns_from
from cldm.evaluation.evaluate import DEFAULT_BATCH_SIZE, EvalItem, dataset_items, evaluate_control, write_grid
from cldm.evaluation.metrics import CONTROL_F1
from cldm.evaluation.run_plot import plot_run
from cldm.logger import ImageLogger

logger = logging.getLogger(__name__)

# Items held out of --data_root when --eval_every_n_steps comes without --val_items or --val_data_root.
DEFAULT_VAL_ITEMS = 16
# The evaluation flags (default None, so a flag given without --eval_every_n_steps can be told) and their defaults.
EVAL_DEFAULTS: dict[str, Any] = {"eval_ddim_steps": 20, "eval_guidance_scale": 9.0, "eval_seed": 0,
                                 "eval_batch_size": DEFAULT_BATCH_SIZE}
VALIDATION_SPLIT = "val"  # the grids go to image_log/val/, the metrics are logged as val/<name>
BEST_CONTROL_FILENAME = "best-control.ckpt"
# Strategies whose checkpoint needs every rank (sharded weights or optimizer state): rank 0 cannot save alone.
SHARDED_STRATEGY_PREFIXES = ("fsdp", "deepspeed")


# ---------------------------------------------------------------------------------------------
# The flags
# ---------------------------------------------------------------------------------------------

def check_evaluation_args(args: argparse.Namespace) -> None:
    """Check the evaluation flags (one sentence per wrong value) and fill in their defaults.

    Without `--eval_every_n_steps` every other evaluation flag is refused; with it and neither `--val_items` nor
    `--val_data_root`, the last `DEFAULT_VAL_ITEMS` items are held out. The `--val_data_root` data set itself is
    checked with the training data set (`cldm.training.job.build_dataset`), before any heavy work."""
    if args.eval_every_n_steps is None:
        given = [name for name in ("val_items", "val_data_root", *EVAL_DEFAULTS, "keep_best_control")
                 if getattr(args, name) not in (None, False)]
        if given:
            raise ValueError(f"--{given[0]} sets up the evaluation during training, which is off; add "
                             f"--eval_every_n_steps N to evaluate every N steps")
        return
    if args.val_items is not None and args.val_data_root is not None:
        raise ValueError("--val_items holds items of --data_root out for evaluation and --val_data_root evaluates "
                         "on another data set; pass one of the two")
    if args.keep_best_control and args.strategy.startswith(SHARDED_STRATEGY_PREFIXES):
        raise ValueError(f"--keep_best_control saves from rank 0 alone, which cannot save the sharded state of "
                         f"--strategy {args.strategy}; use --strategy ddp or drop --keep_best_control")
    for name, default in EVAL_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.val_data_root is None and args.val_items is None:
        args.val_items = DEFAULT_VAL_ITEMS


def hold_out(dataset: MyDataset, count: int) -> range:
    """Remove the last `count` items from `dataset`, so that training never draws them; returns their indices in
    prompt.json (`ValidationSet` reads them from a data set of its own)."""
    total = len(dataset)
    if count >= total:
        raise ValueError(f"--val_items {count} would hold out all {total} items of {dataset.root} for evaluation "
                         f"and leave none to train on; use at most {total - 1}, or --val_data_root")
    dataset.data = dataset.data[:total - count]
    rank_zero_info(f"holding out the last {count} of {total} items of {dataset.root} for evaluation; training on "
                   f"{total - count}")
    return range(total - count, total)


# ---------------------------------------------------------------------------------------------
# The callback
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ValidationSet:
    """Where the validation items are: every item of `root`, or only its last `count`; read at `resolution`, framed
    by `resize`, without prompt dropout."""

    root: str
    count: int | None = None
    resolution: int | None = None
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    resize: str = "crop"
    columns: Columns = Columns()

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ValidationSet:
        if args.val_data_root is not None:
            return cls(args.val_data_root, None, args.resolution, args.max_image_pixels, args.resize,
                       columns_from(args))
        return cls(args.data_root, args.val_items, args.resolution, args.max_image_pixels, args.resize,
                   columns_from(args))

    def dataset(self) -> MyDataset:
        """The data set the items come from (centre crops under `--resize crop`, also when training crops at
        random)."""
        return MyDataset(root=self.root, resolution=self.resolution, max_image_pixels=self.max_image_pixels,
                         resize=self.resize, columns=self.columns)

    def items(self) -> list[EvalItem]:
        """The items as uint8 hints and targets with their prompts."""
        dataset = self.dataset()
        start = 0 if self.count is None else len(dataset) - self.count
        return dataset_items(dataset, range(start, len(dataset)))


class ControlEvaluation(Callback):
    """Evaluates control fidelity on a fixed validation set at the start of a run (step 0), after every
    `every_n_steps`-th optimizer step and at the end, on global rank 0 only (no collective: the other ranks go on
    training and meet rank 0 at the next step).

    Each evaluation logs the means of `EvaluationResult.means()` as `val/<name>` to every logger at the step,
    writes `image_log/val/step-XXXXXXX.png` (hint, sample pairs) and redraws `<run>/run.png`. With `best_path`,
    the training checkpoint with the highest `val/control_f1` so far is saved there (atomically, through the
    trainer's checkpoint IO). An error while evaluating is reported and training goes on.

    Args:
        validation: the items to evaluate.
        every_n_steps: evaluate after every N-th optimizer step.
        ddim_steps, guidance_scale, seed, batch_size: the `evaluate_control` settings.
        best_path: where to keep the best checkpoint; None keeps none.
    """

    def __init__(self, validation: ValidationSet, every_n_steps: int, *, ddim_steps: int = 20,
                 guidance_scale: float = 9.0, seed: int = 0, batch_size: int = DEFAULT_BATCH_SIZE,
                 best_path: str | None = None):
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be at least 1, got {every_n_steps}")
        self.validation = validation
        self.every_n_steps = every_n_steps
        self.settings = dict(ddim_steps=ddim_steps, guidance_scale=guidance_scale, seed=seed, batch_size=batch_size)
        self.best_path = best_path
        self.best_f1: float | None = None
        self._items: list[EvalItem] | None = None
        self._seen_step: int | None = None  # the last step evaluated or passed over

    def state_dict(self) -> dict[str, Any]:
        return {"best_f1": self.best_f1}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_f1 = state_dict.get("best_f1")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank != 0:
            return
        self._items = self.validation.items()
        self._seen_step = trainer.global_step
        remove_stale_temporary_files(self.grid_folder(trainer))  # grids that a killed run was writing
        if trainer.global_step == 0:  # a resumed run was evaluated at its checkpoint's step (or passed it over)
            self.evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if trainer.global_rank != 0 or step == self._seen_step:
            return  # not rank 0, or no optimizer step since (gradient accumulation)
        self._seen_step = step
        if step % self.every_n_steps == 0:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_rank != 0:
            return
        if trainer.global_step % self.every_n_steps:  # the last step, between two scheduled evaluations
            self.evaluate(trainer, pl_module)
        else:
            self.plot(trainer)

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Evaluate, log, write the grid, keep the best checkpoint, then redraw the run's picture."""
        step = trainer.global_step
        try:
            started = time.perf_counter()
            result = evaluate_control(pl_module, self._items, autocast=trainer.precision_plugin.forward_context,
                                      **self.settings)
            metrics = {f"{VALIDATION_SPLIT}/{name}": value for name, value in result.means().items()}
            for run_logger in trainer.loggers:
                run_logger.log_metrics(metrics, step=step)
            folder = self.grid_folder(trainer)
            os.makedirs(folder, exist_ok=True)
            write_grid(result, os.path.join(folder, f"step-{step:07d}.png"))
            self._keep_best(trainer, metrics.get(f"{VALIDATION_SPLIT}/{CONTROL_F1}"))
            shown = ", ".join(f"{name} {value:.4g}" for name, value in metrics.items())
            logger.info("evaluation of %d items at step %d (%.1f s): %s", len(self._items), step,
                        time.perf_counter() - started, shown)
        except Exception as error:  # a failed evaluation must not end a multi-day run
            logger.warning("evaluation failed at step %d and was skipped (training goes on; lower --eval_batch_size "
                           "if it runs out of memory): %s: %s", step, type(error).__name__, error)
        self.plot(trainer)

    @staticmethod
    def grid_folder(trainer: pl.Trainer) -> str:
        """`image_log/val/` beside the image log's `image_log/train/`."""
        return ImageLogger.image_dir(ImageLogger.save_dir(trainer), VALIDATION_SPLIT)

    def _keep_best(self, trainer: pl.Trainer, f1: float | None) -> None:
        """Save the training checkpoint to `best_path` when `f1` beats the best so far."""
        if self.best_path is None or f1 is None or (self.best_f1 is not None and f1 <= self.best_f1):
            return
        self.best_f1 = f1
        # `trainer.save_checkpoint` ends with a barrier that every rank would have to reach; rank 0 saves alone.
        checkpoint = trainer._checkpoint_connector.dump_checkpoint()
        trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, self.best_path)
        logger.info("kept %s: %s %.4g at step %d", self.best_path, CONTROL_F1, f1, trainer.global_step)

    @staticmethod
    def plot(trainer: pl.Trainer) -> None:
        """Redraw `<run>/run.png` from the CSV logs, after writing out the rows the CSV logger still buffers."""
        try:
            for run_logger in trainer.loggers:
                if isinstance(run_logger, CSVLogger):
                    run_logger.save()
            plot_run(ImageLogger.save_dir(trainer))
        except Exception as error:  # the picture is a convenience: never a reason to stop
            logger.warning("could not draw the picture of the run: %s: %s", type(error).__name__, error)


def build_evaluation(args: argparse.Namespace, checkpoint_dir: str) -> list[ControlEvaluation]:
    """The evaluation callback of `--eval_every_n_steps`, or none."""
    if args.eval_every_n_steps is None:
        return []
    best_path = os.path.join(checkpoint_dir, BEST_CONTROL_FILENAME) if args.keep_best_control else None
    return [ControlEvaluation(ValidationSet.from_args(args), args.eval_every_n_steps,
                              ddim_steps=args.eval_ddim_steps, guidance_scale=args.eval_guidance_scale,
                              seed=args.eval_seed, batch_size=args.eval_batch_size, best_path=best_path)]
