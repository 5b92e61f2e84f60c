"""VAE building blocks: layer layout, resampling, attention backends, tiny encoder/decoder round trip."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.diffusionmodules.model import (
    AttnBlock,
    Decoder,
    Downsample,
    Encoder,
    Normalize,
    ResnetBlock,
    Upsample,
    make_attn,
    nonlinearity,
)

# Tiny VAE with attention at the 16x16 level (level 2 of 64 -> 32 -> 16 -> 8), so AttnBlocks run outside the middle too.
TINY_DDCONFIG = dict(
    double_z=True, z_channels=4, resolution=64, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2, 2, 2],
    num_res_blocks=1, attn_resolutions=[16], dropout=0.0,
)


def _randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    """Fill every parameter with O(1/sqrt(fan_in)) noise so no layer is trivially zero or identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            fan_in = max(param[0].numel(), 1) if param.ndim > 1 else 1
            param.copy_(torch.randn(param.shape, generator=generator) / fan_in**0.5)
    return module


def test_normalize_is_groupnorm_eps_1e6() -> None:
    norm = Normalize(64)
    assert isinstance(norm, nn.GroupNorm)
    assert (norm.num_groups, norm.num_channels, norm.eps, norm.affine) == (32, 64, 1e-6, True)


def test_nonlinearity_is_swish() -> None:
    x = torch.linspace(-4, 4, 17)
    torch.testing.assert_close(nonlinearity(x), F.silu(x))


def test_downsample_pads_right_and_bottom_only() -> None:
    down = _randomise(Downsample(4, with_conv=True))
    x = torch.randn(1, 4, 8, 8)
    expected = F.conv2d(F.pad(x, (0, 1, 0, 1)), down.conv.weight, down.conv.bias, stride=2)
    out = down(x)
    assert out.shape == (1, 4, 4, 4)
    torch.testing.assert_close(out, expected)
    # A symmetric padding of 1 would give a different result.
    assert not torch.allclose(out, F.conv2d(x, down.conv.weight, down.conv.bias, stride=2, padding=1))


def test_resample_without_conv() -> None:
    x = torch.randn(1, 2, 4, 4)
    torch.testing.assert_close(Downsample(2, with_conv=False)(x), F.avg_pool2d(x, 2))
    torch.testing.assert_close(Upsample(2, with_conv=False)(x), x.repeat_interleave(2, 2).repeat_interleave(2, 3))
    assert list(dict(Upsample(2, with_conv=True).named_parameters())) == ["conv.weight", "conv.bias"]


def test_resnet_block_layout() -> None:
    keys = lambda m: [k.rsplit(".", 1)[0] for k in m.state_dict() if k.endswith("weight")]  # noqa: E731
    assert keys(ResnetBlock(in_channels=32, out_channels=32, temb_channels=0, dropout=0.0)) == [
        "norm1", "conv1", "norm2", "conv2"
    ]
    assert keys(ResnetBlock(in_channels=32, out_channels=64, temb_channels=16, dropout=0.0)) == [
        "norm1", "conv1", "temb_proj", "norm2", "conv2", "nin_shortcut"
    ]
    block = ResnetBlock(in_channels=32, out_channels=64, conv_shortcut=True, temb_channels=0, dropout=0.0)
    assert block.conv_shortcut.kernel_size == (3, 3)


def test_resnet_block_forward_matches_formula() -> None:
    block = _randomise(ResnetBlock(in_channels=32, out_channels=64, temb_channels=8, dropout=0.0))
    x, temb = torch.randn(2, 32, 4, 4), torch.randn(2, 8)
    h = block.conv1(F.silu(block.norm1(x))) + block.temb_proj(F.silu(temb))[:, :, None, None]
    h = block.conv2(F.silu(block.norm2(h)))
    torch.testing.assert_close(block(x, temb), block.nin_shortcut(x) + h)


