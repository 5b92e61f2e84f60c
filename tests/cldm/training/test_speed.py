"""Each speed and memory option gives the loss and ControlNet gradients of eager float32 training, on the tiny
config."""
from __future__ import annotations

import contextlib
import copy

import pytest
import torch

from cldm.training import speed
from cldm.training.speed import (
    compile_model,
    recompute_weight_casts_in,
    recomputed_weight_casts,
    store_frozen_weights_in,
    trainable_networks,
    use_channels_last,
)
from ldm.modules.attention import set_attention_backend
from ldm.modules.diffusionmodules.openaimodel import set_gradient_checkpointing
from ldm.modules.diffusionmodules.util import GroupNorm32
from tests.helpers.random_weights import model_without_zero_layers
from tests.helpers.paths import TINY_CONFIG


# bf16 keeps 8 mantissa bits (relative rounding 2^-9 = 0.2 %); after a few dozen layers the loss moves by well
# under 1 %, and the ControlNet gradients keep their direction.
BF16_LOSS_RTOL = 1e-2
BF16_GRAD_COSINE = 0.99


@pytest.fixture(scope="module")
def tiny_model():
    """Tiny ControlLDM whose zero-initialised layers got small random weights, so every gradient is non-zero."""
    model = model_without_zero_layers(TINY_CONFIG)
    set_gradient_checkpointing(model, False)
    return model.train()


@pytest.fixture(scope="module")
def batch():
    generator = torch.Generator().manual_seed(1)
    return {
        "jpg": torch.rand(2, 64, 64, 3, generator=generator) * 2 - 1,
        "hint": torch.rand(2, 64, 64, 3, generator=generator),
        "txt": ["a red circle on a blue background", "a cat"],
        "t": torch.tensor([10, 900]),
        "noise": torch.randn(2, 4, 8, 8, generator=generator),
    }


