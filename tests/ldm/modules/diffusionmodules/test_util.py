"""Gradient checkpointing: on the CPU attention kernel outputs are kept, everything else is recomputed."""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

from ldm.modules.diffusionmodules import util
from ldm.modules.diffusionmodules.util import ATTENTION_KERNELS, checkpoint


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append(func)
        return func(*args, **(kwargs or {}))


def _attention_layer(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    q, k, v = (x @ weight).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)  # 3 x (B, heads, T, C)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


def _inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens (B, T, C) and a trainable q|k|v projection for _attention_layer."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 32, generator=generator)
    return x, torch.randn(32, 48, generator=generator, requires_grad=True)


def test_checkpoint_keeps_attention_outputs_and_recomputes_the_rest():
    x, weight = _inputs(seed=0)
    results = {}
    for flag in (True, False):
        weight.grad = None
        with _OpCounter() as counter:
            out = checkpoint(_attention_layer, (x, weight), [weight], flag)
            out.square().sum().backward()
        attention = [op for op in counter.calls if op in ATTENTION_KERNELS]
        projections = [op for op in counter.calls if op.name() in ("aten::mm", "aten::bmm")]
        results[flag] = out.detach(), weight.grad.clone(), len(attention), len(projections)
    out, grad, attention_calls, projection_calls = results[True]
    assert attention_calls == results[False][2] == 1, "the fused attention kernel runs once, also when checkpointed"
    assert projection_calls > results[False][3], "the rest of the function is recomputed in backward"
    assert_close(out, results[False][0], rtol=0, atol=0)
    assert_close(grad, results[False][1], rtol=0, atol=0)


def test_checkpoint_under_saved_tensor_hooks_gives_the_same_gradients_without_warnings():
    x, weight = _inputs(seed=1)
    checkpoint(_attention_layer, (x, weight), [weight], False).square().sum().backward()
    expected, weight.grad = weight.grad, None
    packed = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
            out = checkpoint(_attention_layer, (x, weight), [weight], True)
        out.square().sum().backward()
    assert packed, "tensors saved for backward pass through the surrounding hooks"
    assert_close(weight.grad, expected, rtol=0, atol=0)


def test_the_attention_policy_is_used_on_the_cpu_and_plain_checkpointing_elsewhere(monkeypatch):
    options_used = []

    def recording_checkpoint(func, *inputs, **options):
        options_used.append(options)
        return func(*inputs)

    monkeypatch.setattr(util, "_torch_checkpoint", recording_checkpoint)
    for device in ("cpu", "meta"):  # meta stands in for a GPU: any device but the CPU
        checkpoint(torch.sin, (torch.ones(2, device=device, requires_grad=True),), [], True)
    on_cpu, elsewhere = options_used
    assert on_cpu["use_reentrant"] is False and "context_fn" in on_cpu
    assert elsewhere == {"use_reentrant": False}
