"""One ControlNet training step, ours against diffusers' `train_controlnet.py` step, on the same architecture.

Both sides build the architecture of `--config` with random weights (diffusers' configs are derived from the
yaml, so the parameter counts match), lock the UNet, and run forward, backward and the AdamW step on the same
batch. Each measurement runs in its own process (peak RSS is per side on CPU), one process at a time, in
alternating order over `--rounds`; the table shows the median step time, FLOPs per step counted with
`torch.utils.flop_counter`, the achieved FLOP/s against a matmul peak measured here, and peak memory. On the
CPU, ours keeps freed host memory in the process as `tutorial_train.py` does there (`cldm.host_memory`);
`--variant release-host-memory` adds ours without that, `--diffusers-retaining-host-memory` diffusers with it.

Run from the repository root:

    python -m benchmarks.bench_train_step                          # CPU, fp32, 128 and 256 px, batch 1
    python -m benchmarks.bench_train_step --channels-last --variant frozen-bf16,step-in-backward
    python -m benchmarks.bench_train_step --device cuda --precision bf16-mixed --resolution 512 --batch 4
    python -m benchmarks.bench_train_step --tiny --resolution 64 --steps 1 --warmup 1 --rounds 1   # CI size
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode

from cldm.host_memory import retain_freed_host_memory

REPO_ROOT = Path(__file__).resolve().parents[1]
FULL_CONFIG = "models/cldm_v15.yaml"
TINY_CONFIG = "models/cldm_tiny.yaml"
LEARNING_RATE = 1e-5  # the tutorial's
MAX_GRAD_NORM = 1.0  # train_controlnet.py's default clipping
PROMPT = "a photograph of a cat sitting on a red sofa, high quality"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GIB = 1024**3

# ---------------------------------------------------------------------------------------------
# What one worker process measures
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One side in one configuration; serialised to JSON for the worker process."""

    side: str  # "ours" or "diffusers"
    config: str
    device: str
    resolution: int  # image side in pixels; the latent is resolution / 8
    batch: int
    precision: str  # "fp32" or "bf16-mixed"
    checkpointing: bool
    encoders: bool  # VAE and text encoding inside the step, as in real training
    steps: int
    warmup: int
    frozen_dtype: str = "fp32"  # ours: storage of the frozen VAE, text encoder and UNet
    attention: str = "sdpa"  # ours: backend of the UNet/ControlNet attention
    adamw: str = "fused"  # ours: "fused", "plain" (PyTorch's default implementation) or "in-backward"
    channels_last: bool = False  # ours
    compile: bool = False  # ours
    autocast_cache: bool = False  # ours: autocast's weight-cast cache (Lightning turns it off)
    # ours: recast trainable weights in backward (cldm.training.speed); None: as tutorial_train.py on the device
    recompute_casts: bool | None = None
    # Keep freed host memory in the process (glibc); None: as each side's trainer does, which for ours is
    # tutorial_train.py's default on the CPU and for diffusers' script is never.
    retain_host_memory: bool | None = None
    latent_cache: bool = False  # ours: the batch holds cached VAE moments and text embeddings (tool_cache_latents)
    # Take each side's GPU code paths even on the CPU (diffusers' AdamW and clipping as `foreach`), so that the
    # operators counted here are those the side dispatches on a GPU.
    gpu_paths: bool = False
    count: bool = True  # count FLOPs, dispatched operators and Python calls of one extra step
    profile: bool = False  # profile one extra step (torch.profiler): kernels, device time, top operators

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """bf16 under bf16-mixed, or whenever frozen weights are stored in half precision (which needs autocast)."""
        if self.precision == "bf16-mixed":
            return torch.bfloat16
        return DTYPES[self.frozen_dtype] if self.frozen_dtype != "fp32" else None

    @property
    def label(self) -> str:
        """Short description of the row in the table."""
        parts = [self.side, f"ckpt {'on' if self.checkpointing else 'off'}"]
        if self.autocast_dtype is not None and self.precision == "fp32":
            parts.append(f"{self.frozen_dtype}-mixed")
        if self.frozen_dtype != "fp32":
            parts.append(f"frozen {self.frozen_dtype}")
        if self.attention != "sdpa":
            parts.append(f"{self.attention} attention")
        if self.side == "ours" and self.adamw != "fused":
            parts.append({"plain": "plain AdamW", "in-backward": "AdamW in backward"}[self.adamw])
        if self.autocast_cache and self.autocast_dtype is not None:
            parts.append("autocast cache on")
        if self.channels_last:
            parts.append("channels_last")
        if self.compile:
            parts.append("compile")
        if self.latent_cache:
            parts.append("latent cache")
        if self.recompute_casts is not None and self.recompute_casts != (self.device == "cpu"):
            parts.append("weight casts " + ("recomputed" if self.recompute_casts else "kept"))
        if self.retains_host_memory != self.retains_host_memory_by_default:
            parts.append("host memory retained" if self.retain_host_memory else "host memory released")
        return ", ".join(parts)

    @property
    def retains_host_memory_by_default(self) -> bool:
        """Our trainer keeps freed host memory when it trains on the CPU; diffusers' script never does."""
        return self.side == "ours" and self.device == "cpu"

    @property
    def retains_host_memory(self) -> bool:
        """Whether the worker keeps freed host memory: the job's choice, else its side's default."""
        return self.retains_host_memory_by_default if self.retain_host_memory is None else self.retain_host_memory


