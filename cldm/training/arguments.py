"""The training command line: one parser for the three training scripts, whose defaults equal the original
scripts' constants, and the checks of its arguments before any heavy work."""
from __future__ import annotations

import argparse
import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.plugins.environments import (LSFEnvironment, MPIEnvironment, SLURMEnvironment,
                                                    TorchElasticEnvironment)

from cldm import flags
from cldm.checkpoints.paths import check_run_folder
from cldm.data.geometry import CROP_POSITIONS, RESIZE_MODES, check_random_crop
from cldm.data.images import DEFAULT_MAX_IMAGE_PIXELS, check_pixel_limit, check_resolution_pixels
from cldm.data.latent_cache import default_cache_folder
from cldm.data.layouts import add_column_flags
from cldm.data.shard_stream import DEFAULT_SHUFFLE_BUFFER
from cldm.training.batch_probe import MAX_BATCH
from cldm.training.callbacks import newest_checkpoint
from cldm.training.evaluation import DEFAULT_VAL_ITEMS, EVAL_DEFAULTS, check_evaluation_args
from cldm.training.shard_training import DEFAULT_DATA_ROOT, check_shard_args
from ldm.checkpoint import read_checkpoint

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
# The launchers Lightning detects for multi-node runs, as it looks for them.
CLUSTER_ENVIRONMENTS = (TorchElasticEnvironment, SLURMEnvironment, LSFEnvironment, MPIEnvironment)
# Image sides must be multiples of this: the VAE downsamples 8x and the UNet three more times.
IMAGE_SIZE_MULTIPLE = 64
# Flags with their own sentinels or fixes; the others use the shared types of cldm.flags as they are.
_max_steps = flags.integer(1, sentinel=-1, sentinel_meaning="no limit")
_gradient_clip_val = flags.real(0.0, low_open=True, fix="leave the flag out to train without clipping")


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def _flag(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """Add `--name` and its hyphenated spelling `--na-me` as one option."""
    spellings = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
    parser.add_argument(*spellings, dest=name, **kwargs)


def _batch_size(value: str) -> int | str:
    """A batch size, or `MAX_BATCH`."""
    if value == MAX_BATCH:
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{value}' is neither a number nor '{MAX_BATCH}'") from None


def _latent_cache(text: str) -> str:
    """A latent cache folder, or "" (the bare flag, whose constant argparse passes through here too) for
    <data_root>/latent_cache."""
    return flags.path(text) if text else text


def build_parser(defaults: Mapping[str, Any], description: str) -> argparse.ArgumentParser:
    """The training CLI; every default is the original script's constant."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    model = parser.add_argument_group("model")
    _flag(model, "config", type=flags.path, default=defaults["config"], help="model config (yaml, target/params)")
    _flag(model, "resume_path", type=flags.path, default=defaults["resume_path"],
          help="initial weights: a full ControlLDM checkpoint made by tool_add_control.py")
    _flag(model, "learning_rate", type=flags.positive_finite_float, default=defaults["learning_rate"],
          help="AdamW learning rate")
    _flag(model, "sd_locked", action=argparse.BooleanOptionalAction, default=defaults["sd_locked"],
          help="keep the Stable Diffusion decoder frozen (--no-sd_locked also trains output blocks and out)")
    _flag(model, "only_mid_control", action=argparse.BooleanOptionalAction, default=defaults["only_mid_control"],
          help="inject only the middle-block control residual")
    _flag(model, "gradient_checkpointing", action=argparse.BooleanOptionalAction, default=None,
          help="recompute activations in backward (default: off on GPUs under a *-mixed --precision, where the "
               "activations fit and recomputing them costs a third of the step; else the config's use_checkpoint)")

    speed = parser.add_argument_group("speed and memory")
    _flag(speed, "fused_adamw", action=argparse.BooleanOptionalAction, default=None,
          help="AdamW as one fused kernel (default: whenever the parameters allow it)")
    _flag(speed, "frozen_dtype", default=None, choices=("float32", "bfloat16", "float16"),
          help="store the frozen VAE, text encoder and locked UNet in this dtype (with a *-mixed --precision; "
               "default: bfloat16 on GPUs under bf16-mixed, as autocast would cast them to it at every step; "
               "else float32)")
    _flag(speed, "recompute_weight_casts", action=argparse.BooleanOptionalAction, default=None,
          help="under autocast, recast the trainable weights to half precision in backward instead of keeping "
               "their casts (saves 0.67 GiB for the SD1.5 ControlNet; default: on the CPU only, since on a GPU "
               "the recasts and the per-tensor Python hooks lengthen a step that waits on kernel launches)")
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
    _flag(data, "data_root", type=flags.path, default=None,
          help=f"data set folder: prompt.json and its images (Fill50K layout), or metadata.jsonl and its images "
               f"(image-folder layout); {DEFAULT_DATA_ROOT} when neither it nor --data_shards is given")
    _flag(data, "data_shards", type=flags.path, nargs="+", default=None,
          help="train from WebDataset shards instead of --data_root: .tar files, brace patterns "
               "(shard-{000000..000009}.tar), the folder tool_make_shards.py wrote, or URLs webdataset opens "
               "(pipe:..., gs://..., https://...); members {key}.<ext> target, {key}.hint.<ext> hint, {key}.txt "
               "or {key}.json caption (its --caption_column field)")
    _flag(data, "shuffle_buffer", type=flags.positive_int, default=DEFAULT_SHUFFLE_BUFFER,
          help="with --data_shards: items each DataLoader worker shuffles among (1: the shards' order)")
    _flag(data, "skip_bad_samples", action="store_true",
          help="with --data_shards: skip an undecodable item, or the rest of a damaged shard, with a warning "
               "instead of stopping")
    add_column_flags(data)
    _flag(data, "resolution", type=flags.positive_int, default=None, help="resize images to this size (multiple of 64)")
    _flag(data, "resize", default="crop", choices=RESIZE_MODES,
          help="with --resolution: 'crop' resizes the short side to it and crops the long side (nothing is "
               "squashed), 'stretch' resizes both sides to it (the original's); the same for square images")
    _flag(data, "crop", default="center", choices=CROP_POSITIONS,
          help="where --resize crop cuts: the centre, or a position drawn per visit from (seed, epoch, index), the "
               "same for the hint and the target and after a resume")
    _flag(data, "buckets", action="store_true",
          help="with --resolution: train each item at the size of about --resolution squared pixels (sides multiples "
               "of 64, 4:1 to 1:4) nearest its aspect ratio, every batch of one size")
    _flag(data, "max_image_pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
          help="refuse an image whose header gives more pixels than this, before decoding it (default: 8192x8192)")
    _flag(data, "batch_size", type=_batch_size, default=defaults["batch_size"],
          help=f"samples per device per step; '{MAX_BATCH}': the largest whose step fits in the GPU's memory, "
               "found by trying the step before training (one GPU)")
    _flag(data, "num_workers", type=flags.worker_count, default=defaults["num_workers"],
          help=f"DataLoader worker processes (default: 0 on CPU as the original, up to {MAX_GPU_WORKERS} per GPU)")
    _flag(data, "prompt_dropout", type=flags.probability, default=0.0,
          help="probability of training with an empty prompt")
    _flag(data, "latent_cache", type=_latent_cache, nargs="?", const="", default=None,
          help="train from the latents and prompt embeddings that tool_cache_latents.py stored in this folder "
               "(the bare flag: <data_root>/latent_cache), without running the VAE encoder or the text encoder")

    run = parser.add_argument_group("run")
    _flag(run, "max_steps", type=_max_steps, default=-1, help="stop after this many optimizer steps (-1: no limit)")
    _flag(run, "max_epochs", type=flags.positive_int, default=defaults["max_epochs"],
          help="stop after this many epochs")
    _flag(run, "seed", type=flags.seed, default=None, help="seed everything (model noise, data order, workers)")
    _flag(run, "accumulate_grad_batches", type=flags.positive_int, default=1, help="batches per optimizer step")
    _flag(run, "gradient_clip_val", type=_gradient_clip_val, default=None,
          help="clip the gradient norm to this value (default: no clipping)")
    _flag(run, "precision", default=defaults["precision"], help="32, bf16-mixed or 16-mixed")
    _flag(run, "accelerator", default="auto", help="auto, gpu or cpu")
    _flag(run, "devices", type=flags.process_count, default=defaults["devices"],
          help="devices (GPUs or CPU processes) per node")
    _flag(run, "num_nodes", type=flags.positive_int, default=defaults["num_nodes"],
          help="nodes (torchrun / SLURM launches)")
    _flag(run, "strategy", default=defaults["strategy"], help="Lightning strategy: auto, ddp, fsdp, deepspeed_stage_2")
    _flag(run, "default_root_dir", type=flags.path, default=".", help="where logs, image_log/ and checkpoints/ go")
    _flag(run, "skip_nonfinite", action="store_true", help="skip batches with a NaN/inf loss instead of stopping")

    outputs = parser.add_argument_group("checkpoints and logs")
    _flag(outputs, "checkpoint_every_n_steps", type=flags.positive_int, default=1000,
          help="save a checkpoint every N steps")
    _flag(outputs, "keep_last_k", type=flags.positive_int, default=3,
          help="step checkpoints to keep (last.ckpt links to the newest)")
    _flag(outputs, "resume_from_checkpoint", type=flags.path, default=None,
          help="continue an interrupted run from this Lightning checkpoint ('last' finds the newest)")
    _flag(outputs, "logger_freq", type=flags.positive_int, default=defaults["logger_freq"],
          help="log image grids every N batches")
    _flag(outputs, "log_ddim_steps", type=flags.ddim_steps, default=50, help="DDIM steps of the logged samples")
    _flag(outputs, "log_max_images", type=flags.non_negative_int, default=4,
          help="images per logged grid (0: no image logging, as the original's ImageLogger)")

    evaluation = parser.add_argument_group("evaluation (off unless --eval_every_n_steps is given)")
    _flag(evaluation, "eval_every_n_steps", type=flags.positive_int, default=None,
          help="sample the validation set with fixed seeds at step 0, every N steps and at the end, log val/* "
               "control metrics, write image_log/val/ grids and redraw run.png")
    _flag(evaluation, "val_items", type=flags.positive_int, default=None,
          help=f"hold out the last K items of --data_root for evaluation; training never sees them (default with "
               f"--eval_every_n_steps: {DEFAULT_VAL_ITEMS}, unless --val_data_root is given)")
    _flag(evaluation, "val_data_root", type=flags.path, default=None,
          help="evaluate on all items of this Fill50K-format folder instead of holding items out")
    _flag(evaluation, "eval_ddim_steps", type=flags.ddim_steps, default=None,
          help=f"DDIM steps of the evaluation samples (when unset: {EVAL_DEFAULTS['eval_ddim_steps']})")
    _flag(evaluation, "eval_guidance_scale", type=flags.non_negative_finite_float, default=None,
          help=f"guidance scale against the empty prompt (when unset: {EVAL_DEFAULTS['eval_guidance_scale']})")
    _flag(evaluation, "eval_seed", type=flags.seed, default=None,
          help=f"seed of the evaluation noise; item i always starts from the same noise (when unset: "
               f"{EVAL_DEFAULTS['eval_seed']})")
    _flag(evaluation, "eval_batch_size", type=flags.positive_int, default=None,
          help=f"items sampled at once (when unset: {EVAL_DEFAULTS['eval_batch_size']})")
    _flag(evaluation, "keep_best_control", action="store_true",
          help="keep the training checkpoint with the highest val/control_f1 as checkpoints/best-control.ckpt")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    return parser


# ---------------------------------------------------------------------------------------------
# Checks of the arguments, before any heavy work
# ---------------------------------------------------------------------------------------------

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


def _check_num_nodes(args: argparse.Namespace) -> None:
    """More than one node needs a launcher that starts this script on every node; without one the run would wait
    for the other nodes until the rendezvous times out."""
    if args.num_nodes == 1 or "NODE_RANK" in os.environ:  # NODE_RANK: started by hand on each node
        return
    if not any(environment.detect() for environment in CLUSTER_ENVIRONMENTS):
        raise ValueError(f"--num_nodes {args.num_nodes} needs a launcher that starts the script on every node "
                         "(torchrun, SLURM, LSF or MPI, or NODE_RANK set by hand) and none started this one, so it "
                         "would wait for the other nodes; use a launcher or --num_nodes 1")


def _resolve_device_defaults(args: argparse.Namespace) -> None:
    """Fill in the speed defaults that differ between GPUs and the CPU, each the one measured faster there; the
    original's choices (float32 weights, the config's checkpointing) stay wherever a run is not mixed-precision
    on a GPU."""
    mixed_on_gpu = uses_gpu(args) and args.precision != "32-true"
    if args.frozen_dtype is None:
        args.frozen_dtype = "bfloat16" if mixed_on_gpu and args.precision == "bf16-mixed" else "float32"
    if args.gradient_checkpointing is None and mixed_on_gpu:
        args.gradient_checkpointing = False
    if args.recompute_weight_casts is None:
        args.recompute_weight_casts = not uses_gpu(args)


def _check_batch_probe(args: argparse.Namespace) -> None:
    """`--batch_size max` measures one GPU's memory with an eager step."""
    if args.batch_size != MAX_BATCH:
        return
    if not uses_gpu(args):
        raise ValueError(f"--batch_size {MAX_BATCH} measures a GPU's memory and this run trains on the CPU; pass a "
                         "number")
    if args.devices * args.num_nodes > 1 or args.compile:
        reason = "more than one device or node" if not args.compile else "--compile (the probe runs eagerly)"
        raise ValueError(f"--batch_size {MAX_BATCH} cannot be combined with {reason}; find the batch with one GPU "
                         f"and pass it as a number")


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


