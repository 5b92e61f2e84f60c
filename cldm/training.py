"""The training job behind `tutorial_train.py`, `tutorial_train_sd21.py` and `tutorial_train_dist.py`.

One parser, one `main`: the scripts differ only in their defaults (config, initial weights,
devices, strategy, epochs), which equal the original scripts' constants.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import LearningRateMonitor, ThroughputMonitor, TQDMProgressBar
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, default_collate

from cldm.atomic_checkpoint_io import AtomicCheckpointIO
from cldm.callbacks import GracefulStop, NonFiniteLossGuard, RandomStateCheckpoint, StepCheckpoint, newest_checkpoint
from cldm.checkpoint_io import BASE_MODEL_DESCRIPTIONS, detect_base_model, read_checkpoint
from cldm.cli import EXIT_INTERRUPTED
from cldm.data_order import DataOrderCheckpoint, ResumableRandomSampler
from cldm.host_memory import retain_freed_host_memory
from cldm.latent_cache import CachedEncodersOnCPU, LatentCache, default_cache_folder, use_latent_cache
from cldm.logger import ImageLogger
from cldm.model import create_model, load_state_dict, load_weights
from cldm.performance import apply_speed_options

logger = logging.getLogger(__name__)

# Defaults of the original tutorial_train.py; the other scripts override a few of them.
SINGLE_DEVICE_DEFAULTS: dict[str, Any] = dict(
    config="./models/cldm_v15.yaml",
    resume_path="./models/control_sd15_ini.ckpt",
    batch_size=4,
    logger_freq=300,
    learning_rate=1e-5,
    sd_locked=True,
    only_mid_control=False,
    precision="32",
    num_workers=None,
    devices=1,
    num_nodes=1,
    strategy="auto",
    max_epochs=None,
)
SD21_DEFAULTS = {**SINGLE_DEVICE_DEFAULTS, "config": "./models/cldm_v21.yaml",
                 "resume_path": "./models/control_sd21_ini.ckpt"}
DISTRIBUTED_DEFAULTS = {**SINGLE_DEVICE_DEFAULTS, "devices": 8, "strategy": "ddp", "max_epochs": 50}

PRECISIONS = {"32": "32-true", "32-true": "32-true", "16": "16-mixed", "16-mixed": "16-mixed",
              "bf16": "bf16-mixed", "bf16-mixed": "bf16-mixed"}
ACCELERATORS = ("auto", "gpu", "cuda", "cpu")
# Lightning strategy names we accept, and the package each needs beyond Lightning itself.
STRATEGIES = {"auto": None, "ddp": None, "ddp_spawn": None, "ddp_find_unused_parameters_true": None,
              "fsdp": None, "deepspeed_stage_1": "deepspeed", "deepspeed_stage_2": "deepspeed",
              "deepspeed_stage_2_offload": "deepspeed", "deepspeed_stage_3": "deepspeed"}
CHECKPOINT_DIRNAME = "checkpoints"
# What a Lightning training checkpoint (what --resume_from_checkpoint continues) holds beyond model weights.
TRAINING_CHECKPOINT_KEYS = ("state_dict", "global_step", "loops", "optimizer_states")
# DataLoader workers per GPU by default (pinned memory and persistent workers come with them).
MAX_GPU_WORKERS = 4
# Image sides must be multiples of this: the VAE downsamples 8x and the UNet three more times.
IMAGE_SIZE_MULTIPLE = 64


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def _flag(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """Add `--name` and its hyphenated spelling `--na-me` as one option."""
    spellings = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
    parser.add_argument(*spellings, dest=name, **kwargs)


def build_parser(defaults: Mapping[str, Any], description: str) -> argparse.ArgumentParser:
    """The training CLI; every default is the original script's constant."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    model = parser.add_argument_group("model")
    _flag(model, "config", default=defaults["config"], help="model config (yaml, target/params)")
    _flag(model, "resume_path", default=defaults["resume_path"],
          help="initial weights: a full ControlLDM checkpoint made by tool_add_control.py")
    _flag(model, "learning_rate", type=float, default=defaults["learning_rate"], help="AdamW learning rate")
    _flag(model, "sd_locked", action=argparse.BooleanOptionalAction, default=defaults["sd_locked"],
          help="keep the Stable Diffusion decoder frozen (--no-sd_locked also trains output blocks and out)")
    _flag(model, "only_mid_control", action=argparse.BooleanOptionalAction, default=defaults["only_mid_control"],
          help="inject only the middle-block control residual")
    _flag(model, "gradient_checkpointing", action=argparse.BooleanOptionalAction, default=None,
          help="recompute activations in backward (default: the config's use_checkpoint)")

    speed = parser.add_argument_group("speed and memory")
    _flag(speed, "fused_adamw", action=argparse.BooleanOptionalAction, default=None,
          help="AdamW as one fused kernel (default: whenever the parameters allow it)")
    _flag(speed, "frozen_dtype", default="float32", choices=("float32", "bfloat16", "float16"),
          help="store the frozen VAE, text encoder and locked UNet in this dtype (with a *-mixed --precision)")
    _flag(speed, "channels_last", action="store_true", help="convolutions in channels-last memory format")
    _flag(speed, "compile", action="store_true", help="torch.compile the UNet and the ControlNet")
    _flag(speed, "float32_matmul_precision", default="highest", choices=("highest", "high", "medium"),
          help="float32 matrix products: 'highest' keeps float32 (the original's numbers), 'high' lets GPUs use "
               "TF32, 'medium' bf16 (also on CPUs with bf16 units); torch.set_float32_matmul_precision")
    _flag(speed, "retain_host_memory", action=argparse.BooleanOptionalAction, default=None,
          help="keep the host memory that tensors free for the next step instead of returning it to the system "
               "(glibc's malloc; default: on when training on the CPU, where it saves the kernel re-mapping "
               "gigabytes per step)")
    _flag(speed, "optimizer_in_backward", action="store_true",
          help="update each parameter in backward as soon as its gradient is ready, so all gradients never exist "
               "at once (one device; not with gradient accumulation, clipping, 16-mixed or --skip_nonfinite)")

    data = parser.add_argument_group("data")
    _flag(data, "data_root", default="./training/fill50k", help="folder with prompt.json, source/ and target/")
    _flag(data, "resolution", type=int, default=None, help="resize images to this size (multiple of 64)")
    _flag(data, "batch_size", type=int, default=defaults["batch_size"], help="samples per device per step")
    _flag(data, "num_workers", type=int, default=defaults["num_workers"],
          help=f"DataLoader worker processes (default: 0 on CPU as the original, up to {MAX_GPU_WORKERS} per GPU)")
    _flag(data, "prompt_dropout", type=float, default=0.0, help="probability of training with an empty prompt")
    _flag(data, "latent_cache", nargs="?", const="", default=None,
          help="train from the latents and prompt embeddings that tool_cache_latents.py stored in this folder "
               "(the bare flag: <data_root>/latent_cache), without running the VAE encoder or the text encoder")

    run = parser.add_argument_group("run")
    _flag(run, "max_steps", type=int, default=-1, help="stop after this many optimizer steps (-1: no limit)")
    _flag(run, "max_epochs", type=int, default=defaults["max_epochs"], help="stop after this many epochs")
    _flag(run, "seed", type=int, default=None, help="seed everything (model noise, data order, workers)")
    _flag(run, "accumulate_grad_batches", type=int, default=1, help="batches per optimizer step")
    _flag(run, "gradient_clip_val", type=float, default=None, help="clip the gradient norm to this value")
    _flag(run, "precision", default=defaults["precision"], help="32, bf16-mixed or 16-mixed")
    _flag(run, "accelerator", default="auto", help="auto, gpu or cpu")
    _flag(run, "devices", type=int, default=defaults["devices"], help="devices (GPUs or CPU processes) per node")
    _flag(run, "num_nodes", type=int, default=defaults["num_nodes"], help="nodes (torchrun / SLURM launches)")
    _flag(run, "strategy", default=defaults["strategy"], help="Lightning strategy: auto, ddp, fsdp, deepspeed_stage_2")
    _flag(run, "default_root_dir", default=".", help="where logs, image_log/ and checkpoints/ go")
    _flag(run, "skip_nonfinite", action="store_true", help="skip batches with a NaN/inf loss instead of stopping")

    outputs = parser.add_argument_group("checkpoints and logs")
    _flag(outputs, "checkpoint_every_n_steps", type=int, default=1000, help="save a checkpoint every N steps")
    _flag(outputs, "keep_last_k", type=int, default=3, help="step checkpoints to keep (last.ckpt links to the newest)")
    _flag(outputs, "resume_from_checkpoint", default=None,
          help="continue an interrupted run from this Lightning checkpoint ('last' finds the newest)")
    _flag(outputs, "logger_freq", type=int, default=defaults["logger_freq"], help="log image grids every N batches")
    _flag(outputs, "log_ddim_steps", type=int, default=50, help="DDIM steps of the logged samples")
    _flag(outputs, "log_max_images", type=int, default=4, help="images per logged grid")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    return parser