def loss_and_grads(model, batch, autocast_dtype=None):
    """Training loss (VAE and text encoding included) at fixed t and noise, and the ControlNet's gradients."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(2)  # the VAE posterior sample
    with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
        x, cond = model.get_input(batch, model.first_stage_key)
        loss, _ = model.p_losses(x, cond, batch["t"], noise=batch["noise"])
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.control_model.parameters()]


def assert_same_training(actual, expected, rtol=1e-5, atol=1e-5):
    (loss, grads), (expected_loss, expected_grads) = actual, expected
    torch.testing.assert_close(loss, expected_loss, rtol=rtol, atol=atol)
    for grad, expected_grad in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def reference(tiny_model, batch):
    """Eager float32, SDPA, no checkpointing: the numbers every speed path must reproduce."""
    return loss_and_grads(tiny_model, batch)


def test_reference_gradients_reach_every_controlnet_parameter(reference):
    _, grads = reference
    assert all(grad.abs().sum() > 0 for grad in grads)


def test_math_attention_matches_sdpa(tiny_model, batch, reference):
    model = copy.deepcopy(tiny_model)
    assert set_attention_backend(model, "math") > 0
    assert_same_training(loss_and_grads(model, batch), reference)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_model, batch, reference):
    model = copy.deepcopy(tiny_model)
    set_gradient_checkpointing(model, True)
    assert_same_training(loss_and_grads(model, batch), reference)


def test_channels_last_gives_the_same_loss_and_gradients(tiny_model, batch, reference):
    model = use_channels_last(copy.deepcopy(tiny_model))
    conv = model.control_model.input_blocks[0][0]
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert_same_training(loss_and_grads(model, batch), reference)


@pytest.mark.slow
def test_compile_gives_the_same_loss_and_gradients(tiny_model, batch, reference):
    """Dynamo capture and AOTAutograd's joint forward/backward graphs of UNet and ControlNet.

    The `aot_eager` backend runs the captured graphs without Inductor's C++ code generation, which takes about
    six minutes for the tiny model on a 2-core CPU; the benchmark's `--compile` rows exercise Inductor.
    """
    model = copy.deepcopy(tiny_model)
    keys = list(model.state_dict())
    try:
        compile_model(model, backend="aot_eager")
        result = loss_and_grads(model, batch)
    except torch._dynamo.exc.BackendCompilerFailed as error:  # pragma: no cover - depends on the toolchain
        pytest.skip(f"torch.compile does not work on this machine: {error}")
    assert list(model.state_dict()) == keys
    assert_same_training(result, reference)


def test_frozen_bf16_storage_under_autocast_is_close_to_float32(tiny_model, batch, reference):
    model = copy.deepcopy(tiny_model)
    stored = store_frozen_weights_in(model, torch.bfloat16)
    loss, grads = loss_and_grads(model, batch, autocast_dtype=torch.bfloat16)

    expected_loss, expected_grads = reference
    torch.testing.assert_close(loss, expected_loss, rtol=BF16_LOSS_RTOL, atol=0.0)
    flat, expected_flat = torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in expected_grads])
    assert torch.nn.functional.cosine_similarity(flat, expected_flat, dim=0) > BF16_GRAD_COSINE
    frozen = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("control_model."))
    assert 0.9 * frozen < stored < frozen  # all but the normalisation layers


def test_frozen_bf16_storage_keeps_trainable_and_normalisation_weights_float32(tiny_model):
    model = copy.deepcopy(tiny_model)
    model.sd_locked = False  # the UNet decoder trains too
    store_frozen_weights_in(model, torch.bfloat16)
    unet = model.model.diffusion_model
    assert {p.dtype for p in model.control_model.parameters()} == {torch.float32}
    assert {p.dtype for p in unet.output_blocks.parameters()} == {torch.float32}
    assert unet.input_blocks[0][0].weight.dtype == torch.bfloat16
    assert model.first_stage_model.encoder.conv_in.weight.dtype == torch.bfloat16
    assert model.cond_stage_model.transformer.text_model.embeddings.token_embedding.weight.dtype == torch.bfloat16
    norms = [m for m in unet.input_blocks.modules() if isinstance(m, GroupNorm32)]
    assert norms and all(norm.weight.dtype == torch.float32 for norm in norms)


def test_store_frozen_weights_rejects_integer_dtypes(tiny_model):
    with pytest.raises(ValueError, match="frozen weights"):
        store_frozen_weights_in(copy.deepcopy(tiny_model), torch.int8)


def test_hint_encoder_and_zero_convs_stay_float32_under_autocast(tiny_model, batch):
    control = tiny_model.control_model
    taps = [control.input_hint_block, *control.zero_convs, control.middle_block_out]
    seen = []
    handles = [tap.register_forward_hook(lambda layer, args, out: seen.append((layer, args[0], out))) for tap in taps]
    x, hint = batch["noise"], batch["hint"].permute(0, 3, 1, 2)
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            context = tiny_model.get_learned_conditioning(batch["txt"])
            residuals = control(x=x, hint=hint, timesteps=batch["t"], context=context)
    finally:
        for handle in handles:
            handle.remove()
    assert [layer for layer, _, _ in seen] == taps
    assert all(residual.dtype == torch.float32 for residual in residuals)
    with torch.no_grad():
        for layer, layer_input, output in seen:
            assert layer_input.dtype == output.dtype == torch.float32
            torch.testing.assert_close(output, layer(layer_input, None, None), rtol=0.0, atol=0.0)


def test_noise_is_the_same_for_channels_last_latents(tiny_model):
    latents = torch.randn(2, 4, 8, 8)
    noisy = []
    for x_start in (latents, latents.to(memory_format=torch.channels_last)):
        torch.manual_seed(5)
        noisy.append(tiny_model.q_sample(x_start, torch.tensor([10, 900])))
    torch.testing.assert_close(noisy[0], noisy[1], rtol=0.0, atol=0.0)


def test_the_unet_decoder_cannot_be_unlocked_once_stored_in_half_precision(tiny_model):
    model = copy.deepcopy(tiny_model)
    model.sd_locked = True
    store_frozen_weights_in(model, torch.bfloat16)
    with pytest.raises(ValueError, match="cannot unlock the UNet decoder.*bfloat16"):
        model.sd_locked = False
    assert model.sd_locked and not any(p.requires_grad for p in model.model.diffusion_model.parameters())


def _controlnet_gradients(tiny_model, batch, hooks):
    """ControlNet gradients of a bf16-autocast forward through the ControlNet alone, under `hooks`."""
    control = tiny_model.control_model
    control.zero_grad(set_to_none=True)
    with torch.no_grad():
        context = tiny_model.get_learned_conditioning(batch["txt"])
    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False), hooks:
        residuals = control(x=batch["noise"], hint=batch["hint"].permute(0, 3, 1, 2), timesteps=batch["t"],
                            context=context)
    sum(residual.float().square().mean() for residual in residuals).backward()
    return {name: p.grad.clone() for name, p in control.named_parameters()}


def test_recomputed_weight_casts_give_the_same_gradients(tiny_model, batch):
    kept = _controlnet_gradients(tiny_model, batch, contextlib.nullcontext())
    recomputed = _controlnet_gradients(tiny_model, batch, recomputed_weight_casts())
    assert kept.keys() == recomputed.keys()
    for name, grad in recomputed.items():
        torch.testing.assert_close(grad, kept[name], rtol=0.0, atol=0.0, msg=name)


@pytest.mark.parametrize("layer, shape", [
    (torch.nn.Conv2d(8, 16, 3, padding=1), (2, 8, 5, 5)),
    (torch.nn.Linear(8, 16), (2, 8)),  # addmm keeps weight.t()
    (torch.nn.Linear(8, 16), (2, 3, 8)),  # matmul on a 3-D input
])
def test_weight_casts_are_recomputed_from_the_float32_weight(layer, shape):
    """Backward recasts the weight instead of using a kept copy: a weight changed after forward is caught."""
    x = torch.randn(shape, requires_grad=True)  # the input's gradient is what needs the weight
    for hooks, recomputed in ((contextlib.nullcontext(), False), (recomputed_weight_casts(), True)):
        layer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False), hooks:
            out = layer(x)
        assert out.dtype == torch.bfloat16
        with torch.no_grad():
            layer.weight.add_(1.0)
        if recomputed:
            with pytest.raises(RuntimeError, match="changed between the forward pass and its use in backward"):
                out.float().sum().backward()
        else:
            out.float().sum().backward()  # the kept bf16 copy does not see the change
            assert layer.weight.grad is not None


def test_installed_hooks_recast_every_trainable_weight_in_backward(tiny_model, batch, monkeypatch):
    """Under autocast, the weight casts of the ControlNet, and of the UNet decoder when it trains, are recomputed in
    backward (a weight changed after forward is caught); the locked UNet's saved tensors skip the hooks."""
    packed, original_pack = [], speed._pack_weight_cast

    def counting_pack(tensor: torch.Tensor):
        packed.append(tensor.shape)
        return original_pack(tensor)

    monkeypatch.setattr(speed, "_pack_weight_cast", counting_pack)
    hooked_tensors = {}
    for sd_locked in (True, False):
        model = copy.deepcopy(tiny_model)
        model.sd_locked = sd_locked
        recompute_weight_casts_in(trainable_networks(model))
        weights = {"ControlNet": model.control_model.input_blocks[0][0].weight,
                   "UNet decoder": model.model.diffusion_model.out[-1].weight}
        with torch.no_grad():
            context = model.get_learned_conditioning(batch["txt"])
        cond = {"c_crossattn": [context], "c_concat": [batch["hint"].permute(0, 3, 1, 2)]}
        for name, weight in weights.items():
            packed.clear()
            with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
                out = model.apply_model(batch["noise"], batch["t"], cond)
            hooked_tensors[sd_locked] = len(packed)
            with torch.no_grad():
                weight.add_(1.0)
            assert weight.requires_grad == (name == "ControlNet" or not sd_locked)
            if weight.requires_grad:
                with pytest.raises(RuntimeError, match="changed between the forward pass and its use in backward"):
                    out.float().sum().backward()
            else:
                out.float().sum().backward()  # a frozen weight has no cast to recompute
    assert 0 < hooked_tensors[True] < hooked_tensors[False] / 2  # the locked UNet's tensors skip the hooks


def test_weight_cast_hooks_stay_out_of_float32_and_no_grad_passes(tiny_model, batch, monkeypatch):
    """The installed hooks pack nothing without autocast or without autograd, and are gone once removed."""
    packed = []
    monkeypatch.setattr(speed, "_pack_weight_cast", lambda tensor: packed.append(tensor) or tensor)
    model = copy.deepcopy(tiny_model)
    handles = recompute_weight_casts_in([model.control_model])
    hint = batch["hint"].permute(0, 3, 1, 2)
    context = torch.zeros(2, 77, 32)
    model.control_model(x=batch["noise"], hint=hint, timesteps=batch["t"], context=context)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model.control_model(x=batch["noise"], hint=hint, timesteps=batch["t"], context=context)
    assert packed == []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.control_model(x=batch["noise"], hint=hint, timesteps=batch["t"], context=context)
    assert packed
    for handle in handles:
        handle.remove()
    packed.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.control_model(x=batch["noise"], hint=hint, timesteps=batch["t"], context=context)
    assert packed == []
