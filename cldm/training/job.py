"""The training job behind `tutorial_train.py`, `tutorial_train_sd21.py` and `tutorial_train_dist.py`: build the
model, the data loader and the Trainer from the checked arguments, and fit.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import LearningRateMonitor, ThroughputMonitor, TQDMProgressBar
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, default_collate

from cldm.checkpoints.kinds import BASE_MODEL_DESCRIPTIONS, detect_base_model
from cldm.checkpoints.lightning_io import AtomicCheckpointIO
from cldm.cli import EXIT_INTERRUPTED
from cldm.data.buckets import assign_buckets, bucket_histogram, bucket_sizes
from cldm.data.data_order import BucketBatchSampler, DataOrderCheckpoint, ResumableRandomSampler
from cldm.data.dataset import MyDataset
from cldm.data.latent_cache import LatentCache
from cldm.data.layouts import columns_from
from cldm.data.shard_stream import ShardEpochs, ShardStream
from cldm.logger import ImageLogger
from cldm.model import check_weights_fit, create_model, load_state_dict, load_weights
from cldm.training.arguments import (
    CHECKPOINT_DIRNAME,
    IMAGE_SIZE_MULTIPLE,
    MAX_GPU_WORKERS,
    build_parser,
    check_args,
    retains_host_memory,
    uses_gpu,
)
from cldm.training.batch_probe import MAX_BATCH, largest_batch
from cldm.training.callbacks import (
    CachedEncodersOnCPU,
    GracefulStop,
    NonFiniteLossGuard,
    RandomStateCheckpoint,
    StepCheckpoint,
    newest_checkpoint,
)
from cldm.host_memory import retain_freed_host_memory
from cldm.training.evaluation import ValidationSet, build_evaluation, hold_out
from cldm.training.optimizers import build_adamw
from cldm.training.run_lock import run_lock
from cldm.training.resume import RunSettings, check_resumed_settings, run_settings
from cldm.training.shard_training import build_shard_stream, check_readers, first_item_size
from cldm.training.speed import apply_speed_options
from ldm.checkpoint import read_checkpoint

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Building the pieces
# ---------------------------------------------------------------------------------------------

def _load_initial_weights(model: pl.LightningModule, args: argparse.Namespace) -> None:
    """`--resume_path` into the model, strictly; a plain Stable Diffusion checkpoint gets the tool to run first."""
    state_dict = load_state_dict(args.resume_path, location="cpu")
    kind = detect_base_model(state_dict)
    if kind in ("sd1", "sd2"):
        tool = "tool_add_control.py" if kind == "sd1" else "tool_add_control_sd21.py"
        raise ValueError(f"--resume_path {args.resume_path} is {BASE_MODEL_DESCRIPTIONS[kind]} without a ControlNet; "
                         f"make the initial weights with `python {tool} {args.resume_path} <output.ckpt>` and pass "
                         f"those")
    load_weights(model, state_dict, source=args.resume_path, config=args.config)


def _resumed_weights(model: pl.LightningModule, args: argparse.Namespace) -> Mapping[str, torch.Tensor]:
    """The weights of `--resume_from_checkpoint` (memory-mapped), checked to fit the model of `--config` as the
    initial weights are, before Lightning loads them."""
    weights = read_checkpoint(args.resume_from_checkpoint)["state_dict"]
    try:
        check_weights_fit(model.state_dict(), weights, source=args.resume_from_checkpoint, config=args.config)
    except ValueError as error:
        raise ValueError(f"--resume_from_checkpoint: {error}; resume with the --config the run was started with "
                         f"or start a new run") from error
    return weights


def use_latent_cache(model: pl.LightningModule, cache: LatentCache, weights: Mapping[str, torch.Tensor]) -> None:
    """Check that `cache` fits `model` (whose VAE encoder and text encoder hold `weights`) and give the model the
    cached empty-prompt embedding for guided image logs."""
    if model.cond_stage_trainable or getattr(model, "ucg_training", None):
        raise ValueError("--latent_cache needs a frozen text encoder and no ucg_training in the config, since it "
                         "replaces the text encoder by stored embeddings; train without --latent_cache")
    cache.check_weights(weights)
    model.null_text_embedding = cache.null_text_embedding()


def build_model(args: argparse.Namespace) -> pl.LightningModule:
    """The ControlLDM of `--config` with the initial weights (skipped when resuming a run)."""
    optimizer_factory = partial(build_adamw, fused=args.fused_adamw, in_backward=args.optimizer_in_backward)
    model = create_model(args.config, learning_rate=args.learning_rate, sd_locked=args.sd_locked,
                         only_mid_control=args.only_mid_control, optimizer_factory=optimizer_factory)
    if args.resume_from_checkpoint is None:
        _load_initial_weights(model, args)
        weights = model.state_dict()
    else:
        weights = _resumed_weights(model, args)
    if args.latent_cache is not None:  # checked against the weights before any speed option converts them
        use_latent_cache(model, LatentCache.open(args.latent_cache), weights)
    if args.gradient_checkpointing is not None:
        model.model.diffusion_model.set_gradient_checkpointing(args.gradient_checkpointing)
        model.control_model.set_gradient_checkpointing(args.gradient_checkpointing)
    return apply_speed_options(model, frozen_dtype=getattr(torch, args.frozen_dtype), channels_last=args.channels_last,
                               compile=args.compile, recompute_weight_casts=args.recompute_weight_casts)


def check_dataset(dataset: MyDataset, resolution: int | None) -> None:
    """Fail before training rather than hours into it: every listed image exists, and the first item loads at a
    size the model takes (a corrupt image further on is reported when it is read). The first item is decoded at
    1/8 of its size, one image at a time, after its headers passed the data set's pixel limit."""
    root = dataset.root
    listed = [os.path.join(root, record[key]) for record in dataset.data for key in ("source", "target")]
    missing = [path for path in listed if not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of the {len(listed)} images listed in {dataset.index_path} do not "
                                f"exist (the first is {missing[0]}); restore them or remove their lines")
    check_model_size(dataset.check_item(0), resolution, root)


