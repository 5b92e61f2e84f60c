"""Building blocks shared by the UNet and the ControlNet: schedules, embeddings, layers, checkpointing."""
from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts
from torch.utils.checkpoint import checkpoint as _torch_checkpoint

# ---------------------------------------------------------------------------------------------
# Noise schedules
# ---------------------------------------------------------------------------------------------


def make_beta_schedule(
    schedule: str,
    n_timestep: int,
    linear_start: float = 1e-4,
    linear_end: float = 2e-2,
    cosine_s: float = 8e-3,
) -> np.ndarray:
    """Betas of a diffusion schedule, computed in float64 (the original's "linear" is scaled-linear)."""
    if schedule == "linear":
        betas = torch.linspace(linear_start**0.5, linear_end**0.5, n_timestep, dtype=torch.float64, device="cpu") ** 2
    elif schedule == "cosine":
        steps = torch.arange(n_timestep + 1, dtype=torch.float64, device="cpu") / n_timestep + cosine_s
        alphas = torch.cos(steps / (1 + cosine_s) * math.pi / 2).pow(2)
        alphas = alphas / alphas[0]
        betas = (1 - alphas[1:] / alphas[:-1]).clamp(min=0, max=0.999)
    elif schedule == "sqrt_linear":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64, device="cpu")
    elif schedule == "sqrt":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64, device="cpu") ** 0.5
    else:
        raise ValueError(f"unknown beta schedule '{schedule}' (expected linear, cosine, sqrt_linear or sqrt)")
    return betas.numpy()


def extract_into_tensor(a: torch.Tensor, t: torch.Tensor, x_shape: Sequence[int]) -> torch.Tensor:
    """Gather `a[t]` per sample and shape it to broadcast against a tensor of `x_shape`."""
    out = a.gather(-1, t)
    return out.reshape(t.shape[0], *((1,) * (len(x_shape) - 1)))


def noise_like(shape: Sequence[int], device: torch.device, repeat: bool = False) -> torch.Tensor:
    """Standard normal noise; with `repeat`, one sample repeated over the batch."""
    if repeat:
        return torch.randn((1, *shape[1:]), device=device).repeat(shape[0], *((1,) * (len(shape) - 1)))
    return torch.randn(shape, device=device)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000, repeat_only: bool = False) -> torch.Tensor:
    """Sinusoidal timestep embedding, cos first then sin, (N,) -> (N, dim) float32."""
    if repeat_only:
        return timesteps[:, None].repeat(1, dim)
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------


