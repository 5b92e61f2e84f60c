"""The optimizers of the training job: AdamW as one fused kernel when possible, and AdamW updating during backward.

Both make the update of `torch.optim.AdamW` with PyTorch's default hyper-parameters (the original's).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

# Gradients gathered before AdamWInBackward updates them in one call (one fused call per parameter is slow on CPUs).
DEFAULT_BUCKET_BYTES = 64 * 2**20
# Device types with a fused AdamW kernel in PyTorch >= 2.4.
FUSED_ADAMW_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps")

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
    exist at once. The update, the state and
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


def build_adamw(params: Iterable[nn.Parameter], lr: float, fused: bool | None = None,
                in_backward: bool = False) -> torch.optim.Optimizer:
    """`AdamWInBackward` when `in_backward`, else `make_optimizer`: the training job gives ControlLDM
    `functools.partial(build_adamw, fused=..., in_backward=...)` as its `optimizer_factory`."""
    if in_backward:
        return AdamWInBackward(params, lr=lr, fused=fused)
    return make_optimizer(params, lr=lr, fused=fused)