# ---------------------------------------------------------------------------------------------
# Checks of the arguments, before any heavy work
# ---------------------------------------------------------------------------------------------

def _check_positive(name: str, value: int | float | None, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0:
        raise ValueError(f"--{name} must be a positive number, got {value}")


def _resolve_resume(value: str | None, root: str) -> str | None:
    """The checkpoint to resume from; 'last' means the newest in `<root>/checkpoints/`."""
    if value is None:
        return None
    checkpoint_dir = Path(root, CHECKPOINT_DIRNAME)
    path = (newest_checkpoint(checkpoint_dir) or checkpoint_dir / "last.ckpt") if value == "last" else Path(value)
    if not path.is_file():
        hint = (f"no checkpoint in {checkpoint_dir} yet; start without --resume_from_checkpoint" if value == "last"
                else "check the path")
        raise FileNotFoundError(f"--resume_from_checkpoint: {path} does not exist ({hint})")
    _check_training_checkpoint(path)
    return str(path)


def _check_training_checkpoint(path: Path) -> None:
    """Refuse a damaged, unsafe or weights-only file before training starts (tensors are memory-mapped, not read)."""
    try:
        checkpoint = read_checkpoint(path, mmap=True)
    except ValueError as error:
        raise ValueError(f"--resume_from_checkpoint: {error}") from error
    missing = [key for key in TRAINING_CHECKPOINT_KEYS if not isinstance(checkpoint, Mapping) or key not in checkpoint]
    if missing:
        raise ValueError(f"--resume_from_checkpoint: {path} is not a training checkpoint (it has no "
                         f"{', '.join(missing)}); to start a new run from its weights pass it as --resume_path")


def uses_gpu(args: argparse.Namespace) -> bool:
    """Whether the run trains on CUDA GPUs (asked for, or `auto` with one visible)."""
    return args.accelerator in ("gpu", "cuda") or (args.accelerator == "auto" and torch.cuda.is_available())


def retains_host_memory(args: argparse.Namespace) -> bool:
    """`--retain_host_memory`, whose default is on when the run trains on the CPU."""
    return not uses_gpu(args) if args.retain_host_memory is None else args.retain_host_memory


def apply_host_memory_option(args: argparse.Namespace) -> None:
    """Keep freed host memory when `--retain_host_memory` says so; warn if it was asked for and cannot be done."""
    if not retains_host_memory(args):
        return
    retained = retain_freed_host_memory()
    if not retained and args.retain_host_memory:  # asked for explicitly; the CPU default stays silent
        rank_zero_warn("--retain_host_memory needs glibc's malloc, which this system does not use; freed host "
                       "memory goes back to the system as usual (drop the flag to silence this)")


def _check_hardware(args: argparse.Namespace) -> None:
    if args.accelerator not in ACCELERATORS:
        raise ValueError(f"--accelerator '{args.accelerator}' is not one of {', '.join(ACCELERATORS)}")
    if args.strategy not in STRATEGIES:
        raise ValueError(f"--strategy '{args.strategy}' is not one of {', '.join(STRATEGIES)}")
    package = STRATEGIES[args.strategy]
    if package and importlib.util.find_spec(package) is None:
        raise ValueError(f"--strategy {args.strategy} needs the '{package}' package: pip install {package}")
    on_gpu = uses_gpu(args)
    if args.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ValueError(f"--accelerator {args.accelerator} needs a CUDA GPU and none is visible; "
                         f"use --accelerator cpu")
    if on_gpu and args.devices > torch.cuda.device_count():
        raise ValueError(f"--devices {args.devices} asks for more GPUs than the {torch.cuda.device_count()} visible")
    if args.accelerator == "auto" and not on_gpu and args.devices > 1:
        raise ValueError(f"--devices {args.devices}: no GPU is visible, so this would start {args.devices} CPU "
                         f"processes; pass --accelerator cpu to do that on purpose, or --devices 1")
    if args.precision == "16-mixed" and not on_gpu:
        raise ValueError("--precision 16-mixed needs a GPU; use bf16-mixed or 32 on the CPU")


def _check_optimizer_in_backward(args: argparse.Namespace) -> None:
    """Refuse what cannot work when each parameter is updated during backward, before the step is complete."""
    if not args.optimizer_in_backward:
        return
    conflicts = {
        "--accumulate_grad_batches > 1": args.accumulate_grad_batches > 1,
        "--gradient_clip_val": args.gradient_clip_val is not None,
        "--precision 16-mixed (loss scaling)": args.precision == "16-mixed",
        "--skip_nonfinite": args.skip_nonfinite,
        "more than one device or node": args.devices * args.num_nodes > 1,
        f"--strategy {args.strategy}": args.strategy != "auto",
    }
    conflict = next((name for name, present in conflicts.items() if present), None)
    if conflict is not None:
        raise ValueError(f"--optimizer_in_backward updates each parameter during backward, which cannot be combined "
                         f"with {conflict}; drop one of the two")


def check_args(args: argparse.Namespace) -> argparse.Namespace:
    """Validate and normalise the arguments; raises ValueError/FileNotFoundError with one clear sentence."""
    if args.precision not in PRECISIONS:
        raise ValueError(f"--precision '{args.precision}' is not one of 32, bf16-mixed, 16-mixed")
    args.precision = PRECISIONS[args.precision]
    for name in ("batch_size", "logger_freq", "devices", "num_nodes", "accumulate_grad_batches",
                 "checkpoint_every_n_steps", "keep_last_k", "log_ddim_steps", "learning_rate"):
        _check_positive(name, getattr(args, name), allow_none=False)
    _check_positive("max_epochs", args.max_epochs)
    if args.num_workers is not None and args.num_workers < 0:
        raise ValueError(f"--num_workers must be 0 or more, got {args.num_workers}")
    if not 0.0 <= args.prompt_dropout <= 1.0:
        raise ValueError(f"--prompt_dropout must be in [0, 1], got {args.prompt_dropout}")
    if args.resolution is not None and (args.resolution <= 0 or args.resolution % 64):
        raise ValueError(f"--resolution must be a positive multiple of 64, got {args.resolution}")
    if args.latent_cache == "":
        args.latent_cache = str(default_cache_folder(args.data_root))
    _check_hardware(args)
    if args.frozen_dtype != "float32" and args.precision == "32-true":
        raise ValueError(f"--frozen_dtype {args.frozen_dtype} needs --precision bf16-mixed or 16-mixed "
                         "(half-precision weights without autocast would meet float32 inputs)")
    _check_optimizer_in_backward(args)
    if not Path(args.config).is_file():
        raise FileNotFoundError(f"--config: {args.config} does not exist")
    args.resume_from_checkpoint = _resolve_resume(args.resume_from_checkpoint, args.default_root_dir)
    if args.resume_from_checkpoint is None and not Path(args.resume_path).is_file():
        raise FileNotFoundError(
            f"--resume_path: {args.resume_path} does not exist; make it with "
            f"`python tool_add_control.py <stable-diffusion.ckpt> {args.resume_path}`")
    return args


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


def build_model(args: argparse.Namespace) -> pl.LightningModule:
    """The ControlLDM of `--config` with the initial weights (skipped when resuming a run)."""
    model = create_model(args.config)
    if args.resume_from_checkpoint is None:
        _load_initial_weights(model, args)
    model.learning_rate = args.learning_rate
    model.sd_locked = args.sd_locked
    model.only_mid_control = args.only_mid_control
    model.fused_adamw = args.fused_adamw
    model.optimizer_in_backward = args.optimizer_in_backward
    if args.latent_cache is not None:  # checked against the weights before any speed option converts them
        resumed = args.resume_from_checkpoint is not None
        weights = read_checkpoint(args.resume_from_checkpoint)["state_dict"] if resumed else model.state_dict()
        use_latent_cache(model, LatentCache.open(args.latent_cache), weights)
    if args.gradient_checkpointing is not None:
        model.model.diffusion_model.set_gradient_checkpointing(args.gradient_checkpointing)
        model.control_model.set_gradient_checkpointing(args.gradient_checkpointing)
    return apply_speed_options(model, frozen_dtype=getattr(torch, args.frozen_dtype), channels_last=args.channels_last,
                               compile=args.compile)


def check_dataset(root: str, resolution: int | None) -> None:
    """Fail before training rather than hours into it: every listed image exists, and the first item loads at a
    size the model takes (a corrupt image further on is reported when it is read)."""
    from tutorial_dataset import MyDataset

    probe = MyDataset(root=root)
    listed = [os.path.join(root, record[key]) for record in probe.data for key in ("source", "target")]
    missing = [path for path in listed if not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of the {len(listed)} images listed in {root}/prompt.json do not "
                                f"exist (the first is {missing[0]}); restore them or remove their lines")
    height, width = probe[0]["jpg"].shape[:2]
    if resolution is None and (height % IMAGE_SIZE_MULTIPLE or width % IMAGE_SIZE_MULTIPLE):
        raise ValueError(f"the images in {root} are {width}x{height} px but the model needs sides that are "
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


def build_dataloader(args: argparse.Namespace, on_gpu: bool) -> DataLoader:
    """Fill50K-format data, shuffled per epoch by a `ResumableRandomSampler`; Lightning shards it per rank."""
    from tutorial_dataset import MyDataset

    dataset = MyDataset(root=args.data_root, resolution=args.resolution, prompt_dropout=args.prompt_dropout,
                        seed=args.seed)
    if args.latent_cache is not None:
        dataset.latent_cache = LatentCache.open(args.latent_cache)
        dataset.latent_cache.check_data_set(dataset.root, dataset.data, args.resolution)
    if args.batch_size > len(dataset):
        raise ValueError(f"--batch_size {args.batch_size} is larger than the {len(dataset)} samples in "
                         f"{args.data_root}; use a smaller batch size")
    check_dataset(args.data_root, args.resolution)
    sampler = ResumableRandomSampler(len(dataset), args.seed)
    # Each new iterator draws its workers' base seed from `generator`; from the global random stream it would take
    # one more draw in a run resumed mid-epoch than in an uninterrupted one, and change all the noise after it.
    generator = torch.Generator().manual_seed(sampler.seed)
    workers = default_num_workers(on_gpu, args.devices) if args.num_workers is None else args.num_workers
    return DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, generator=generator, num_workers=workers,
                      collate_fn=collate_same_size, pin_memory=on_gpu, persistent_workers=workers > 0)


def build_loggers(root: str) -> list:
    """CSV logs always, TensorBoard too when it is installed."""
    loggers = [CSVLogger(save_dir=root, name="lightning_logs")]
    if importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None:
        loggers.append(TensorBoardLogger(save_dir=root, name="lightning_logs"))
    return loggers


def build_callbacks(args: argparse.Namespace, sampler: ResumableRandomSampler) -> list[pl.Callback]:
    """Guards, exact-resume state, image logs, step checkpoints, learning rate and throughput monitors, and a
    tqdm progress bar (seconds per step once steps take longer than a second, the loss; Lightning would pick Rich's
    bar, in it/s, whenever `rich` happens to be installed)."""
    checkpoint_dir = os.path.join(args.default_root_dir, CHECKPOINT_DIRNAME)
    image_logger = ImageLogger(batch_frequency=args.logger_freq, max_images=args.log_max_images,
                               log_images_kwargs={"ddim_steps": args.log_ddim_steps})
    checkpoints = StepCheckpoint(
        dirpath=checkpoint_dir, filename="step-{step:07d}", auto_insert_metric_name=False, monitor="step",
        mode="max", save_top_k=args.keep_last_k, every_n_train_steps=args.checkpoint_every_n_steps, save_last="link",
        save_on_exception=True, enable_version_counter=False)
    throughput = ThroughputMonitor(batch_size_fn=lambda batch: len(batch["txt"]))
    cached_encoders = [CachedEncodersOnCPU()] if args.latent_cache is not None else []
    return [NonFiniteLossGuard(checkpoint_dir, skip=args.skip_nonfinite), RandomStateCheckpoint(),
            DataOrderCheckpoint(sampler, args.batch_size), GracefulStop(), image_logger, checkpoints,
            LearningRateMonitor(logging_interval="step"), throughput, TQDMProgressBar(), *cached_encoders]


def build_trainer(args: argparse.Namespace, sampler: ResumableRandomSampler) -> pl.Trainer:
    """The Lightning Trainer of the run; checkpoints are written atomically and read safely."""
    return pl.Trainer(
        accelerator=args.accelerator, devices=args.devices, num_nodes=args.num_nodes, strategy=args.strategy,
        precision=args.precision, max_steps=args.max_steps, max_epochs=args.max_epochs,
        accumulate_grad_batches=args.accumulate_grad_batches, gradient_clip_val=args.gradient_clip_val,
        default_root_dir=args.default_root_dir, callbacks=build_callbacks(args, sampler),
        plugins=[AtomicCheckpointIO()], logger=build_loggers(args.default_root_dir), log_every_n_steps=1)


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
    """Parse, check, build and fit; prints where the image logs and checkpoints are."""
    args = check_args(build_parser(defaults, description).parse_args(argv))
    # The frozen VAE and text encoder are in eval mode by design; FLOPs are not needed for samples/s.
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    warnings.filterwarnings("ignore", message=r".*flops_per_batch.*")
    torch.set_float32_matmul_precision(args.float32_matmul_precision)
    if args.seed is not None:
        pl.seed_everything(args.seed, workers=True)
    dataloader = build_dataloader(args, on_gpu=uses_gpu(args))
    model = build_model(args)
    apply_host_memory_option(args)
    trainer = build_trainer(args, dataloader.sampler)
    try:
        trainer.fit(model, train_dataloaders=dataloader, ckpt_path=args.resume_from_checkpoint)
    except SystemExit:  # how Lightning ends a fit stopped by SIGTERM or Ctrl-C, after saving a checkpoint
        if not trainer.interrupted:
            raise
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
