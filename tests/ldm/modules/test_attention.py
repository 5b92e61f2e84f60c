"""CrossAttention backends, GEGLU, the transformer block and the spatial transformer."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from ldm.modules.attention import (
    ATTENTION_BACKENDS,
    GEGLU,
    BasicTransformerBlock,
    CrossAttention,
    FeedForward,
    SpatialTransformer,
    set_attention_backend,
)

BACKENDS = sorted(ATTENTION_BACKENDS)


def _reference_attention(attn: CrossAttention, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """Textbook multi-head attention in float64, head by head."""
    x, context = x.double(), context.double()
    q, k, v = (layer.weight.double() for layer in (attn.to_q, attn.to_k, attn.to_v))
    d_head = q.shape[0] // attn.heads
    heads = []
    for h in range(attn.heads):
        rows = slice(h * d_head, (h + 1) * d_head)
        logits = (x @ q[rows].T) @ (context @ k[rows].T).transpose(1, 2) / math.sqrt(d_head)
        heads.append(logits.softmax(dim=-1) @ (context @ v[rows].T))
    out_layer = attn.to_out[0]
    return (torch.cat(heads, dim=-1) @ out_layer.weight.double().T + out_layer.bias.double()).float()


def test_cross_attention_parameter_names_and_shapes():
    attn = CrossAttention(16, context_dim=24, heads=2, dim_head=8)
    shapes = {key: tuple(value.shape) for key, value in attn.state_dict().items()}
    assert shapes == {
        "to_q.weight": (16, 16),
        "to_k.weight": (16, 24),
        "to_v.weight": (16, 24),
        "to_out.0.weight": (16, 16),
        "to_out.0.bias": (16,),
    }
    assert isinstance(attn.to_out[1], nn.Dropout)
    assert attn.scale == 8**-0.5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_backend_matches_textbook_attention_in_float32(backend, cross):
    torch.manual_seed(0)
    attn = CrossAttention(12, context_dim=10 if cross else None, heads=3, dim_head=5, backend=backend)
    x = torch.randn(2, 7, 12)
    context = torch.randn(2, 6, 10) if cross else None
    expected = _reference_attention(attn, x, context if cross else x)
    assert_close(attn(x, context), expected, rtol=1e-5, atol=1e-6)


def test_backends_agree_on_outputs_and_gradients():
    torch.manual_seed(0)
    attn = CrossAttention(16, context_dim=8, heads=4, dim_head=6)
    x, context = torch.randn(2, 9, 16), torch.randn(2, 5, 8)
    results = {}
    for backend in BACKENDS:
        set_attention_backend(attn, backend)
        attn.zero_grad(set_to_none=True)
        out = attn(x, context)
        out.square().sum().backward()
        results[backend] = (out.detach(), [p.grad.clone() for p in attn.parameters()])
    reference_out, reference_grads = results["math"]
    for out, grads in results.values():
        assert_close(out, reference_out, rtol=1e-5, atol=1e-6)
        for grad, reference_grad in zip(grads, reference_grads, strict=True):
            assert_close(grad, reference_grad, rtol=1e-4, atol=1e-5)


def test_set_attention_backend_switches_every_cross_attention():
    transformer = SpatialTransformer(32, 2, 16, depth=2, context_dim=8)
    attentions = [m for m in transformer.modules() if isinstance(m, CrossAttention)]
    assert {a.backend for a in attentions} == {"sdpa"}
    assert set_attention_backend(transformer, "sliced") == 4
    assert {a.backend for a in attentions} == {"sliced"}


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="flash"):
        CrossAttention(8, backend="flash")
    with pytest.raises(ValueError, match="xformers"):
        set_attention_backend(nn.Sequential(CrossAttention(8)), "xformers")


def test_math_backend_computes_logits_in_float32_under_bf16_autocast():
    # Logits 1024 and 1028 are 1024 and 1024 in bfloat16 (spacing 8 there): softmax gives 0.982 in float32, 0.5 in bf16.
    attn = CrossAttention(4, context_dim=4, heads=1, dim_head=4, backend="math")
    with torch.no_grad():
        attn.to_q.weight.copy_(torch.eye(4))
        attn.to_k.weight.copy_(torch.eye(4))
        attn.to_v.weight.copy_(torch.tensor([0.0, 0.0, -4.0, 4.0]).expand(4, 4))  # v = 0 for key 0, 1 for key 1
        attn.to_out[0].weight.copy_(torch.eye(4))
        attn.to_out[0].bias.zero_()
    x = torch.full((1, 1, 4), 32.0)
    context = torch.tensor([[[16.0, 16.0, 16.0, 16.0], [16.0, 16.0, 16.0, 16.25]]])  # exact in bf16
    float32_weight_of_key_1 = torch.sigmoid(torch.tensor(4.0)).item()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = attn(x, context)
    assert out.dtype == torch.bfloat16
    assert_close(out.float(), torch.full((1, 1, 4), float32_weight_of_key_1), rtol=0, atol=1e-2)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        attn.backend = "sliced"  # no upcast: the logits collapse and the two keys get equal weight
        assert_close(attn(x, context).float(), torch.full((1, 1, 4), 0.5), rtol=0, atol=1e-2)


def test_geglu_first_half_is_value_second_half_is_gate_with_exact_gelu():
    torch.manual_seed(0)
    geglu = GEGLU(3, 4)
    x = torch.randn(5, 3) * 3
    projection = geglu.proj(x)
    value, gate = projection[:, :4], projection[:, 4:]
    expected = value * 0.5 * gate * (1 + torch.erf(gate / math.sqrt(2)))
    assert_close(geglu(x), expected)


def test_feed_forward_keys():
    shapes = {key: tuple(value.shape) for key, value in FeedForward(8, glu=True).state_dict().items()}
    assert shapes == {
        "net.0.proj.weight": (64, 8), "net.0.proj.bias": (64,), "net.2.weight": (8, 32), "net.2.bias": (8,)
    }


def test_transformer_block_registration_order_and_pre_norm_residuals():
    torch.manual_seed(0)
    block = BasicTransformerBlock(16, 2, 8, context_dim=12, checkpoint=False)
    assert [name for name, _ in block.named_children()] == ["attn1", "ff", "attn2", "norm1", "norm2", "norm3"]
    assert block.attn1.to_k.in_features == 16 and block.attn2.to_k.in_features == 12
    x, context = torch.randn(2, 5, 16), torch.randn(2, 3, 12)
    h = block.attn1(block.norm1(x)) + x
    h = block.attn2(block.norm2(h), context) + h
    assert_close(block(x, context), block.ff(block.norm3(h)) + h)


def test_transformer_block_without_self_attention_attends_to_context():
    block = BasicTransformerBlock(16, 2, 8, context_dim=12, disable_self_attn=True)
    assert block.attn1.to_k.in_features == 12
    assert block(torch.randn(1, 5, 16), torch.randn(1, 3, 12)).shape == (1, 5, 16)


@pytest.mark.parametrize("use_linear", [False, True], ids=["conv", "linear"])
def test_spatial_transformer_is_identity_at_init(use_linear):
    transformer = SpatialTransformer(32, 2, 16, context_dim=8, use_linear=use_linear)
    assert transformer.norm.eps == 1e-6
    expected_proj_shape = (32, 32) if use_linear else (32, 32, 1, 1)
    assert tuple(transformer.proj_in.weight.shape) == expected_proj_shape
    assert tuple(transformer.proj_out.weight.shape) == expected_proj_shape
    x = torch.randn(2, 32, 4, 3)
    assert torch.equal(transformer(x, torch.randn(2, 5, 8)), x)


def test_spatial_transformer_conv_and_linear_projections_agree():
    torch.manual_seed(0)
    conv = SpatialTransformer(32, 2, 16, context_dim=8, use_checkpoint=False)
    nn.init.normal_(conv.proj_out.weight, std=0.1)
    linear = SpatialTransformer(32, 2, 16, context_dim=8, use_linear=True, use_checkpoint=False)
    linear.load_state_dict({key: value.squeeze(-1).squeeze(-1) for key, value in conv.state_dict().items()})
    x, context = torch.randn(2, 32, 4, 3), torch.randn(2, 5, 8)
    out = conv(x, context)
    assert not torch.allclose(out, x)
    assert_close(linear(x, context), out, rtol=1e-5, atol=1e-5)


def test_spatial_transformer_shares_an_int_context_dim_across_depth():
    # The original wrapped an int context_dim into a one-element list and raised IndexError for depth > 1.
    transformer = SpatialTransformer(32, 2, 16, depth=2, context_dim=8)
    assert [b.attn2.to_k.in_features for b in transformer.transformer_blocks] == [8, 8]
    assert transformer(torch.randn(1, 32, 2, 2), torch.randn(1, 3, 8)).shape == (1, 32, 2, 2)
    with pytest.raises(ValueError, match="depth"):
        SpatialTransformer(32, 2, 16, depth=2, context_dim=[8])
