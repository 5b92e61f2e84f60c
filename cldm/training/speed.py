"""Speed and memory settings for ControlLDM training: memory format, frozen-weight storage, weight casts under
autocast, compilation.

Each function changes one thing, explicitly, on a model the caller built; the model's code does not know about
them. All are opt-in but the recomputed weight casts, which the training job installs on the CPU by default (they
change memory, not results).
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

logger = logging.getLogger(__name__)

# Layers whose weights feed matmul-type kernels (convolution, linear, embedding lookup). Autocast runs these in the
# weights' half precision, so storing them in bf16/fp16 saves memory and the per-step weight casts. Normalisation
# layers are left in float32: they are tiny, and CPU group_norm/layer_norm reject a float32 input with half weights
# (GroupNorm32 feeds them float32), while a half input with float32 weights is supported everywhere.
HALF_STORABLE_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.Embedding)
FROZEN_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# ---------------------------------------------------------------------------------------------
# Memory format and storage precision
# ---------------------------------------------------------------------------------------------


def use_channels_last(model: nn.Module) -> nn.Module:
    """Store every 4-D weight (the convolutions of UNet, ControlNet and VAE) in channels_last format, in place.

    Convolutions whose weight is channels_last produce channels_last outputs, so activations follow without casts
    of the inputs; parameters, names and results are unchanged.
    """
    return model.to(memory_format=torch.channels_last)


def _frozen_networks(model: nn.Module) -> list[nn.Module]:
    """The networks of a LatentDiffusion model that may hold frozen weights: VAE, text encoder and UNet."""
    networks = [model.first_stage_model, model.model.diffusion_model]
    if model.cond_stage_model is not None:
        networks.append(model.cond_stage_model)
    return networks


def _is_frozen(layer: nn.Module) -> bool:
    params = list(layer.parameters(recurse=False))
    return bool(params) and not any(p.requires_grad for p in params)


def store_frozen_weights_in(model: nn.Module, dtype: torch.dtype) -> int:
    """Store the frozen conv/linear/embedding weights of VAE, text encoder and locked UNet in `dtype`, in place.

    Trainable layers (the ControlNet, an unlocked UNet decoder) keep their float32 master weights, and normalisation
    layers stay float32. Half-precision storage needs autocast in the forward pass (Lightning's `bf16-mixed` or
    `16-mixed`), which runs those layers in the weights' precision; call it after `sd_locked` is set. bf16 is the
    safe choice: the SD VAE is known to overflow in float16 at high resolutions.

    Returns:
        The number of parameters now stored in `dtype`.
    """
    if dtype not in FROZEN_WEIGHT_DTYPES:
        raise ValueError(f"frozen weights can be stored in {FROZEN_WEIGHT_DTYPES}, got {dtype}")
    stored = 0
    for network in _frozen_networks(model):
        for layer in network.modules():
            if isinstance(layer, HALF_STORABLE_LAYERS) and _is_frozen(layer):
                layer.to(dtype)
                stored += sum(p.numel() for p in layer.parameters(recurse=False))
    logger.info("Stored %.1f M frozen parameters in %s", stored / 1e6, dtype)
    return stored


# ---------------------------------------------------------------------------------------------
# Half-precision copies of trainable weights
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _WeightCast:
    """What `recomputed_weight_casts` saves instead of a weight's half-precision cast (or the cast's transpose)."""

    weight: torch.Tensor
    dtype: torch.dtype
    transposed: bool
    version: int


def _pack_weight_cast(tensor: torch.Tensor) -> torch.Tensor | _WeightCast:
    # A cast of a trainable leaf (`weight.to(dtype)`, as autocast makes) has a ToCopyBackward0 node whose only
    # input is the leaf's AccumulateGrad node; linear layers save its transpose (TBackward0 on top). Same shape,
    # strides and device means the saved tensor is exactly `weight.to(dtype)`, or its `.t()`.
    node, transposed = tensor.grad_fn, False
    if node is not None and node.name() == "TBackward0":
        node, transposed = node.next_functions[0][0], True
    if node is None or node.name() != "ToCopyBackward0":
        return tensor
    weight = getattr(node.next_functions[0][0], "variable", None)
    if weight is None or weight.dtype == tensor.dtype or weight.device != tensor.device:
        return tensor
    layout = weight.t() if transposed else weight
    if tensor.shape != layout.shape or tensor.stride() != layout.stride():
        return tensor
    return _WeightCast(weight, tensor.dtype, transposed, weight._version)


def _unpack_weight_cast(packed: torch.Tensor | _WeightCast) -> torch.Tensor:
    if not isinstance(packed, _WeightCast):
        return packed
    if packed.weight._version != packed.version:
        raise RuntimeError(
            "a trainable weight changed between the forward pass and its use in backward, so its half-precision "
            "cast cannot be recomputed; change weights only after backward (in the optimizer step), not in between"
        )
    cast = packed.weight.to(packed.dtype)
    return cast.t() if packed.transposed else cast


def recomputed_weight_casts() -> torch.autograd.graph.saved_tensors_hooks:
    """Context manager for a forward pass under autocast: backward recasts trainable weights instead of keeping casts.

    Autocast runs a float32 weight's conv/linear in half precision by casting the weight, and autograd keeps that
    cast for backward (for the gradient of the input): a second, half-precision copy of every trainable weight
    outside checkpointed blocks. Under these hooks autograd keeps a reference to the float32 weight and recasts it
    when backward needs it; the cast is exact, so gradients are unchanged.
    """
    return torch.autograd.graph.saved_tensors_hooks(_pack_weight_cast, _unpack_weight_cast)


def _autocast_training(module: nn.Module) -> bool:
    """Whether a forward pass of `module` now runs under autocast with autograd recording."""
    device_type = next(module.parameters()).device.type
    return torch.is_grad_enabled() and torch.is_autocast_enabled(device_type)


def recompute_weight_casts_in(networks: Iterable[nn.Module]) -> list[RemovableHandle]:
    """Run the forward of each of `networks` under `recomputed_weight_casts` whenever it runs under autocast with
    autograd recording; returns the hook handles.

    The saved-tensor hooks see every tensor saved for backward, so install them only on the networks with
    trainable weights: the ControlNet, and the UNet when its decoder trains.
    """
    handles = []
    for network in networks:
        entered: list[contextlib.AbstractContextManager] = []

        def enter(module: nn.Module, args: tuple, entered: list = entered) -> None:
            hooks = recomputed_weight_casts() if _autocast_training(module) else contextlib.nullcontext()
            hooks.__enter__()
            entered.append(hooks)

        def leave(module: nn.Module, args: tuple, output: object, entered: list = entered) -> None:
            entered.pop().__exit__(None, None, None)

        handles.append(network.register_forward_pre_hook(enter))
        handles.append(network.register_forward_hook(leave, always_call=True))
    return handles


# ---------------------------------------------------------------------------------------------
# Compilation
# ---------------------------------------------------------------------------------------------


def compile_model(model: nn.Module, mode: str | None = None, backend: str = "inductor") -> nn.Module:
    """`torch.compile` the UNet and the ControlNet in place (`nn.Module.compile`: names and state-dict keys unchanged).

    The VAE and the text encoder run once per step without gradients and are left eager.
    """
    model.model.diffusion_model.compile(mode=mode, backend=backend)
    model.control_model.compile(mode=mode, backend=backend)
    return model


def trainable_networks(model: nn.Module) -> list[nn.Module]:
    """The ControlNet, and the UNet when its decoder trains (`sd_locked` False)."""
    return [model.control_model] + ([] if model.sd_locked else [model.model.diffusion_model])


def apply_speed_options(model: nn.Module, frozen_dtype: torch.dtype = torch.float32, channels_last: bool = False,
                        compile: bool = False, recompute_weight_casts: bool = True) -> nn.Module:
    """Install the recomputed weight casts on the trainable networks (unless told not to) and apply the opt-in
    settings above, in the order they need: frozen storage first (it picks layers by `requires_grad`), then memory
    format, then compilation of the result."""
    if recompute_weight_casts:
        recompute_weight_casts_in(trainable_networks(model))
    if frozen_dtype != torch.float32:
        store_frozen_weights_in(model, frozen_dtype)
    if channels_last:
        use_channels_last(model)
    if compile:
        compile_model(model)
    return model