def _check_framing(args: argparse.Namespace) -> None:
    """Refuse a `--crop random` that a latent cache (one crop per image) cannot serve, or that would not crop, and
    `--buckets` without a resolution or with a latent cache."""
    if args.crop == "random" and args.latent_cache is not None:
        raise ValueError("--crop random draws a new crop at every visit and a latent cache holds one crop per image; "
                         "train with --crop center or without --latent_cache")
    check_random_crop(args.crop, args.resize, args.resolution)
    if args.buckets and args.resolution is None:
        raise ValueError("--buckets makes sizes of about --resolution squared pixels and this run has no --resolution; "
                         "pass --resolution 512 (or another multiple of 64)")
    if args.buckets and args.latent_cache is not None:
        raise ValueError("--buckets trains items at sizes that a latent cache (made at --resolution squared) does not "
                         "hold; train without --latent_cache or without --buckets")


def check_args(args: argparse.Namespace) -> argparse.Namespace:
    """Validate and normalise the arguments; raises ValueError/FileNotFoundError with one clear sentence."""
    if args.precision not in PRECISIONS:
        raise ValueError(f"--precision '{args.precision}' is not one of 32, bf16-mixed, 16-mixed")
    args.precision = PRECISIONS[args.precision]
    if args.batch_size != MAX_BATCH and args.batch_size <= 0:
        raise ValueError(f"--batch_size must be a positive number, got {args.batch_size}")
    if args.resolution is not None and (args.resolution <= 0 or args.resolution % 64):
        raise ValueError(f"--resolution must be a positive multiple of 64, got {args.resolution}")
    check_pixel_limit(args.max_image_pixels, "--max_image_pixels")
    check_resolution_pixels(args.resolution, args.max_image_pixels)
    check_shard_args(args)
    _check_framing(args)
    if args.latent_cache == "":
        args.latent_cache = str(default_cache_folder(args.data_root))
    _check_hardware(args)
    _check_num_nodes(args)
    _resolve_device_defaults(args)
    if args.frozen_dtype != "float32" and args.precision == "32-true":
        raise ValueError(f"--frozen_dtype {args.frozen_dtype} needs --precision bf16-mixed or 16-mixed "
                         "(half-precision weights without autocast would meet float32 inputs)")
    _check_optimizer_in_backward(args)
    _check_batch_probe(args)
    check_evaluation_args(args)
    if not Path(args.config).is_file():
        raise FileNotFoundError(f"--config: {args.config} does not exist")
    check_run_folder(args.default_root_dir, "--default_root_dir")
    args.resume_from_checkpoint = _resolve_resume(args.resume_from_checkpoint, args.default_root_dir)
    if args.resume_from_checkpoint is None and not Path(args.resume_path).is_file():
        raise FileNotFoundError(
            f"--resume_path: {args.resume_path} does not exist; make it with "
            f"`python tool_add_control.py <stable-diffusion.ckpt> {args.resume_path}`")
    return args