class GroupNorm32(nn.GroupNorm):
    """GroupNorm evaluated in float32 and cast back to the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def normalization(channels: int) -> nn.Module:
    """The UNet's normalisation layer: GroupNorm(32, channels), eps 1e-5, in float32."""
    return GroupNorm32(32, channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of `module` in place and return it."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def scale_module(module: nn.Module, scale: float) -> nn.Module:
    """Scale every parameter of `module` in place and return it."""
    for p in module.parameters():
        p.detach().mul_(scale)
    return module


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    """A 1-D, 2-D or 3-D convolution."""
    layers = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
    if dims not in layers:
        raise ValueError(f"unsupported dimensions: {dims}")
    return layers[dims](*args, **kwargs)


def linear(*args, **kwargs) -> nn.Module:
    """A linear layer."""
    return nn.Linear(*args, **kwargs)


def avg_pool_nd(dims: int, *args, **kwargs) -> nn.Module:
    """A 1-D, 2-D or 3-D average pooling."""
    layers = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
    if dims not in layers:
        raise ValueError(f"unsupported dimensions: {dims}")
    return layers[dims](*args, **kwargs)


def mean_flat(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dimensions."""
    return tensor.mean(dim=list(range(1, tensor.ndim)))


# ---------------------------------------------------------------------------------------------
# Gradient checkpointing
# ---------------------------------------------------------------------------------------------


# Attention kernels whose outputs checkpointing keeps on the CPU instead of recomputing: per query they cost a
# pass over every key (at 512 px, 4096 x 4096 scores per head at the first level), yet their output is one
# activation the size of the query. (On the CPU, scaled-dot-product attention runs this kernel or plain ops.)
ATTENTION_KERNELS = frozenset({torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default})


def _keep_attention_outputs(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in ATTENTION_KERNELS else CheckpointPolicy.PREFER_RECOMPUTE


_PLAIN_CHECKPOINT_OPTIONS = {"use_reentrant": False}
# The policy runs in Python for every operator of a checkpointed block, forward and recomputation. On the CPU,
# where attention is compute-bound, that is cheap next to the attention it saves recomputing; on a GPU the
# fused kernels are fast and the step is bound by launching operators, so there the policy costs more than it
# saves (H100, 512 px, batch 4: 0.376 against 0.294 s per step) and plain checkpointing recomputes everything.
# Newer torch releases can route the tensors a policy keeps through surrounding saved-tensor hooks (such as
# cldm.training.speed.recomputed_weight_casts), like every other tensor saved for backward, and warn until asked to
# choose; older ones always bypass the hooks, which is harmless for kept attention outputs.
_SELECTIVE_CHECKPOINT_OPTIONS = {
    **_PLAIN_CHECKPOINT_OPTIONS,
    "context_fn": functools.partial(create_selective_checkpoint_contexts, _keep_attention_outputs),
}
if "respect_saved_tensors_hooks" in inspect.signature(_torch_checkpoint).parameters:
    _SELECTIVE_CHECKPOINT_OPTIONS["respect_saved_tensors_hooks"] = True


def checkpoint_options(device: torch.device) -> dict:
    """Keyword arguments of `torch.utils.checkpoint.checkpoint` for blocks running on `device`."""
    return _SELECTIVE_CHECKPOINT_OPTIONS if device.type == "cpu" else _PLAIN_CHECKPOINT_OPTIONS


def checkpoint(func: Callable, inputs: Sequence, params: Iterable[nn.Parameter], flag: bool):
    """Run `func(*inputs)`, recomputing activations in backward when `flag` is set.

    Non-reentrant `torch.utils.checkpoint`: results and gradients equal a plain call, frozen
    parameters are fine, and autocast state is restored on recomputation. On the CPU the outputs
    of fused attention kernels (ATTENTION_KERNELS) are kept rather than recomputed
    (`checkpoint_options`). `params` is accepted for the original's signature; the non-reentrant
    variant finds parameters itself.
    """
    if flag and torch.is_grad_enabled():
        return _torch_checkpoint(func, *inputs, **checkpoint_options(inputs[0].device))
    return func(*inputs)


# ---------------------------------------------------------------------------------------------
# DDIM discretisation
# ---------------------------------------------------------------------------------------------


def make_ddim_timesteps(
    ddim_discr_method: str, num_ddim_timesteps: int, num_ddpm_timesteps: int, verbose: bool = True
) -> np.ndarray:
    """DDPM timesteps visited by DDIM: `arange(0, T, T // S) + 1` ("uniform") or a quadratic spacing."""
    if ddim_discr_method == "uniform":
        if not 0 < num_ddim_timesteps <= num_ddpm_timesteps:
            raise ValueError(f"DDIM steps must be in 1..{num_ddpm_timesteps}, got {num_ddim_timesteps}")
        c = num_ddpm_timesteps // num_ddim_timesteps
        ddim_timesteps = np.asarray(list(range(0, num_ddpm_timesteps, c)))
    elif ddim_discr_method == "quad":
        ddim_timesteps = ((np.linspace(0, np.sqrt(num_ddpm_timesteps * 0.8), num_ddim_timesteps)) ** 2).astype(int)
    else:
        raise ValueError(f"unknown DDIM discretisation '{ddim_discr_method}' (expected uniform or quad)")
    # add one to get the final alpha values right (the ones from first scale to data during sampling)
    ddim_timesteps = ddim_timesteps + 1
    # Some step counts (3, 9, 27, 37, ...) would reach timestep T, which does not exist (the original crashed).
    return ddim_timesteps[ddim_timesteps < num_ddpm_timesteps]


def make_ddim_sampling_parameters(alphacums: torch.Tensor, ddim_timesteps: np.ndarray, eta: float, verbose: bool = True):
    """(sigmas, alphas, alphas_prev) of DDIM; the first "previous" alpha is alphas_cumprod[0], not 1.

    `alphas` stays a float32 tensor; `alphas_prev` and `sigmas` are float64 arrays, as in the original.
    """
    alphas = alphacums[ddim_timesteps]
    alphas_prev = np.asarray([float(alphacums[0])] + alphacums[ddim_timesteps[:-1]].tolist(), dtype=np.float64)
    alphas_np = np.asarray(alphas.tolist(), dtype=np.float64)
    sigmas = eta * np.sqrt((1 - alphas_prev) / (1 - alphas_np) * (1 - alphas_np / alphas_prev))
    return sigmas, alphas, alphas_prev