# ---------------------------------------------------------------------------------------------
# Our side: ControlLDM, as trained by Lightning (training_step, backward, optimizer step)
# ---------------------------------------------------------------------------------------------


def build_ours(job: Job, device: torch.device) -> tuple[Callable[[], torch.Tensor], list[torch.nn.Module]]:
    """Our ControlLDM with the job's speed options, its optimizer, and a closure running one training step."""
    from cldm.model import create_model
    from cldm.training.optimizers import AdamWInBackward, make_optimizer
    from cldm.training.speed import apply_speed_options
    from ldm.modules.attention import set_attention_backend
    from ldm.modules.diffusionmodules.openaimodel import set_gradient_checkpointing

    with _building_on(device):
        model = create_model(REPO_ROOT / job.config)
    model.sd_locked = True
    set_gradient_checkpointing(model, job.checkpointing)
    set_attention_backend(model, job.attention)
    recompute_casts = job.device == "cpu" if job.recompute_casts is None else job.recompute_casts
    apply_speed_options(model, frozen_dtype=DTYPES[job.frozen_dtype], channels_last=job.channels_last,
                        compile=job.compile, recompute_weight_casts=recompute_casts)
    model.to(device).train()
    if job.adamw == "in-backward":
        optimizer = AdamWInBackward(model.trainable_parameters(), LEARNING_RATE)
    else:
        optimizer = make_optimizer(model.trainable_parameters(), LEARNING_RATE, fused=job.adamw == "fused")
    data = make_data(job, device, context_dim=_context_dim(job.config))
    batch = {"txt": data["prompts"], "hint": data["hint"].permute(0, 2, 3, 1)}
    if job.latent_cache:  # what the cached data set yields: moments and embeddings in the cache's bfloat16
        batch.update(latent_moments=data["moments"].bfloat16(), txt_embedding=data["context"].bfloat16())
    else:
        batch["jpg"] = data["image"].permute(0, 2, 3, 1)
    cond = {"c_crossattn": [data["context"]], "c_concat": [data["hint"]]}

    def forward_backward() -> torch.Tensor:
        # Lightning's mixed precision turns autocast's weight-cast cache off: with checkpointing, the cache would
        # keep a half-precision copy of every trainable weight until the end of the forward pass.
        with torch.autocast(device.type, dtype=job.autocast_dtype, enabled=job.autocast_dtype is not None,
                            cache_enabled=job.autocast_cache):
            loss, _ = model.shared_step(batch) if job.encoders else model(data["latents"], cond)
        loss.backward()
        return loss

    def step() -> torch.Tensor:  # as Lightning's automatic optimization: zero_grad, then step(closure)
        optimizer.zero_grad(set_to_none=True)
        return optimizer.step(forward_backward)

    return step, [model.model.diffusion_model, model.control_model, model.first_stage_model, model.cond_stage_model]


# ---------------------------------------------------------------------------------------------
# diffusers' side: the step of examples/controlnet/train_controlnet.py
# ---------------------------------------------------------------------------------------------


