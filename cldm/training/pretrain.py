"""Pretraining a tiny Stable Diffusion base from scratch (`tool_pretrain_tiny_sd.py`), for demos on a CPU.

From a ControlLDM config, two stages train the base that a ControlNet of that config sits on:

1. the VAE (`first_stage_config`) learns to reconstruct the data set's targets (`ReconstructionKLLoss`);
2. the text-conditioned UNet (`unet_config`, as a plain `UNetModel`) learns to denoise their latents, inside the
   `LatentDiffusion` of the same base (`base_model_config`), with the stage-1 VAE frozen and a text encoder that
   starts from seeded random weights (as `tool_make_random_sd.py` makes them) and trains with the UNet (there is no
   pretrained CLIP offline; a frozen random one leaves the prompt's colours hard to read).

Both stages fit with a Lightning Trainer, the training job's loader, loggers and guards. The result is one
checkpoint in the Stable Diffusion layout (`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*`)
that `tool_add_control.py --config <the same config>` accepts. Each stage starts from `seed`, so the run is
deterministic, and a finished VAE stage (`<work_dir>/vae-<hash>.ckpt`) is reused by a later run with the same VAE
settings.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.utilities import rank_zero_info
from torch.utils.data import DataLoader

from cldm.checkpoints.extraction import to_half
from cldm.checkpoints.lightning_io import AtomicCheckpointIO
from cldm.checkpoints.paths import check_output_path
from cldm.checkpoints.random_weights import randomize_
from cldm.checkpoints.saving import save_state_dict
from cldm.cli import EXIT_INTERRUPTED
from cldm.data.data_order import ResumableRandomSampler
from cldm.data.dataset import MyDataset
from cldm.data.fill50k import generate_fill50k
from cldm.model import load_config, load_state_dict
from cldm.training.callbacks import GracefulStop, NonFiniteLossGuard
from cldm.training.job import (
    build_loggers, check_dataset, fit_until_stopped, ignore_frozen_model_warnings, loader_options,
)
from ldm.checkpoint import PathLike
from ldm.util import instantiate_from_config

LATENT_DIFFUSION = "ldm.models.diffusion.ddpm.LatentDiffusion"
UNET_MODEL = "ldm.modules.diffusionmodules.openaimodel.UNetModel"
COSINE_SCHEDULER = "ldm.lr_scheduler.LambdaWarmUpCosineScheduler2"
# The UNet stage's learning-rate schedules (--unet_lr_schedule).
LR_SCHEDULES = ("constant", "cosine")
RECONSTRUCTION_LOSS = "ldm.modules.losses.ReconstructionKLLoss"
# Parameters of a ControlLDM that its base LatentDiffusion does not take.
CONTROL_PARAMS = ("control_stage_config", "control_key", "only_mid_control", "sd_locked")
BASE_SECTIONS = ("first_stage_config", "unet_config", "cond_stage_config")
# The finished VAE stage in the work folder, named after what it was trained from and how (`vae_checkpoint`).
VAE_CHECKPOINT = "vae-{settings}.ckpt"
# The latent scale is measured over at most this many targets.
SCALE_ITEMS = 1024
# The accepted range of scale_factor * std(latents): the UNet is trained on latents of roughly unit variance.
SCALED_STD_RANGE = (0.5, 2.0)


@dataclass
class PretrainSettings:
    """What `pretrain` trains on and how; the tool's flags (see tool_pretrain_tiny_sd.py for their meaning). The
    defaults are the recipe measured on models/cldm_demo.yaml (benchmarks/results.md, "demo base")."""

    config: str
    out: str
    work_dir: str
    data_root: str | None = None
    count: int = 20000
    size: int = 64
    vae_steps: int = 6000
    vae_learning_rate: float = 1e-3
    vae_batch_size: int = 8
    kl_weight: float = 1e-6
    vae_pixel_loss: str = "l2"
    vae_initial_logvar: float = -8.0
    unet_steps: int = 6000
    unet_learning_rate: float = 1e-3
    unet_batch_size: int = 16
    unet_lr_schedule: str = "cosine"
    prompt_dropout: float = 0.1
    train_text_encoder: bool = True
    seed: int = 0
    accelerator: str = "cpu"
    devices: int = 1
    half: bool = False
    overwrite: bool = False


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

def _model_params(config_path: PathLike) -> DictConfig:
    """`model.params` of a config that has every section of a Stable Diffusion base."""
    params = OmegaConf.select(load_config(config_path), "model.params")
    missing = [section for section in BASE_SECTIONS if params is None or section not in params]
    if missing:
        raise ValueError(f"config file '{config_path}' has no model.params.{missing[0]}, so it describes no Stable "
                         f"Diffusion base to pretrain; pass a ControlLDM config such as ./models/cldm_tiny.yaml")
    return params


def base_model_config(config_path: PathLike) -> DictConfig:
    """The `LatentDiffusion` (target/params) of the base under the ControlLDM of `config_path`: the same VAE, text
    encoder, schedule and UNet (as a plain `UNetModel`), without the ControlNet. Its state dict has the layout of a
    Stable Diffusion checkpoint of that architecture."""
    params = _model_params(config_path)
    base = {key: value for key, value in params.items() if key not in CONTROL_PARAMS}
    base["unet_config"] = {"target": UNET_MODEL, "params": params.unet_config.params}
    return OmegaConf.create({"target": LATENT_DIFFUSION, "params": base})


def build_vae(config_path: PathLike, kl_weight: float, learning_rate: float, initial_logvar: float = 0.0,
              pixel_loss: str = "l1") -> pl.LightningModule:
    """The `AutoencoderKL` of the config's `first_stage_config`, trained by a `ReconstructionKLLoss` (with the
    `pixel_loss` "l1" or "l2") on the images under the config's `first_stage_key`.

    The posterior's log-variance starts at `initial_logvar` everywhere (the bias of the log-variance half of
    `quant_conv`): a fresh encoder's means are small, and unit-variance posterior samples would bury them in noise
    until the encoder learnt to narrow them; started narrow, the decoder sees the means from the first step, and the
    KL term widens the posterior where the decoder does not need the precision."""
    params = _model_params(config_path)
    loss = {"target": RECONSTRUCTION_LOSS, "params": {"kl_weight": kl_weight, "pixel_loss": pixel_loss}}
    vae = instantiate_from_config(params.first_stage_config, lossconfig=loss, learning_rate=learning_rate,
                                  image_key=params.get("first_stage_key", "jpg"))
    with torch.no_grad():
        vae.quant_conv.bias[vae.embed_dim:] = initial_logvar
    return vae


def build_base(config_path: PathLike, vae: torch.nn.Module, seed: int, learning_rate: float,
               train_text_encoder: bool = False, decay_steps: int | None = None) -> pl.LightningModule:
    """The base `LatentDiffusion` with the trained `vae`, a text encoder random from `seed` and a new UNet; with
    `train_text_encoder` the text encoder trains with the UNet (`cond_stage_trainable`), else it stays frozen. With
    `decay_steps` the learning rate falls from `learning_rate` along a half cosine to 0 over that many steps (its
    `scheduler_config`), else it stays constant."""
    config = base_model_config(config_path)
    if decay_steps is not None:
        config.params.scheduler_config = cosine_decay(decay_steps)
    if train_text_encoder:
        config.params.cond_stage_trainable = True
        OmegaConf.update(config, "params.cond_stage_config.params.freeze", False, force_add=True)
    model = instantiate_from_config(config, learning_rate=learning_rate)
    model.first_stage_model.load_state_dict(vae.state_dict())
    randomize_(model.cond_stage_model, torch.Generator().manual_seed(seed))
    return model


def cosine_decay(steps: int) -> DictConfig:
    """A `scheduler_config` whose learning-rate factor falls from 1 along a half cosine to 0 at step `steps`."""
    return OmegaConf.create({"target": COSINE_SCHEDULER, "params": {
        "warm_up_steps": [0], "f_min": [0.0], "f_max": [1.0], "f_start": [1.0], "cycle_lengths": [steps]}})


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def _loader(dataset: MyDataset, batch_size: int, seed: int, on_gpu: bool) -> DataLoader:
    """Batches of `dataset` in the training job's resumable random order."""
    if batch_size > len(dataset):
        raise ValueError(f"a batch size of {batch_size} is larger than the {len(dataset)} samples in "
                         f"{dataset.root}; use a smaller batch size")
    sampler = ResumableRandomSampler(len(dataset), seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, **loader_options(sampler, 0, on_gpu))