def check_model_size(size: tuple[int, int], resolution: int | None, where: str) -> None:
    """Without `--resolution`, images of (width, height) `size` must have sides the model takes."""
    width, height = size
    if resolution is None and (height % IMAGE_SIZE_MULTIPLE or width % IMAGE_SIZE_MULTIPLE):
        raise ValueError(f"the images in {where} are {width}x{height} px but the model needs sides that are "
                         f"multiples of {IMAGE_SIZE_MULTIPLE}; pass --resolution 512 (or another multiple of "
                         f"{IMAGE_SIZE_MULTIPLE}) to resize them")


def collate_same_size(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """`default_collate`, with a clear error when one batch mixes image sizes."""
    sizes = sorted({item["hint"].shape[:2] for item in batch})
    if len(sizes) > 1:
        shown = ", ".join(f"{width}x{height}" for height, width in sizes)
        raise ValueError(f"one batch mixes images of different sizes ({shown} px); pass --resolution 512 (or another "
                         f"multiple of {IMAGE_SIZE_MULTIPLE}) to resize them all")
    return default_collate(batch)


def default_num_workers(on_gpu: bool, devices: int) -> int:
    """0 on CPU (the original's; workers would compete with the training threads), else up to `MAX_GPU_WORKERS`
    per GPU, as many as the node's CPU cores allow."""
    if not on_gpu:
        return 0
    return max(1, min(MAX_GPU_WORKERS, (os.cpu_count() or 1) // max(1, devices) - 1))


def build_dataset(args: argparse.Namespace) -> MyDataset | ShardStream:
    """The data set of `--data_root` (either layout of `cldm.data.layouts`), served from `--latent_cache` when given,
    less the last `--val_items` items (held out for evaluation), or the stream of `--data_shards`; it and
    `--val_data_root` are checked before any heavy work."""
    if args.data_shards is not None:
        stream = build_shard_stream(args)
        check_model_size(first_item_size(stream), args.resolution, stream.urls[0])
        check_validation_set(args)
        return stream
    dataset = MyDataset(root=args.data_root, resolution=args.resolution, prompt_dropout=args.prompt_dropout,
                        seed=args.seed, max_image_pixels=args.max_image_pixels, resize=args.resize, crop=args.crop,
                        columns=columns_from(args))
    if args.latent_cache is not None:
        dataset.latent_cache = LatentCache.open(args.latent_cache)
        dataset.latent_cache.check_data_set(dataset.root, dataset.data, args.resolution, args.resize)
    check_dataset(dataset, args.resolution)
    check_validation_set(args)
    if args.val_items is not None:
        hold_out(dataset, args.val_items)
    if args.buckets:
        use_buckets(dataset, args.resolution)
    return dataset


def check_validation_set(args: argparse.Namespace) -> None:
    """Check the data set of `--val_data_root`, if given, as the training data set."""
    if args.val_data_root is None:
        return
    try:
        check_dataset(ValidationSet.from_args(args).dataset(), args.resolution)
    except (OSError, ValueError) as error:
        raise type(error)(f"--val_data_root: {error}") from error


def use_buckets(dataset: MyDataset, resolution: int) -> None:
    """Give each item the bucket size nearest its target's aspect ratio (from the headers), and say how many items
    each bucket holds."""
    buckets = bucket_sizes(resolution)
    assignment = assign_buckets([dataset.target_size(index) for index in range(len(dataset))], buckets)
    dataset.out_sizes = [buckets[bucket] for bucket in assignment]
    rank_zero_info(f"--buckets: {len(set(assignment))} of the {len(buckets)} buckets of {resolution} px hold items "
                   f"({bucket_histogram(assignment, buckets)})")


def resolve_batch_size(args: argparse.Namespace, model: pl.LightningModule, dataset: MyDataset) -> None:
    """Replace `--batch_size max` by the largest batch whose step fits on the GPU (`cldm.training.batch_probe`)."""
    if args.batch_size != MAX_BATCH:
        return
    args.batch_size = largest_batch(model, dataset[0], len(dataset), args.precision, torch.device("cuda"))
    rank_zero_info(f"--batch_size max: training with batch {args.batch_size}, the largest that fits")


def loader_options(sampler: ResumableRandomSampler, workers: int, on_gpu: bool) -> dict[str, Any]:
    """The `DataLoader` arguments, besides the data set and how it is batched, of a loader in `sampler`'s order."""
    # Each new iterator draws its workers' base seed from `generator`; from the global random stream it would take
    # one more draw in a run resumed mid-epoch than in an uninterrupted one, and change all the noise after it.
    generator = torch.Generator().manual_seed(sampler.seed)
    return dict(generator=generator, num_workers=workers, collate_fn=collate_same_size, pin_memory=on_gpu,
                persistent_workers=workers > 0)


def build_dataloader(args: argparse.Namespace, dataset: MyDataset | ShardStream, on_gpu: bool) -> DataLoader:
    """Batches of `dataset`, shuffled per epoch by a `ResumableRandomSampler`; Lightning shards it per rank. With
    `--buckets`, a `BucketBatchSampler` makes batches of one size each from the same order, and shards them itself.
    A `ShardStream` splits itself between ranks and workers; its workers start again each epoch, with its epoch."""
    workers = default_num_workers(on_gpu, args.devices) if args.num_workers is None else args.num_workers
    if isinstance(dataset, ShardStream):
        check_readers(dataset, workers)
        return DataLoader(dataset, batch_size=args.batch_size, generator=torch.Generator().manual_seed(dataset.seed),
                          num_workers=workers, collate_fn=collate_same_size, pin_memory=on_gpu)
    if args.batch_size > len(dataset):
        raise ValueError(f"--batch_size {args.batch_size} is larger than the {len(dataset)} samples in "
                         f"{args.data_root}; use a smaller batch size")
    sampler = ResumableRandomSampler(len(dataset), args.seed)
    common = loader_options(sampler, workers, on_gpu)
    if args.buckets:
        batches = BucketBatchSampler(sampler, dataset.out_sizes, args.batch_size)
        return DataLoader(dataset, batch_sampler=batches, **common)
    return DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, **common)


def data_order(dataloader: DataLoader) -> ResumableRandomSampler | BucketBatchSampler | ShardStream:
    """What decides the loader's order: its `ShardStream` or `BucketBatchSampler`, else its sampler."""
    if isinstance(dataloader.dataset, ShardStream):
        return dataloader.dataset
    if isinstance(dataloader.batch_sampler, BucketBatchSampler):
        return dataloader.batch_sampler
    return dataloader.sampler


def build_loggers(root: str) -> list:
    """CSV logs always, TensorBoard too when it is installed, both in one new `lightning_logs/version_N` folder.

    N is chosen here, one more than the highest version already there, before `fit` starts: every rank of a
    distributed run builds its loggers before it joins the process group, and rank 0 creates the folder only after
    all have joined, so all ranks choose the same N (only rank 0 writes logs)."""
    csv_logger = CSVLogger(save_dir=root, name="lightning_logs")
    version = csv_logger.version  # the scan of the existing versions, now
    # The CSV logger first: it creates the folder, and it would warn about a folder that TensorBoard wrote first.
    loggers = [csv_logger]
    if importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None:
        loggers.append(TensorBoardLogger(save_dir=root, name="lightning_logs", version=version))
    return loggers


def build_callbacks(args: argparse.Namespace, sampler: ResumableRandomSampler | BucketBatchSampler,
                    settings: Mapping[str, Any]) -> list[pl.Callback]:
    """Guards, exact-resume state, the run's `settings` (`run_settings`), image logs, step checkpoints, learning
    rate and throughput monitors, a tqdm progress bar (seconds per step once steps take longer than a second, the
    loss; Lightning would pick Rich's bar, in it/s, whenever `rich` happens to be installed) and the evaluation of
    `--eval_every_n_steps`."""
    checkpoint_dir = os.path.join(args.default_root_dir, CHECKPOINT_DIRNAME)
    if args.log_max_images == 0:
        rank_zero_info("--log_max_images 0: image logging is off")
    image_logger = ImageLogger(batch_frequency=args.logger_freq, max_images=args.log_max_images,
                               log_images_kwargs={"ddim_steps": args.log_ddim_steps})
    checkpoints = StepCheckpoint(
        dirpath=checkpoint_dir, filename="step-{step:07d}", auto_insert_metric_name=False, monitor="step",
        mode="max", save_top_k=args.keep_last_k, every_n_train_steps=args.checkpoint_every_n_steps, save_last="link",
        save_on_exception=True, enable_version_counter=False)
    throughput = ThroughputMonitor(batch_size_fn=lambda batch: len(batch["txt"]))
    cached_encoders = [CachedEncodersOnCPU()] if args.latent_cache is not None else []
    shard_epochs = [ShardEpochs(sampler)] if isinstance(sampler, ShardStream) else []
    return [NonFiniteLossGuard(checkpoint_dir, skip=args.skip_nonfinite,
                               check_before_backward=args.optimizer_in_backward), RandomStateCheckpoint(),
            DataOrderCheckpoint(sampler, args.batch_size), RunSettings(settings),
            GracefulStop(), image_logger, checkpoints, LearningRateMonitor(logging_interval="step"), throughput,
            TQDMProgressBar(), *cached_encoders, *shard_epochs, *build_evaluation(args, checkpoint_dir)]


def build_trainer(args: argparse.Namespace, sampler: ResumableRandomSampler | BucketBatchSampler,
                  settings: Mapping[str, Any]) -> pl.Trainer:
    """The Lightning Trainer of the run, saving `settings` in its checkpoints; checkpoints are written atomically
    and read safely. A
    `BucketBatchSampler` splits its batches between the ranks itself, so Lightning does not wrap it."""
    return pl.Trainer(
        use_distributed_sampler=not isinstance(sampler, BucketBatchSampler),
        accelerator=args.accelerator, devices=args.devices, num_nodes=args.num_nodes, strategy=args.strategy,
        precision=args.precision, max_steps=args.max_steps, max_epochs=args.max_epochs,
        accumulate_grad_batches=args.accumulate_grad_batches, gradient_clip_val=args.gradient_clip_val,
        default_root_dir=args.default_root_dir, callbacks=build_callbacks(args, sampler, settings),
        plugins=[AtomicCheckpointIO()], logger=build_loggers(args.default_root_dir), log_every_n_steps=1)


def apply_host_memory_option(args: argparse.Namespace) -> None:
    """Keep freed host memory when `--retain_host_memory` says so; warn if it was asked for and cannot be done."""
    if not retains_host_memory(args):
        return
    retained = retain_freed_host_memory()
    if not retained and args.retain_host_memory:  # asked for explicitly; the CPU default stays silent
        rank_zero_warn("--retain_host_memory needs glibc's malloc, which this system does not use; freed host "
                       "memory goes back to the system as usual (drop the flag to silence this)")


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------

def _worker_error_message(error: Exception) -> str | None:
    """The original one-line message of a DataLoader worker's error, which the main process re-raises with the
    worker's traceback in its message; None for any other error."""
    lines = str(error).rstrip().splitlines()
    if len(lines) < 2 or not lines[0].startswith("Caught ") or not lines[1].startswith("Original Traceback"):
        return None
    return lines[-1].partition(": ")[2] or lines[-1]


def main(argv: Sequence[str] | None, defaults: Mapping[str, Any], description: str) -> int:
    """Parse, check, and train while holding the lock of `--default_root_dir` (one run per folder)."""
    args = check_args(build_parser(defaults, description).parse_args(argv))
    with run_lock(args.default_root_dir):
        check_new_run_folder(args)
        return train(args)


def check_new_run_folder(args: argparse.Namespace) -> None:
    """Refuse to start a new run (no `--resume_from_checkpoint`) in a `--default_root_dir` that holds an earlier
    run's checkpoints, which the new run's would replace; checked while holding the folder's lock."""
    if args.resume_from_checkpoint is not None:
        return
    newest = newest_checkpoint(Path(args.default_root_dir, CHECKPOINT_DIRNAME))
    if newest is not None:
        raise FileExistsError(f"--default_root_dir {args.default_root_dir} holds the checkpoints of an earlier run "
                              f"(the newest is {newest}), which a new run would replace; continue that run with "
                              f"--resume_from_checkpoint last, or choose another --default_root_dir")


def fit_until_stopped(trainer: pl.Trainer, model: pl.LightningModule, dataloader: DataLoader,
                      ckpt_path: str | None = None) -> None:
    """`trainer.fit`, which also returns when SIGTERM or Ctrl-C stopped it (then `trainer.interrupted` is true)."""
    try:
        trainer.fit(model, train_dataloaders=dataloader, ckpt_path=ckpt_path)
    except SystemExit:  # how Lightning ends a fit stopped by SIGTERM or Ctrl-C, after saving a checkpoint
        if not trainer.interrupted:
            raise


def ignore_frozen_model_warnings() -> None:
    """Silence Lightning's warnings about what is so by design: the frozen VAE and text encoder are in eval mode,
    and FLOPs are not needed for samples/s."""
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    warnings.filterwarnings("ignore", message=r".*flops_per_batch.*")


def train(args: argparse.Namespace) -> int:
    """Build and fit from the checked arguments; prints where the image logs and checkpoints are."""
    ignore_frozen_model_warnings()
    # DataOrderCheckpoint resumes the data order mid-epoch, which Lightning cannot see in the DataLoader.
    warnings.filterwarnings("ignore", message=r".*your dataloader is not resumable.*")
    torch.set_float32_matmul_precision(args.float32_matmul_precision)
    if args.seed is not None:
        pl.seed_everything(args.seed, workers=True)
    dataset = build_dataset(args)
    settings = run_settings(args, dataset.length if isinstance(dataset, ShardStream) else len(dataset))
    check_resumed_settings(args, settings)
    model = build_model(args)
    resolve_batch_size(args, model, dataset)
    dataloader = build_dataloader(args, dataset, on_gpu=uses_gpu(args))
    apply_host_memory_option(args)
    trainer = build_trainer(args, data_order(dataloader), {**settings, "batch_size": args.batch_size})  # `max` resolved
    try:
        fit_until_stopped(trainer, model, dataloader, ckpt_path=args.resume_from_checkpoint)
    except (OSError, ValueError) as error:
        message = _worker_error_message(error)
        if message is None:
            raise
        raise type(error)(message) from error
    checkpoint_dir = os.path.join(args.default_root_dir, CHECKPOINT_DIRNAME)
    rank_zero_info(f"Image grids: {os.path.join(args.default_root_dir, 'image_log', 'train')}")
    rank_zero_info(f"Checkpoints: {checkpoint_dir}")
    if trainer.interrupted:
        rank_zero_info(f"Stopped early at step {trainer.global_step}; continue with --resume_from_checkpoint last")
        return EXIT_INTERRUPTED
    return 0