def diffusers_configs(config_path: Path) -> dict[str, Any]:
    """Constructor arguments of diffusers' UNet, VAE, CLIP text model and scheduler for the same architecture."""
    params = OmegaConf.to_container(OmegaConf.load(config_path).model.params, resolve=True)
    unet, vae = params["unet_config"]["params"], params["first_stage_config"]["params"]
    text = params["cond_stage_config"]
    if not text["target"].endswith("FrozenCLIPEmbedder") or unet.get("use_linear_in_transformer", False):
        raise ValueError(f"{config_path}: the diffusers side supports SD 1.x configs (FrozenCLIPEmbedder, conv proj)")
    levels = range(len(unet["channel_mult"]))
    attention = [2**level in unet["attention_resolutions"] for level in levels]
    channels = [unet["model_channels"] * mult for mult in unet["channel_mult"]]
    head_channels = unet.get("num_head_channels", -1)
    heads = unet["num_heads"] if head_channels == -1 else [c // head_channels for c in channels]
    ddconfig = vae["ddconfig"]
    if ddconfig["attn_resolutions"] or ddconfig["z_channels"] != vae["embed_dim"]:
        raise ValueError(f"{config_path}: diffusers' VAE needs attn_resolutions [] and z_channels == embed_dim")
    text_params = text.get("params", {})
    return dict(
        unet=dict(
            sample_size=unet["image_size"], in_channels=unet["in_channels"], out_channels=unet["out_channels"],
            down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
            up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
            block_out_channels=channels, layers_per_block=unet["num_res_blocks"],
            cross_attention_dim=unet["context_dim"], attention_head_dim=heads,
            transformer_layers_per_block=unet.get("transformer_depth", 1),
        ),
        vae=dict(
            in_channels=ddconfig["in_channels"], out_channels=ddconfig["out_ch"],
            down_block_types=["DownEncoderBlock2D"] * len(ddconfig["ch_mult"]),
            up_block_types=["UpDecoderBlock2D"] * len(ddconfig["ch_mult"]),
            block_out_channels=[ddconfig["ch"] * mult for mult in ddconfig["ch_mult"]],
            layers_per_block=ddconfig["num_res_blocks"], latent_channels=vae["embed_dim"],
            sample_size=ddconfig["resolution"],
        ),
        text=dict(
            vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu",
            hidden_size=text_params.get("hidden_size", 768), num_hidden_layers=text_params.get("num_layers", 12),
            num_attention_heads=text_params.get("num_heads", 12),
            intermediate_size=text_params.get("intermediate_size", 3072),
        ),
        scheduler=dict(
            num_train_timesteps=params.get("timesteps", 1000), beta_start=params["linear_start"],
            beta_end=params["linear_end"], beta_schedule="scaled_linear",
        ),
        conditioning_channels=params["control_stage_config"]["params"]["hint_channels"],
        scale_factor=params["scale_factor"],
    )


def build_diffusers(job: Job, device: torch.device) -> tuple[Callable[[], torch.Tensor], list[torch.nn.Module]]:
    """diffusers' frozen UNet/VAE/CLIP and trainable ControlNetModel.from_unet, and one train_controlnet.py step."""
    from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = diffusers_configs(REPO_ROOT / job.config)
    with _building_on(device):
        unet = UNet2DConditionModel(**configs["unet"])
        vae = AutoencoderKL(**configs["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text"], attn_implementation="sdpa"))
        controlnet = ControlNetModel.from_unet(unet, conditioning_channels=configs["conditioning_channels"])
    scheduler = DDPMScheduler(**configs["scheduler"])
    # train_controlnet.py: frozen models in the mixed-precision dtype, the ControlNet in float32, trainable.
    weight_dtype = torch.bfloat16 if job.precision == "bf16-mixed" else torch.float32
    for frozen in (unet, vae, text_encoder):
        frozen.requires_grad_(False).eval().to(device, dtype=weight_dtype)
    controlnet.to(device).train()
    if job.checkpointing:  # the same blocks as ours: ControlNet and UNet
        controlnet.enable_gradient_checkpointing()
        unet.enable_gradient_checkpointing()
    # On a GPU torch picks the multi-tensor (`foreach`) AdamW and clipping; `gpu_paths` asks for them on the CPU.
    foreach = True if job.gpu_paths else None
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=LEARNING_RATE, betas=(0.9, 0.999), weight_decay=1e-2,
                                  eps=1e-8, foreach=foreach)
    data = make_data(job, device, context_dim=configs["text"]["hidden_size"])
    input_ids = _token_ids(data["prompts"], device)

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=job.autocast_dtype is not None):
            if job.encoders:
                latents = vae.encode(data["image"].to(weight_dtype)).latent_dist.sample() * configs["scale_factor"]
                encoder_hidden_states = text_encoder(input_ids, return_dict=False)[0]
            else:
                latents, encoder_hidden_states = data["latents"], data["context"]
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
            noisy_latents = scheduler.add_noise(latents, noise, timesteps)
            down_residuals, mid_residual = controlnet(
                noisy_latents, timesteps, encoder_hidden_states=encoder_hidden_states,
                controlnet_cond=data["hint"].to(weight_dtype), return_dict=False,
            )
            model_pred = unet(
                noisy_latents, timesteps, encoder_hidden_states=encoder_hidden_states,
                down_block_additional_residuals=[residual.to(weight_dtype) for residual in down_residuals],
                mid_block_additional_residual=mid_residual.to(weight_dtype), return_dict=False,
            )[0]
            loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(controlnet.parameters(), MAX_GRAD_NORM, foreach=foreach)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # the script's default (--set_grads_to_none off)
        return loss

    return step, [unet, controlnet, vae, text_encoder]