def _fit(name: str, model: pl.LightningModule, loader: DataLoader, steps: int,
         settings: PretrainSettings) -> pl.Trainer:
    """Fit `model` for `steps` steps with the training job's loggers and guards, logging into the stage's folder
    `<work_dir>/<name>`."""
    stage_dir = Path(settings.work_dir, name)
    guard = NonFiniteLossGuard(stage_dir, remedy=f"lowering --{name}_learning_rate")
    trainer = pl.Trainer(
        accelerator=settings.accelerator, devices=settings.devices, max_steps=steps, max_epochs=-1,
        default_root_dir=stage_dir, logger=build_loggers(str(stage_dir)), log_every_n_steps=1,
        enable_checkpointing=False, plugins=[AtomicCheckpointIO()],
        callbacks=[guard, GracefulStop(), TQDMProgressBar()])
    fit_until_stopped(trainer, model, loader)
    return trainer


def _train_stage(name: str, model: pl.LightningModule, loader: DataLoader, steps: int, loss_key: str,
                 settings: PretrainSettings) -> bool:
    """Fit one stage and print its steps, seconds per step and final loss; False if it was stopped early."""
    start = time.perf_counter()
    trainer = _fit(name, model, loader, steps, settings)
    seconds = time.perf_counter() - start
    loss = trainer.callback_metrics.get(f"{loss_key}_step")
    shown = "n/a" if loss is None else f"{float(loss):.4f}"
    rank_zero_info(f"{name}: {trainer.global_step} steps, {seconds / max(1, trainer.global_step):.2f} s/it, "
                   f"final {loss_key} {shown}")
    if trainer.interrupted:
        rank_zero_info(f"{name}: stopped early, so no base was written; run again to train this stage anew")
    return not trainer.interrupted


