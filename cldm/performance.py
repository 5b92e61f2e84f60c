"""Speed and memory settings for ControlLDM training: memory format, frozen-weight storage, weight casts under
autocast, compilation, AdamW.

Each function changes one thing, explicitly, on a model the caller built. All are opt-in but
`recomputed_weight_casts`, which ControlLDM uses under autocast (it changes memory, not results).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Layers whose weights feed matmul-type kernels (convolution, linear, embedding lookup). Autocast runs these in the
# weights' half precision, so storing them in bf16/fp16 saves memory and the per-step weight casts. Normalisation
# layers are left in float32: they are tiny, and CPU group_norm/layer_norm reject a float32 input with half weights
# (GroupNorm32 feeds them float32), while a half input with float32 weights is supported everywhere.
HALF_STORABLE_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.Embedding)
FROZEN_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Gradients gathered before AdamWInBackward updates them in one call (a fused call per parameter costs ~1 ms on
# a CPU).
DEFAULT_BUCKET_BYTES = 64 * 2**20
# Device types with a fused AdamW kernel in PyTorch >= 2.4.
FUSED_ADAMW_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps")

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
    outside checkpointed blocks, 0.67 GiB for the SD1.5 ControlNet. Under these hooks autograd keeps a reference
    to the float32 weight and recasts it when backward needs it; the cast is exact, so gradients are unchanged.
    """
    return torch.autograd.graph.saved_tensors_hooks(_pack_weight_cast, _unpack_weight_cast)


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


def apply_speed_options(model: nn.Module, frozen_dtype: torch.dtype = torch.float32, channels_last: bool = False,
                        compile: bool = False) -> nn.Module:
    """Apply the opt-in settings above to a ControlLDM whose `sd_locked` is set, in the order they need: frozen
    storage first (it picks layers by `requires_grad`), then memory format, then compilation of the result."""
    if frozen_dtype != torch.float32:
        store_frozen_weights_in(model, frozen_dtype)
    if channels_last:
        use_channels_last(model)
    if compile:
        compile_model(model)
    return model


# ---------------------------------------------------------------------------------------------
# Optimizer
# ---------------------------------------------------------------------------------------------


def fused_adamw_supported(params: Iterable[torch.Tensor]) -> bool:
    """Whether PyTorch's fused AdamW kernel accepts every parameter (dense floating point on a supported device)."""
    params = list(params)
    return bool(params) and all(
        p.is_floating_point() and not p.is_sparse and p.device.type in FUSED_ADAMW_DEVICE_TYPES for p in params
    )


def make_optimizer(params: Iterable[nn.Parameter], lr: float, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW with PyTorch's default hyper-parameters (the original's), as one fused kernel when possible.

    Args:
        params: the trainable parameters.
        lr: learning rate.
        fused: True for the fused kernel, False for PyTorch's default implementation (multi-tensor `foreach` on
            GPUs, a per-parameter loop on CPU), None for fused whenever every parameter supports it.
    """
    params = list(params)
    if not params:
        raise ValueError("make_optimizer got no parameters; check that the ControlNet parameters require grad")
    return torch.optim.AdamW(params, lr=lr, fused=_use_fused(params, fused))


def _use_fused(params: list[nn.Parameter], fused: bool | None) -> bool:
    """`fused`, or whether every parameter supports the fused kernel when it is None; refuses an impossible True."""
    supported = fused_adamw_supported(params)
    if fused and not supported:
        raise ValueError(
            f"fused AdamW needs dense floating-point parameters on one of {FUSED_ADAMW_DEVICE_TYPES}; pass fused=None"
        )
    return supported if fused is None else fused


class AdamWInBackward(torch.optim.AdamW):
    """AdamW whose update runs inside backward: parameters step as soon as their gradients are complete.

    Gradients are gathered into buckets of about `bucket_bytes` as backward completes them; each full bucket is
    updated by one fused AdamW call and its gradients freed, so the gradients of all trainable parameters never
    exist at once (1.35 GiB for the SD1.5 ControlNet in float32; a bucket is 64 MiB). The update, the state and
    `state_dict()` equal plain `AdamW`'s, so checkpoints resume either way. `step(closure)` runs the closure
    (forward and backward) and then updates what is left, so Lightning's automatic optimization drives it as any
    optimizer. Each backward is one optimizer step, so gradient accumulation, gradient clipping, fp16 loss
    scaling and DDP (whose all-reduce comes after the gradient hooks) cannot be combined with it.
    """

    def __init__(self, params: Iterable[nn.Parameter], lr: float, fused: bool | None = None,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
        params = list(params)
        if not params or not all(p.requires_grad for p in params):
            raise ValueError("AdamWInBackward needs a non-empty list of parameters that all require grad")
        super().__init__(params, lr=lr, fused=_use_fused(params, fused))
        self.bucket_bytes = bucket_bytes
        self._ready: list[torch.Tensor] = []
        self._ready_bytes = 0
        self._hooks = [param.register_post_accumulate_grad_hook(self._gradient_ready) for param in params]

    def _gradient_ready(self, param: torch.Tensor) -> None:
        self._ready.append(param)
        self._ready_bytes += param.grad.numel() * param.grad.element_size()
        if self._ready_bytes >= self.bucket_bytes:
            self._update_ready()

    def _update_ready(self) -> None:
        # Only the ready parameters have gradients (each bucket frees its own after its update), so AdamW's step,
        # which skips parameters without a gradient, updates exactly them.
        if self._ready:
            super().step()
        for param in self._ready:
            param.grad = None
        self._ready, self._ready_bytes = [], 0

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Run `closure` (forward and backward: most updates happen there), then update the parameters still
        waiting in a partly filled bucket; returns the closure's result."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._update_ready()
        return loss

    def remove_hooks(self) -> None:
        """Detach the gradient hooks; gradients then accumulate as usual and this optimizer no longer updates."""
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