def _reference_attention(block: AttnBlock, x: torch.Tensor) -> torch.Tensor:
    """The original's AttnBlock: w = softmax(q^T k / sqrt(c)) over keys, h = v w^T."""
    b, c, height, width = x.shape
    h = block.norm(x)
    q = block.q(h).reshape(b, c, -1).permute(0, 2, 1)
    k = block.k(h).reshape(b, c, -1)
    weights = torch.softmax(torch.bmm(q, k) * c**-0.5, dim=2)
    v = block.v(h).reshape(b, c, -1)
    out = torch.bmm(v, weights.permute(0, 2, 1)).reshape(b, c, height, width)
    return x + block.proj_out(out)


@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_attn_block_matches_reference(backend: str) -> None:
    block = _randomise(AttnBlock(32, backend=backend))
    x = torch.randn(2, 32, 6, 5)
    torch.testing.assert_close(block(x), _reference_attention(block, x), rtol=1e-5, atol=1e-5)


def test_attn_block_rejects_unknown_backend() -> None:
    with pytest.raises(ValueError, match="backend"):
        AttnBlock(32, backend="flash")


def test_make_attn_types() -> None:
    assert isinstance(make_attn(32, "vanilla"), AttnBlock)
    assert isinstance(make_attn(32, "vanilla-xformers"), AttnBlock)
    assert make_attn(32, "vanilla", attn_backend="math").backend == "math"
    assert isinstance(make_attn(32, "none"), nn.Identity)
    with pytest.raises(ValueError, match="linear"):
        make_attn(32, "linear")
    assert list(make_attn(32).state_dict()) == [
        f"{name}.{kind}" for name in ("norm", "q", "k", "v", "proj_out") for kind in ("weight", "bias")
    ]


def test_linear_attention_is_rejected() -> None:
    with pytest.raises(ValueError, match="use_linear_attn"):
        Encoder(**TINY_DDCONFIG, use_linear_attn=True)


def test_tiny_encoder_decoder_shapes_and_attention_keys() -> None:
    torch.manual_seed(0)
    encoder, decoder = Encoder(**TINY_DDCONFIG), Decoder(**TINY_DDCONFIG)
    encoder_keys, decoder_keys = set(encoder.state_dict()), set(decoder.state_dict())
    assert "down.2.attn.0.q.weight" in encoder_keys and "down.1.attn.0.q.weight" not in encoder_keys
    assert {"up.2.attn.0.q.weight", "up.2.attn.1.q.weight"} <= decoder_keys
    assert "down.3.downsample.conv.weight" not in encoder_keys and "up.0.upsample.conv.weight" not in decoder_keys
    assert decoder.z_shape == (1, 4, 8, 8)

    moments = encoder(torch.randn(2, 3, 64, 64))
    assert moments.shape == (2, 8, 8, 8)
    image = decoder(torch.randn(2, 4, 8, 8))
    assert image.shape == (2, 3, 64, 64)
    pre_end = Decoder(**TINY_DDCONFIG, give_pre_end=True)(torch.randn(1, 4, 8, 8))
    assert pre_end.shape == (1, 32, 64, 64)
    assert Decoder(**TINY_DDCONFIG, tanh_out=True)(torch.randn(1, 4, 8, 8)).abs().max() <= 1.0


def test_sdpa_and_math_backends_agree_in_tiny_vae() -> None:
    encoder_math = _randomise(Encoder(**TINY_DDCONFIG, attn_backend="math"), seed=1)
    decoder_math = _randomise(Decoder(**TINY_DDCONFIG, attn_backend="math"), seed=2)
    encoder_sdpa, decoder_sdpa = Encoder(**TINY_DDCONFIG), Decoder(**TINY_DDCONFIG)
    encoder_sdpa.load_state_dict(encoder_math.state_dict())
    decoder_sdpa.load_state_dict(decoder_math.state_dict())
    assert encoder_sdpa.mid.attn_1.backend == "sdpa" and encoder_sdpa.down[2].attn[0].backend == "sdpa"

    x, z = torch.randn(1, 3, 64, 64), torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(encoder_sdpa(x), encoder_math(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(decoder_sdpa(z), decoder_math(z), rtol=1e-5, atol=1e-5)