@torch.no_grad()
def latent_std(vae: torch.nn.Module, dataset: MyDataset, batch_size: int) -> float:
    """The standard deviation of posterior samples of the VAE's latents over (at most `SCALE_ITEMS` of) the data
    set's targets."""
    vae.eval()
    items = range(min(len(dataset), SCALE_ITEMS))
    latents = []
    for start in range(0, len(items), batch_size):
        batch = torch.utils.data.default_collate([dataset[index] for index in items[start:start + batch_size]])
        latents.append(vae.encode(vae.get_input(batch, vae.image_key)).sample().flatten())
    return float(torch.cat(latents).std())


def check_scale_factor(config_path: PathLike, std: float) -> None:
    """Refuse a config whose `scale_factor` would not bring latents of standard deviation `std` near unit variance."""
    scale_factor = float(_model_params(config_path).get("scale_factor", 1.0))
    low, high = SCALED_STD_RANGE
    if not low <= scale_factor * std <= high:
        raise ValueError(f"the trained VAE's latents have a standard deviation of {std:.4g}, and scale_factor "
                         f"{scale_factor:g} of config file '{config_path}' scales it to {scale_factor * std:.3g}, "
                         f"outside [{low:g}, {high:g}]; set scale_factor: {1.0 / std:.4g} in {config_path} (a run "
                         f"with the same --work_dir and VAE flags reuses the trained VAE)")


# ---------------------------------------------------------------------------------------------
# The two stages
# ---------------------------------------------------------------------------------------------

def _data_root(settings: PretrainSettings) -> str:
    """`data_root`, or a Fill50K data set of `count` items of `size` px generated (once) in the work folder."""
    if settings.data_root is not None:
        return settings.data_root
    folder = Path(settings.work_dir, f"fill50k-{settings.count}-{settings.size}px-seed{settings.seed}")
    if not folder.is_dir():
        generate_fill50k(folder, count=settings.count, size=settings.size, seed=settings.seed, show_progress=False)
    return str(folder)


def _dataset(root: str, prompt_dropout: float, seed: int) -> MyDataset:
    dataset = MyDataset(root=root, prompt_dropout=prompt_dropout, seed=seed)
    check_dataset(dataset, resolution=None)
    return dataset