def _token_ids(prompts: list[str], device: torch.device) -> torch.Tensor:
    """Token ids as train_controlnet.py's data pipeline makes them (padded to 77), with our shipped tokenizer."""
    from ldm.modules.encoders.modules import load_clip_tokenizer

    tokens = load_clip_tokenizer()(prompts, max_length=77, padding="max_length", truncation=True, return_tensors="pt")
    return tokens.input_ids.to(device)


# ---------------------------------------------------------------------------------------------
# Shared pieces of the worker
# ---------------------------------------------------------------------------------------------


def _context_dim(config: str) -> int:
    return int(OmegaConf.load(REPO_ROOT / config).model.params.unet_config.params.context_dim)


def make_data(job: Job, device: torch.device, context_dim: int) -> dict[str, Any]:
    """The same seeded batch for both sides: images in [-1, 1], hints in [0, 1] (NCHW), prompts; latents/context."""
    generator = torch.Generator().manual_seed(1234)
    shape = (job.batch, 3, job.resolution, job.resolution)
    latent = job.resolution // 8
    data = {
        "image": torch.rand(shape, generator=generator) * 2 - 1,
        "hint": torch.rand(shape, generator=generator),
        "latents": torch.randn((job.batch, 4, latent, latent), generator=generator),
        "context": torch.randn((job.batch, 77, context_dim), generator=generator),
    }
    # VAE posterior moments (mean, log-variance) as a latent cache stores them; SD's VAE has log-variances near -10
    data["moments"] = torch.cat([data["latents"], torch.full_like(data["latents"], -10.0)], dim=1)
    data = {key: value.to(device) for key, value in data.items()}
    data["prompts"] = [PROMPT] * job.batch
    return data


def _building_on(device: torch.device):
    """Where to create the weights: directly on a GPU (random initialisation there takes seconds, not a minute on
    the host), on the CPU as usual."""
    return torch.device(device) if device.type != "cpu" else contextlib.nullcontext()


def _sizes(networks: list[torch.nn.Module]) -> dict:
    """Parameter counts of the (UNet, ControlNet, VAE, text encoder) of a side, and of its trainable part."""
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    unet, controlnet, vae, text = networks
    return {"unet": count(unet), "controlnet": count(controlnet), "vae": count(vae), "text": count(text),
            "trainable": sum(p.numel() for p in controlnet.parameters() if p.requires_grad)}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA allocator statistics, or the process's RSS high-water mark (Linux clear_refs)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # the peak then covers the whole process (ru_maxrss)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated CUDA memory, or peak RSS of this process since the last reset."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _cpu_flash_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args,
                                        out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# FlopCounterMode counts the CUDA attention kernels but not the CPU flash-attention ones; same formulas.
CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_attention_backward_flops,
}


def count_flops(step: Callable[[], torch.Tensor]) -> int:
    """FLOPs of one step (forward and backward, recomputation included; the optimizer does no matmuls)."""
    with flop_counter.FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        step()
    return counter.get_total_flops()


class _OperatorCounter(TorchDispatchMode):
    """Counts the ATen operators of a step as they reach the kernels (below autograd and autocast): on a GPU,
    about one kernel launch each, so their number is the host's share of a step that the GPU cannot hide."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def count_operators(step: Callable[[], torch.Tensor]) -> int:
    """ATen operators dispatched by one step: forward, backward (recomputation included) and optimizer."""
    with _OperatorCounter() as counter:
        step()
    return counter.count


def _code_of(function: Callable) -> Any:
    """The code object a hook runs: of a function, a bound method or a functools.partial."""
    function = getattr(function, "func", function)
    return getattr(getattr(function, "__func__", function), "__code__", None)


def _registered_hooks(networks: Iterable[torch.nn.Module]) -> set:
    """Code objects of the hooks registered on the networks' modules and parameters, and of global module hooks."""
    from torch.nn.modules import module as module_globals

    hook_dicts = [getattr(module_globals, name) for name in dir(module_globals) if name.startswith("_global_")
                  and name.endswith("hooks") and isinstance(getattr(module_globals, name), dict)]
    for network in networks:
        for module in network.modules():
            hook_dicts += [module._forward_pre_hooks, module._forward_hooks, module._backward_pre_hooks,
                           module._backward_hooks]
        for parameter in network.parameters():
            hook_dicts += [hooks for hooks in (parameter._backward_hooks,
                                               getattr(parameter, "_post_accumulate_grad_hooks", None)) if hooks]
    return {_code_of(hook) for hooks in hook_dicts for hook in hooks.values()}


