"""make_optimizer and AdamWInBackward make plain AdamW's updates."""
from __future__ import annotations

import copy

import pytest
import torch

from cldm.training.optimizers import DEFAULT_BUCKET_BYTES, AdamWInBackward, build_adamw, make_optimizer


def _params_with_grads(seed: int) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in [(64, 32), (32,), (3, 3, 8, 8)]]
    for param in params:
        param.grad = torch.randn(param.shape, generator=generator)
    return params


def test_fused_adamw_makes_the_same_update_as_the_default_implementation():
    fused, plain = _params_with_grads(0), _params_with_grads(0)
    fused_optimizer = make_optimizer(fused, lr=1e-3, fused=True)
    plain_optimizer = make_optimizer(plain, lr=1e-3, fused=False)
    assert fused_optimizer.defaults["fused"] and not plain_optimizer.defaults["fused"]
    for _ in range(3):
        fused_optimizer.step()
        plain_optimizer.step()
    for a, b in zip(fused, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=0.0, atol=1e-6)


def test_make_optimizer_fuses_by_default_where_supported():
    assert make_optimizer(_params_with_grads(0), lr=1e-5).defaults["fused"]
    with pytest.raises(ValueError, match="fused AdamW"):
        make_optimizer([torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))], lr=1e-5, fused=True)
    with pytest.raises(ValueError, match="no parameters"):
        make_optimizer([], lr=1e-5)


def _two_layer_loss(first: torch.nn.Linear, second: torch.nn.Linear, inputs: torch.Tensor) -> torch.Tensor:
    return second(torch.tanh(first(inputs))).square().mean()


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("bucket_bytes", [0, DEFAULT_BUCKET_BYTES])  # a bucket per gradient; one bucket for all
def test_adamw_in_backward_makes_adamws_updates_and_frees_the_gradients(fused, bucket_bytes):
    torch.manual_seed(3)
    layers = [torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)]
    reference = copy.deepcopy(layers)
    inputs = torch.randn(5, 8)
    params = [p for layer in layers for p in layer.parameters()]
    in_backward = AdamWInBackward(params, lr=1e-2, fused=fused, bucket_bytes=bucket_bytes)
    adamw = make_optimizer([p for layer in reference for p in layer.parameters()], lr=1e-2, fused=fused)
    for _ in range(3):
        in_backward.zero_grad()
        in_backward.step(lambda: _two_layer_loss(*layers, inputs).backward())
        adamw.zero_grad()
        adamw.step(lambda: _two_layer_loss(*reference, inputs).backward())
        assert all(p.grad is None for p in params)
    for actual, expected in zip(layers, reference, strict=True):
        torch.testing.assert_close(actual.state_dict(), expected.state_dict(), rtol=0.0, atol=1e-6)
    # The same state as AdamW's: checkpoints resume with either optimizer.
    adamw.load_state_dict(in_backward.state_dict())


def test_adamw_in_backward_updates_during_backward_bucket_by_bucket():
    layers = [torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)]
    params = [p for layer in layers for p in layer.parameters()]
    largest = max(p.numel() * p.element_size() for p in params)
    in_backward = AdamWInBackward(params, lr=1e-2, bucket_bytes=largest)
    grads_alive = []
    for param in params:  # registered after the optimizer's hooks: sees what is left once they ran
        param.register_post_accumulate_grad_hook(lambda _: grads_alive.append(sum(p.grad is not None for p in params)))
    before = [p.detach().clone() for p in params]
    _two_layer_loss(*layers, torch.randn(5, 8)).backward()  # no step(): the updates happen here
    assert max(grads_alive) < len(params)
    assert sum(not torch.equal(p, b) for p, b in zip(params, before, strict=True)) >= 1
    in_backward.step()  # the partly filled last bucket
    assert all(p.grad is None for p in params)
    assert all(not torch.equal(p, b) for p, b in zip(params, before, strict=True))
    in_backward.remove_hooks()
    _two_layer_loss(*layers, torch.randn(5, 8)).backward()
    assert all(p.grad is not None for p in params)


def test_adamw_in_backward_needs_parameters_that_require_grad():
    with pytest.raises(ValueError, match="require grad"):
        AdamWInBackward([torch.nn.Parameter(torch.zeros(2), requires_grad=False)], lr=1e-5)
    with pytest.raises(ValueError, match="require grad"):
        AdamWInBackward([], lr=1e-5)


def test_build_adamw_chooses_the_optimizer_the_job_asks_for():
    params = _params_with_grads(0)
    assert type(build_adamw(params, lr=1e-3)) is torch.optim.AdamW
    in_backward = build_adamw(params, lr=1e-3, in_backward=True)
    assert isinstance(in_backward, AdamWInBackward)
    in_backward.remove_hooks()