def vae_checkpoint(settings: PretrainSettings, dataset: MyDataset) -> Path:
    """Where the VAE stage of `settings` on `dataset` is kept: its name holds a hash of the VAE's config, the data
    set's folder and index file, and the stage's settings, so a run that changes any of them trains a new VAE."""
    params = _model_params(settings.config)
    stage = {"first_stage_config": OmegaConf.to_container(params.first_stage_config, resolve=True),
             "first_stage_key": params.get("first_stage_key"),
             "index_sha256": hashlib.sha256(Path(dataset.index_path).read_bytes()).hexdigest(),
             "root": str(Path(dataset.root).absolute()), "seed": settings.seed, "steps": settings.vae_steps,
             "learning_rate": settings.vae_learning_rate, "batch_size": settings.vae_batch_size,
             "kl_weight": settings.kl_weight, "initial_logvar": settings.vae_initial_logvar,
             "pixel_loss": settings.vae_pixel_loss}
    digest = hashlib.sha256(json.dumps(stage, sort_keys=True).encode()).hexdigest()[:12]
    return Path(settings.work_dir, VAE_CHECKPOINT.format(settings=digest))


def _vae_stage(settings: PretrainSettings, dataset: MyDataset, on_gpu: bool) -> pl.LightningModule | None:
    """The VAE trained on the targets of `dataset`: read from the work folder when an earlier run finished the same
    stage, else trained and saved there; None if training was stopped early."""
    pl.seed_everything(settings.seed, workers=True)
    vae = build_vae(settings.config, settings.kl_weight, settings.vae_learning_rate, settings.vae_initial_logvar,
                    settings.vae_pixel_loss)
    path = vae_checkpoint(settings, dataset)
    if path.is_file():
        vae.load_state_dict(load_state_dict(path))
        rank_zero_info(f"vae: using the finished stage in {path}")
        return vae
    loader = _loader(dataset, settings.vae_batch_size, settings.seed, on_gpu)
    if not _train_stage("vae", vae, loader, settings.vae_steps, "train/rec_loss", settings):
        return None
    save_state_dict(vae.state_dict(), path)
    return vae


def _check_out(settings: PretrainSettings) -> None:
    if Path(settings.out).exists() and not settings.overwrite:
        raise FileExistsError(f"--out {settings.out} already exists; choose another name or pass --overwrite")
    check_output_path(settings.out, overwrite=True)


def pretrain(settings: PretrainSettings) -> int:
    """Train the VAE, then the UNet, and write the base checkpoint to `settings.out`; EXIT_INTERRUPTED if stopped
    early (nothing is written then but a finished VAE stage)."""
    _check_out(settings)
    base_model_config(settings.config)  # the config is checked before any work
    ignore_frozen_model_warnings()
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        return _pretrain_stages(settings)
    finally:
        torch.use_deterministic_algorithms(deterministic)


def _pretrain_stages(settings: PretrainSettings) -> int:
    Path(settings.work_dir).mkdir(parents=True, exist_ok=True)
    on_gpu = settings.accelerator in ("gpu", "cuda")
    root = _data_root(settings)
    targets = _dataset(root, prompt_dropout=0.0, seed=settings.seed)
    vae = _vae_stage(settings, targets, on_gpu)
    if vae is None:
        return EXIT_INTERRUPTED
    std = latent_std(vae, targets, settings.vae_batch_size)
    rank_zero_info(f"vae: latent std {std:.4f}, so 1/std = {1.0 / std:.4f}")
    check_scale_factor(settings.config, std)

    pl.seed_everything(settings.seed, workers=True)
    decay_steps = settings.unet_steps if settings.unet_lr_schedule == "cosine" else None
    base = build_base(settings.config, vae, settings.seed, settings.unet_learning_rate, settings.train_text_encoder,
                      decay_steps)
    pairs = MyDataset(root=root, prompt_dropout=settings.prompt_dropout, seed=settings.seed)  # checked as `targets`
    loader = _loader(pairs, settings.unet_batch_size, settings.seed, on_gpu)
    if not _train_stage("unet", base, loader, settings.unet_steps, "train/loss", settings):
        return EXIT_INTERRUPTED
    weights = base.state_dict()
    save_state_dict(to_half(weights) if settings.half else weights, settings.out)
    rank_zero_info(f"Base checkpoint: {settings.out}")
    rank_zero_info(f"Next: python tool_add_control.py {settings.out} <control_ini.ckpt> --config {settings.config}")
    return 0


def settings_from(args: Any) -> PretrainSettings:
    """The settings of the tool's parsed arguments."""
    return PretrainSettings(**{name: getattr(args, name) for name in PretrainSettings.__dataclass_fields__})