def count_python_calls(step: Callable[[], torch.Tensor], networks: Iterable[torch.nn.Module]) -> tuple[int, int]:
    """Python function calls of one step, and how many of them are hooks: module and parameter hooks, and the
    pack/unpack functions of saved-tensor hooks (gradient checkpointing's included), called per saved tensor."""
    hooks = _registered_hooks(networks)
    saved_tensors_hooks_init = torch.autograd.graph.saved_tensors_hooks.__init__.__code__
    calls = hook_calls = 0

    def profile(frame, event, arg) -> None:
        nonlocal calls, hook_calls
        if event != "call":
            return
        calls += 1
        if frame.f_code is saved_tensors_hooks_init:
            hooks.update(_code_of(frame.f_locals[name]) for name in ("pack_hook", "unpack_hook"))
        elif frame.f_code in hooks:
            hook_calls += 1

    sys.setprofile(profile)
    try:
        step()
    finally:
        sys.setprofile(None)
    return calls, hook_calls


def profile_step(step: Callable[[], torch.Tensor], device: torch.device) -> dict[str, Any]:
    """One step under torch.profiler: its wall time, the device's busy time and kernel launches, and the table of
    operators by host time (where a launch-bound step spends it)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    started = time.perf_counter()
    with profile(activities=activities) as profiler:
        step()
        _synchronize(device)
    wall = time.perf_counter() - started
    events = profiler.key_averages()
    on_device = [event for event in events if event.device_type != torch.autograd.DeviceType.CPU]
    return {
        "wall_seconds": wall,
        "device_seconds": sum(event.self_device_time_total for event in on_device) / 1e6,
        "kernels": sum(event.count for event in on_device),
        "table": events.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60),
    }


def measure(job: Job) -> dict[str, Any]:
    """Build one side, warm up, time `job.steps` steps, then count the FLOPs of one more step."""
    torch.manual_seed(0)
    device = torch.device(job.device)
    step, networks = (build_ours if job.side == "ours" else build_diffusers)(job, device)
    if job.retains_host_memory:  # from the built model on, as tutorial_train.py
        retain_freed_host_memory()
    for _ in range(job.warmup):
        step()
    _synchronize(device)
    reset_peak_memory(device)
    times = []
    for _ in range(job.steps):
        started = time.perf_counter()
        loss = step()
        _synchronize(device)
        times.append(time.perf_counter() - started)
    peak = peak_memory_bytes(device)
    result = {"times": times, "peak_bytes": peak, "loss": float(loss.detach()), "sizes": _sizes(networks),
              "flops": None, "operators": None, "python_calls": None, "hook_calls": None}
    if job.profile:
        result["profile"] = profile_step(step, device)
    if job.count and not job.compile:
        result["flops"] = count_flops(step)
        result["operators"] = count_operators(step)
        result["python_calls"], result["hook_calls"] = count_python_calls(step, networks)
    if device.type == "cuda":  # what the caching allocator held at most (nvidia-smi's view, less the context)
        result["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
    return result


# ---------------------------------------------------------------------------------------------
# The parent: plan, run the workers one at a time, print the table
# ---------------------------------------------------------------------------------------------


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> float:
    """Best FLOP/s of a square matmul in `dtype` on `device` (the achievable peak, measured): 2048 on the CPU,
    8192 on a GPU (smaller products leave a large GPU's matrix units partly idle)."""
    size = 2048 if device.type == "cpu" else 8192
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b
    best = 0.0
    for _ in range(repeats):
        _synchronize(device)
        started = time.perf_counter()
        a @ b
        _synchronize(device)
        best = max(best, 2 * size**3 / (time.perf_counter() - started))
    return best


# Options of our extra rows (`--variant`, comma-separated to combine) and the Job fields each sets.
VARIANT_OPTIONS = {
    "channels-last": {"channels_last": True},
    "compile": {"compile": True},
    "frozen-bf16": {"frozen_dtype": "bf16"},
    "frozen-fp16": {"frozen_dtype": "fp16"},
    "math-attention": {"attention": "math"},
    "sliced-attention": {"attention": "sliced"},
    "plain-adamw": {"adamw": "plain"},
    "step-in-backward": {"adamw": "in-backward"},
    "autocast-cache": {"autocast_cache": True},
    "release-host-memory": {"retain_host_memory": False},
    "latent-cache": {"latent_cache": True},
    "recompute-casts": {"recompute_casts": True},
    "keep-casts": {"recompute_casts": False},
}


def _variant(value: str) -> dict[str, Any]:
    """`--variant` value -> Job field overrides."""
    fields = {}
    for option in value.split(","):
        if option.strip() not in VARIANT_OPTIONS:
            raise argparse.ArgumentTypeError(f"unknown --variant option '{option}'; use {', '.join(VARIANT_OPTIONS)}")
        fields.update(VARIANT_OPTIONS[option.strip()])
    return fields


def our_variants(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Field overrides of our extra rows: the shortcut flags first, then each `--variant`."""
    variants = [{"frozen_dtype": dtype} for dtype in args.frozen_dtype if dtype != "fp32"]
    variants += [{"channels_last": True}] if args.channels_last else []
    variants += [{"compile": True}] if args.compile else []
    return variants + args.variant


def plan(args: argparse.Namespace) -> list[Job]:
    """Per resolution and checkpointing setting: diffusers, ours, and ours in each extra variant."""
    checkpointing = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    jobs = []
    for resolution in args.resolution:
        for batch in args.batch:
            for ckpt in checkpointing:
                base = Job(side="ours", config=args.config, device=args.device, resolution=resolution, batch=batch,
                           precision=args.precision, checkpointing=ckpt, encoders=not args.no_encoders,
                           steps=args.steps, warmup=args.warmup, gpu_paths=args.gpu_paths, count=not args.no_count)
                jobs += [replace(base, side=side) for side in args.sides]
                if "diffusers" in args.sides and args.diffusers_retaining_host_memory:
                    jobs.append(replace(base, side="diffusers", retain_host_memory=True))
                if "ours" in args.sides:
                    jobs += [replace(base, **fields) for fields in our_variants(args)]
    return jobs


def run_worker(job: Job) -> dict[str, Any]:
    """Measure `job` in a fresh Python process and return its JSON result, or {"error": last line of stderr}."""
    command = [sys.executable, "-m", "benchmarks.bench_train_step", "--worker", json.dumps(asdict(job))]
    process = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    if process.returncode != 0:
        print(f"worker for '{job.label}' at {job.resolution} px failed:\n{process.stderr[-4000:]}", file=sys.stderr)
        lines = process.stderr.strip().splitlines() or [f"exit status {process.returncode}"]
        return {"error": lines[-1]}
    return json.loads(process.stdout.strip().splitlines()[-1])


def run_all(jobs: list[Job], rounds: int) -> dict[Job, dict[str, Any]]:
    """Run every job `rounds` times, alternating the order each round; pool the step times, keep the peak memory.

    A job whose worker fails (out of memory, say) keeps its error and is not run again; the others go on.
    """
    results: dict[Job, dict[str, Any]] = {}
    for round_index in range(rounds):
        for job in jobs if round_index % 2 == 0 else reversed(jobs):
            if "error" in results.get(job, {}):
                continue
            counted = job in results  # FLOPs, operators and calls do not change between rounds
            result = run_worker(replace(job, count=job.count and not counted))
            if "error" in result:
                results[job] = result
                continue
            print(f"[round {round_index + 1}/{rounds}] {job.resolution} px  {job.label}: "
                  f"median {statistics.median(result['times']):.2f} s/step, "
                  f"peak {result['peak_bytes'] / GIB:.2f} GiB", file=sys.stderr, flush=True)
            if not counted:
                results[job] = result
            else:
                results[job]["times"] += result["times"]
                results[job]["peak_bytes"] = max(results[job]["peak_bytes"], result["peak_bytes"])
    return results


def _baseline(job: Job, results: dict[Job, dict[str, Any]]) -> dict[str, Any] | None:
    """diffusers at the same resolution and checkpointing setting (its precision, frozen weights as its script)."""
    key = Job(side="diffusers", config=job.config, device=job.device, resolution=job.resolution, batch=job.batch,
              precision=job.precision, checkpointing=job.checkpointing, encoders=job.encoders, steps=job.steps,
              warmup=job.warmup, gpu_paths=job.gpu_paths, count=job.count)
    result = results.get(key)
    return None if result is None or "error" in result else result


def _counted(job: Job, results: dict[Job, dict[str, Any]], name: str) -> int | None:
    """A count of one step (FLOPs, operators, calls); a compiled job does the same math as its eager twin, whose
    FLOPs it borrows (what it dispatches is the compiled graph's, not counted)."""
    count = results[job][name]
    if count is None and job.compile and name == "flops":
        count = results.get(replace(job, compile=False), {}).get(name)
    return count


def _thousands(count: int | None) -> str:
    return "-" if count is None else f"{count / 1000:.1f}k"


def format_row(job: Job, results: dict[Job, dict[str, Any]], peaks: dict[torch.dtype | None, float]) -> str:
    """One table row: time, ratio, samples/s, FLOPs per sample, share of peak, operators and Python calls per step,
    memory, ratio (or the worker's error)."""
    result, baseline = results[job], _baseline(job, results)
    where = f"{job.resolution}px/{job.resolution // 8} b{job.batch}"
    if "error" in result:
        return _format_cells([where, job.label], WIDTHS[:2]) + " | failed: " + result["error"]
    seconds = statistics.median(result["times"])
    flops = _counted(job, results, "flops")
    peak = peaks[job.autocast_dtype]
    ratio = lambda ours, theirs: f"{ours / theirs:.2f}x" if baseline else "-"  # noqa: E731
    cells = [
        where, job.label, f"{seconds:.3f}",
        ratio(seconds, statistics.median(baseline["times"]) if baseline else 1),
        f"{min(result['times']):.3f}",
        ratio(min(result["times"]), min(baseline["times"]) if baseline else 1),
        f"{job.batch / seconds:.2f}",
        f"{flops / job.batch / 1e9:.1f}" if flops else "-",
        f"{100 * flops / seconds / peak:.1f}%" if flops else "-",
        _thousands(_counted(job, results, "operators")),
        _thousands(_counted(job, results, "python_calls")),
        _thousands(_counted(job, results, "hook_calls")),
        f"{result['peak_bytes'] / GIB:.2f}",
        ratio(result["peak_bytes"], baseline["peak_bytes"] if baseline else 1),
    ]
    return _format_cells(cells)


COLUMNS = ("res/latent", "variant", "s/step", "vs diff", "best s", "vs diff", "samples/s", "GFLOP/sample",
           "MFU", "ops/step", "py calls", "hooks", "peak GiB", "vs diff")
WIDTHS = (15, 62, 7, 7, 7, 7, 9, 12, 6, 8, 8, 7, 8, 7)


def _format_cells(cells: list[str], widths: tuple[int, ...] = WIDTHS) -> str:
    return " | ".join(cell.ljust(width) if i < 2 else cell.rjust(width) for i, (cell, width) in
                      enumerate(zip(cells, widths, strict=True)))


def print_table(args: argparse.Namespace, jobs: list[Job], results: dict[Job, dict[str, Any]],
                peaks: dict[torch.dtype | None, float]) -> None:
    """Header (device, versions, command, sizes), the table, and our default against diffusers' default."""
    memory = "peak RSS of the process" if args.device == "cpu" else "torch.cuda.max_memory_allocated"
    print(f"ControlNet training step: {args.config}, batch {', '.join(map(str, args.batch))}, {args.precision}, "
          f"{'with' if not args.no_encoders else 'without'} VAE+text encoding, device {args.device} "
          f"({_device_name(args.device)}, {torch.get_num_threads()} threads)")
    print(f"torch {torch.__version__}, diffusers {importlib.metadata.version('diffusers')}, "
          f"python {platform.python_version()}; median of {args.steps} steps x {args.rounds} rounds after "
          f"{args.warmup} warm-up; best s = fastest step; memory = {memory}")
    print("matmul peak: " + ", ".join(f"{_dtype_name(dtype)} {flops / 1e9:.0f} GFLOP/s" for dtype, flops in
                                      peaks.items()))
    print(f"command: python -m benchmarks.bench_train_step {' '.join(args.argv)}")
    sizes = {job.side: results[job]["sizes"] for job in jobs if "sizes" in results[job]}
    for side, size in sizes.items():
        print(f"  {side:9s} params (M): " + ", ".join(f"{name} {count / 1e6:.1f}" for name, count in size.items()))
    print(_format_cells(list(COLUMNS)))
    print("-+-".join("-" * width for width in WIDTHS))
    for job in jobs:
        print(format_row(job, results, peaks))
    for line in _default_comparisons(jobs, results):
        print(line)


def _default_comparisons(jobs: list[Job], results: dict[Job, dict[str, Any]]) -> list[str]:
    """Our default (checkpointing on, as the yaml) against diffusers' default (off), per resolution."""
    lines = []
    for job in jobs:
        if job.side == "ours" and job.checkpointing and job == _default_fields(job):
            theirs = _baseline(replace(job, checkpointing=False), results)
            ours = results[job]
            if theirs is None or "error" in ours:
                continue
            ratios = [f"time {statistics.median(ours['times']) / statistics.median(theirs['times']):.2f}x",
                      f"memory {ours['peak_bytes'] / theirs['peak_bytes']:.2f}x"]
            if ours["flops"] and theirs["flops"]:
                ratios.append(f"FLOPs {ours['flops'] / theirs['flops']:.2f}x")
            lines.append(f"{job.resolution} px, our default (ckpt on) vs diffusers' default (ckpt off): "
                         + ", ".join(ratios))
    return lines


def _default_fields(job: Job) -> Job:
    """`job` with every option of ours at its default."""
    return replace(job, frozen_dtype="fp32", attention="sdpa", adamw="fused", channels_last=False, compile=False,
                   autocast_cache=False, retain_host_memory=None, recompute_casts=None, latent_cache=False)


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return platform.processor() or platform.machine()


def _dtype_name(dtype: torch.dtype | None) -> str:
    return "fp32" if dtype is None else str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _sides(value: str) -> list[str]:
    sides = [side.strip() for side in value.split(",") if side.strip()]
    if not sides or any(side not in ("ours", "diffusers") for side in sides):
        raise argparse.ArgumentTypeError(f"--sides takes 'ours', 'diffusers' or both, comma-separated; got '{value}'")
    return sides


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's flags; defaults are the issue's CPU target run (fp32, batch 1, 128 and 256 px)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", default=FULL_CONFIG, help="our model config; diffusers' is derived from it")
    parser.add_argument("--tiny", action="store_true", help=f"use {TINY_CONFIG} (both sides), for CI")
    parser.add_argument("--sides", type=_sides, default=["ours", "diffusers"], help="comma-separated sides to run")
    parser.add_argument("--resolution", type=int, nargs="+", default=[128, 256], help="image sides in px (latent /8)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes, one set of rows each")
    parser.add_argument("--precision", choices=("fp32", "bf16-mixed"), default="fp32", help="precision of both sides")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--checkpointing", choices=("off", "on", "both"), default="both",
                        help="gradient checkpointing of ControlNet and UNet on both sides")
    parser.add_argument("--no-encoders", action="store_true",
                        help="leave VAE and text encoding out of the step (random latents and context)")
    parser.add_argument("--frozen-dtype", choices=tuple(DTYPES), nargs="+", default=["fp32"],
                        help="ours: storage dtypes of the frozen weights, one row each (half runs under autocast)")
    parser.add_argument("--channels-last", action="store_true", help="ours: add rows with channels_last")
    parser.add_argument("--compile", action="store_true", help="ours: add rows with torch.compile (slow to build)")
    parser.add_argument("--variant", type=_variant, action="append", default=[],
                        help=f"ours: add a row with these options (comma-separated): {', '.join(VARIANT_OPTIONS)}")
    parser.add_argument("--diffusers-retaining-host-memory", action="store_true",
                        help="add diffusers rows that keep freed host memory, as ours does on the CPU (like for like)")
    parser.add_argument("--gpu-paths", action="store_true",
                        help="take each side's GPU code paths on the CPU too (diffusers' foreach AdamW and clipping), "
                             "so that the operators counted are those dispatched on a GPU")
    parser.add_argument("--no-count", action="store_true",
                        help="skip counting FLOPs, operators and Python calls (one extra step each per row)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per process before timing")
    parser.add_argument("--rounds", type=int, default=2, help="processes per row, alternating the order")
    parser.add_argument("--json", type=Path, help="also write every job's raw measurements to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print the table (or, with the internal --worker, measure one job)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(Job(**json.loads(args.worker)))))
        return
    if args.steps < 1 or args.rounds < 1 or args.warmup < 0 or min(args.batch) < 1:
        parser.error("--steps, --rounds and --batch must be at least 1, --warmup at least 0")
    if any(resolution % 8 for resolution in args.resolution):
        parser.error(f"--resolution values must be multiples of 8 (the VAE factor), got {args.resolution}")
    if args.tiny:
        args.config = TINY_CONFIG
    args.argv = sys.argv[1:] if argv is None else argv
    jobs = plan(args)
    device = torch.device(args.device)
    peaks = {dtype: matmul_peak_flops(device, dtype or torch.float32) for dtype in {job.autocast_dtype for job in jobs}}
    results = run_all(jobs, args.rounds)
    print_table(args, jobs, results, peaks)
    if args.json is not None:
        raw = {"matmul_peak_flops": {_dtype_name(dtype): flops for dtype, flops in peaks.items()},
               "jobs": [{**asdict(job), "label": job.label, **results[job]} for job in jobs]}
        args.json.write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
