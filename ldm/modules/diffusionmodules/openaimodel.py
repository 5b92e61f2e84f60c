"""The Stable Diffusion UNet: timestep-conditioned residual blocks, attention sites, and the shared encoder builder."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.attention import BasicTransformerBlock, SpatialTransformer
from ldm.modules.diffusionmodules.util import (
    avg_pool_nd,
    checkpoint,
    conv_nd,
    linear,
    normalization,
    timestep_embedding,
    zero_module,
)

# ---------------------------------------------------------------------------------------------
# Timestep-conditioned containers
# ---------------------------------------------------------------------------------------------


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that hands `emb` to TimestepBlocks and `context` to SpatialTransformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling (spatial dims only for 3-D), optionally followed by a 3x3 conv."""

    def __init__(
        self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None, padding: int = 1
    ) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, channels, self.out_channels, 3, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1] == self.channels
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """2x downsampling (spatial dims only for 3-D) by a strided 3x3 conv or average pooling, stored as `op`."""

    def __init__(
        self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None, padding: int = 1
    ) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(dims, channels, self.out_channels, 3, stride=stride, padding=padding)
        elif channels == self.out_channels:
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)
        else:
            raise ValueError(f"Downsample without conv cannot change channels ({channels} -> {out_channels})")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[1] == self.channels
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding (added, or as scale/shift of the second norm).

    Args:
        channels, out_channels: input and output channels (`out_channels` defaults to `channels`).
        emb_channels: width of the timestep embedding.
        use_conv: 3x3 instead of 1x1 conv on the skip path when the channel count changes.
        use_scale_shift_norm: FiLM-style conditioning `norm(h) * (1 + scale) + shift`.
        use_checkpoint: recompute activations in backward to save memory.
        up, down: resample both paths by 2 (the `resblock_updown` variant).
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        dims: int = 2,
        use_checkpoint: bool = False,
        up: bool = False,
        down: bool = False,
    ) -> None:
        super().__init__()
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.use_checkpoint = use_checkpoint
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), conv_nd(dims, channels, self.out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False, dims), Upsample(channels, False, dims)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False, dims), Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        emb_out_channels = 2 * self.out_channels if use_scale_shift_norm else self.out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), linear(emb_channels, emb_out_channels))
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            kernel_size, padding = (3, 1) if use_conv else (1, 0)
            self.skip_connection = conv_nd(dims, channels, self.out_channels, kernel_size, padding=padding)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # The last conv and the skip path run outside the checkpoint: recomputing them in backward would only
        # reproduce the block's output, which nothing inside the block needs. The price is keeping the last
        # conv's input, one activation per block.
        h = checkpoint(self._forward, (x, emb), self.parameters(), self.use_checkpoint)
        return self.skip_connection(self.x_upd(x)) + self.out_layers[-1](h)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """The block's residual branch up to its last conv: norm, SiLU, conv, timestep, norm, SiLU, dropout."""
        # 1. input layers, resampling between the activation and the conv in the up/down variant
        if self.updown:
            h = self.in_layers[-1](self.h_upd(self.in_layers[:-1](x)))
        else:
            h = self.in_layers(x)  # (B, C_out, H, W)
        # 2. timestep conditioning, broadcast over the spatial dims
        emb_out = self.emb_layers(emb).type(h.dtype)
        emb_out = emb_out.reshape(*emb_out.shape, *([1] * (h.ndim - emb_out.ndim)))  # (B, C_out, 1, 1)
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            return self.out_layers[1:-1](self.out_layers[0](h) * (1 + scale) + shift)
        return self.out_layers[:-1](h + emb_out)


class QKVAttention(nn.Module):
    """Dot-product attention over a packed (B, 3*H*C, T) qkv tensor, split as q|k|v first, then heads."""

    def __init__(self, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads

    def split_heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, 3*H*C, T) -> three (B*H, C, T) tensors."""
        batch, width, length = qkv.shape
        channels = width // (3 * self.n_heads)
        return tuple(t.reshape(batch * self.n_heads, channels, length) for t in qkv.chunk(3, dim=1))

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        batch, width, length = qkv.shape
        assert width % (3 * self.n_heads) == 0
        q, k, v = self.split_heads(qkv)  # (B*H, C, T)
        scale = 1 / math.sqrt(math.sqrt(q.shape[1]))  # applied to q and k, more stable than scaling after
        weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        return torch.einsum("bts,bcs->bct", weight, v).reshape(batch, -1, length)


class QKVAttentionLegacy(QKVAttention):
    """QKVAttention with the legacy packing: heads first, then q|k|v within each head."""

    def split_heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, width, length = qkv.shape
        channels = width // (3 * self.n_heads)
        return qkv.reshape(batch * self.n_heads, channels * 3, length).split(channels, dim=1)


class AttentionBlock(nn.Module):
    """Legacy self-attention over all spatial positions (used when `use_spatial_transformer` is off)."""

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_checkpoint: bool = False,
        use_new_attention_order: bool = False,
    ) -> None:
        super().__init__()
        if num_head_channels != -1 and channels % num_head_channels:
            raise ValueError(f"channels {channels} are not divisible by num_head_channels {num_head_channels}")
        self.num_heads = num_heads if num_head_channels == -1 else channels // num_head_channels
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        self.attention = (QKVAttention if use_new_attention_order else QKVAttentionLegacy)(self.num_heads)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, (x,), self.parameters(), self.use_checkpoint)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, *spatial = x.shape
        x = x.reshape(batch, channels, -1)  # (B, C, T)
        h = self.proj_out(self.attention(self.qkv(self.norm(x))))
        return (x + h).reshape(batch, channels, *spatial)


# ---------------------------------------------------------------------------------------------
# Architecture settings and the encoder builder shared by UNetModel and ControlNet
# ---------------------------------------------------------------------------------------------


def _as_list(value):
    """omegaconf ListConfig / tuple -> list; anything else unchanged."""
    return list(value) if isinstance(value, Sequence) and not isinstance(value, str) else value


@dataclass
class UNetConfig:
    """The constructor arguments UNetModel and ControlNet share (the `params:` of a yaml's `unet_config` and
    `control_stage_config`), validated: they shape the encoder, the middle block and the decoder.

    `image_size` is kept for config compatibility and unused; `use_fp16` runs the blocks in float16; `n_embed`
    gives the UNet a codebook head (ControlNet accepts and ignores it).
    """

    in_channels: int
    model_channels: int
    num_res_blocks: int | list[int]
    attention_resolutions: Sequence[int]
    dropout: float = 0.0
    channel_mult: Sequence[int] = (1, 2, 4, 8)
    conv_resample: bool = True
    dims: int = 2
    use_checkpoint: bool = False
    num_heads: int = -1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    use_spatial_transformer: bool = False
    transformer_depth: int = 1
    context_dim: int | list[int] | None = None
    legacy: bool = True
    disable_self_attentions: list[bool] | None = None
    num_attention_blocks: list[int] | None = None
    disable_middle_self_attn: bool = False
    use_linear_in_transformer: bool = False
    attn_backend: str = "sdpa"
    image_size: int | None = None
    use_fp16: bool = False
    n_embed: int | None = None

    def __post_init__(self) -> None:
        self.channel_mult = tuple(self.channel_mult)
        self.attention_resolutions = tuple(self.attention_resolutions)
        self.context_dim = _as_list(self.context_dim)
        self.disable_self_attentions = _as_list(self.disable_self_attentions)
        self.num_attention_blocks = _as_list(self.num_attention_blocks)
        if isinstance(self.num_res_blocks, int):
            self.num_res_blocks = [self.num_res_blocks] * len(self.channel_mult)
        self.num_res_blocks = list(self.num_res_blocks)
        if self.num_heads_upsample == -1:
            self.num_heads_upsample = self.num_heads
        self._validate()

    def _validate(self) -> None:
        levels = len(self.channel_mult)
        if self.use_spatial_transformer and self.context_dim is None:
            raise ValueError("use_spatial_transformer=True needs context_dim (the cross-attention context width)")
        if self.context_dim is not None and not self.use_spatial_transformer:
            raise ValueError(f"context_dim={self.context_dim} needs use_spatial_transformer=True to be used")
        if self.num_heads == -1 and self.num_head_channels == -1:
            raise ValueError("num_heads and num_head_channels are both -1; set a head count or a head width")
        if len(self.num_res_blocks) != levels:
            raise ValueError(
                f"num_res_blocks {self.num_res_blocks} must be an int or one entry per channel_mult level ({levels})"
            )
        if self.disable_self_attentions is not None and len(self.disable_self_attentions) != levels:
            raise ValueError(f"disable_self_attentions needs one flag per channel_mult level ({levels})")
        if self.num_attention_blocks is not None and (
            len(self.num_attention_blocks) != levels
            or any(n_attn > n_res for n_attn, n_res in zip(self.num_attention_blocks, self.num_res_blocks, strict=True))
        ):
            raise ValueError(
                f"num_attention_blocks {self.num_attention_blocks} needs one entry per level, "
                f"each at most num_res_blocks {self.num_res_blocks}"
            )

    @property
    def time_embed_dim(self) -> int:
        """Width of the timestep embedding (4x the base width)."""
        return self.model_channels * 4

    def attention_heads(self, channels: int) -> tuple[int, int]:
        """(num_heads, dim_head) at an attention site with `channels` channels, exactly as the original."""
        # The original overwrote `num_heads` in place and carried it on to later sites; every site recomputes
        # it before use whenever it was overwritten, so this pure function gives the same heads everywhere.
        num_heads = self.num_heads
        if self.num_head_channels == -1:
            dim_head = channels // num_heads
        else:
            num_heads = channels // self.num_head_channels
            dim_head = self.num_head_channels
        if self.legacy:
            dim_head = channels // num_heads if self.use_spatial_transformer else self.num_head_channels
        return num_heads, dim_head

    def res_block(self, channels: int, out_channels: int, up: bool = False, down: bool = False) -> ResBlock:
        """A ResBlock with the shared settings."""
        return ResBlock(
            channels, self.time_embed_dim, self.dropout, out_channels=out_channels, dims=self.dims,
            use_checkpoint=self.use_checkpoint, use_scale_shift_norm=self.use_scale_shift_norm, up=up, down=down,
        )

    def attention_block(self, channels: int, disable_self_attn: bool = False, decoder: bool = False) -> nn.Module:
        """The attention layer of one site: SpatialTransformer, or the legacy AttentionBlock."""
        num_heads, dim_head = self.attention_heads(channels)
        if not self.use_spatial_transformer:
            return AttentionBlock(
                channels, num_heads=self.num_heads_upsample if decoder else num_heads, num_head_channels=dim_head,
                use_checkpoint=self.use_checkpoint, use_new_attention_order=self.use_new_attention_order,
            )
        # As in the original, the UNet's `dropout` applies to ResBlocks only, not to the transformers.
        return SpatialTransformer(
            channels, num_heads, dim_head, depth=self.transformer_depth, context_dim=self.context_dim,
            disable_self_attn=disable_self_attn, use_linear=self.use_linear_in_transformer,
            use_checkpoint=self.use_checkpoint, attn_backend=self.attn_backend,
        )

    def has_attention(self, level: int, ds: int, index: int) -> bool:
        """Whether the `index`-th block of `level` (downsampling factor `ds`) gets an attention layer."""
        return ds in self.attention_resolutions and (
            self.num_attention_blocks is None or index < self.num_attention_blocks[level]
        )

    def self_attention_disabled(self, level: int) -> bool:
        """Whether the transformers of `level` attend to the context in place of self-attention."""
        return bool(self.disable_self_attentions[level]) if self.disable_self_attentions is not None else False


class UNetEncoder(NamedTuple):
    """The encoder half of a UNet: what UNetModel and ControlNet share module for module."""

    time_embed: nn.Sequential
    input_blocks: nn.ModuleList
    middle_block: TimestepEmbedSequential
    skip_channels: list[int]  # channels of each input block's output, in order


def build_encoder(config: UNetConfig) -> UNetEncoder:
    """Build time embedding, input blocks and middle block; the decoder (or ControlNet taps) attach to these."""
    ch = config.model_channels
    time_embed = nn.Sequential(
        linear(ch, config.time_embed_dim), nn.SiLU(), linear(config.time_embed_dim, config.time_embed_dim)
    )
    input_blocks = nn.ModuleList([TimestepEmbedSequential(conv_nd(config.dims, config.in_channels, ch, 3, padding=1))])
    skip_channels = [ch]
    ds = 1
    for level, mult in enumerate(config.channel_mult):
        for index in range(config.num_res_blocks[level]):
            layers = [config.res_block(ch, mult * config.model_channels)]
            ch = mult * config.model_channels
            if config.has_attention(level, ds, index):
                layers.append(config.attention_block(ch, config.self_attention_disabled(level)))
            input_blocks.append(TimestepEmbedSequential(*layers))
            skip_channels.append(ch)
        if level != len(config.channel_mult) - 1:
            if config.resblock_updown:
                downsample = config.res_block(ch, ch, down=True)
            else:
                downsample = Downsample(ch, config.conv_resample, dims=config.dims, out_channels=ch)
            input_blocks.append(TimestepEmbedSequential(downsample))
            skip_channels.append(ch)
            ds *= 2
    middle_block = TimestepEmbedSequential(
        config.res_block(ch, ch),
        config.attention_block(ch, config.disable_middle_self_attn),
        config.res_block(ch, ch),
    )
    return UNetEncoder(time_embed, input_blocks, middle_block, skip_channels)


def build_decoder(config: UNetConfig, skip_channels: Sequence[int]) -> nn.ModuleList:
    """Build the output blocks, each consuming the last unused encoder skip; upsample at the end of each level."""
    skips = list(skip_channels)
    ch = skips[-1]
    ds = 2 ** (len(config.channel_mult) - 1)
    output_blocks = nn.ModuleList()
    for level, mult in reversed(list(enumerate(config.channel_mult))):
        for index in range(config.num_res_blocks[level] + 1):
            layers = [config.res_block(ch + skips.pop(), config.model_channels * mult)]
            ch = config.model_channels * mult
            if config.has_attention(level, ds, index):
                layers.append(config.attention_block(ch, config.self_attention_disabled(level), decoder=True))
            if level and index == config.num_res_blocks[level]:
                if config.resblock_updown:
                    layers.append(config.res_block(ch, ch, up=True))
                else:
                    layers.append(Upsample(ch, config.conv_resample, dims=config.dims, out_channels=ch))
                ds //= 2
            output_blocks.append(TimestepEmbedSequential(*layers))
    return output_blocks


# Blocks never checkpointed. The middle block runs at the lowest resolution (8x8 for a 512 px image): its
# activations are 1/64 of the first level's per channel while its weights are the heaviest, so recomputing it in
# backward costs FLOPs to save almost no memory.
UNCHECKPOINTED_BLOCKS = ("middle_block",)


def set_gradient_checkpointing(module: nn.Module, enabled: bool) -> None:
    """Turn activation checkpointing on or off in every ResBlock, AttentionBlock and transformer block outside
    the UNCHECKPOINTED_BLOCKS."""
    for name, layer in module.named_modules():
        checkpointed = enabled and not any(part in UNCHECKPOINTED_BLOCKS for part in name.split("."))
        if isinstance(layer, (ResBlock, AttentionBlock)):
            layer.use_checkpoint = checkpointed
        elif isinstance(layer, BasicTransformerBlock):
            layer.checkpoint = checkpointed


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class UNetModel(nn.Module):
    """The full UNet with timestep embedding, optional class labels and cross-attention to a context.

    Takes `out_channels`, `num_classes` and the fields of `UNetConfig` as keyword arguments (a yaml's `params:`).

    Args:
        in_channels, out_channels: channels of the input and output tensors.
        model_channels: base width; level `i` has `model_channels * channel_mult[i]` channels.
        num_res_blocks: ResBlocks per level (an int, or one per level).
        attention_resolutions: downsampling factors (1, 2, 4, ...) whose blocks get attention.
        num_heads / num_head_channels: fixed head count, or fixed head width (one of them must be set).
        legacy: recompute the head width as `channels // num_heads` (the original SD 1.x behaviour).
        use_spatial_transformer, transformer_depth, context_dim, use_linear_in_transformer: cross-attention sites.
        use_fp16: run the blocks in float16 (`self.dtype`); the input is cast on entry.
        n_embed: predict codebook ids with that many entries instead of the output tensor.
        attn_backend: attention implementation of every CrossAttention ("sdpa", "math" or "sliced").
        The remaining arguments are those of the original constructor, with the same defaults.
    """

    kwargs_class: ClassVar[type] = UNetConfig  # `**params` build it (ldm.util.accepted_params checks configs)

    def __init__(self, out_channels: int, num_classes: int | None = None, **params: Any) -> None:
        super().__init__()
        config = UNetConfig(**params)
        self.image_size = config.image_size
        self.in_channels = config.in_channels
        self.model_channels = config.model_channels
        self.out_channels = out_channels
        self.num_classes = num_classes
        self.dtype = torch.float16 if config.use_fp16 else torch.float32
        self.predict_codebook_ids = config.n_embed is not None

        encoder = build_encoder(config)
        self.time_embed = encoder.time_embed
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, config.time_embed_dim)
        self.input_blocks = encoder.input_blocks
        self.middle_block = encoder.middle_block
        self.output_blocks = build_decoder(config, encoder.skip_channels)
        out_ch = config.model_channels * config.channel_mult[0]
        self.out = nn.Sequential(
            normalization(out_ch), nn.SiLU(), zero_module(conv_nd(config.dims, out_ch, out_channels, 3, padding=1))
        )
        if self.predict_codebook_ids:
            self.id_predictor = nn.Sequential(normalization(out_ch), conv_nd(config.dims, out_ch, config.n_embed, 1))
        set_gradient_checkpointing(self, config.use_checkpoint)

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Turn activation checkpointing on or off in every block but the middle one (UNCHECKPOINTED_BLOCKS)."""
        set_gradient_checkpointing(self, enabled)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Predict the model output for `x` (B, C, H, W) at `timesteps` (B,) given `context` (B, L, D)."""
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("pass class labels y if and only if the model was built with num_classes")
        # 1. timestep (and class) embedding: (B, 4 * model_channels)
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels, repeat_only=False))
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)
        # 2. encoder, keeping every block output as a skip
        skips = []
        h = x.type(self.dtype)
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        # 3. middle block: (B, C_max, H / 2^(L-1), W / 2^(L-1))
        h = self.middle_block(h, emb, context)
        # 4. decoder, concatenating skips in reverse order
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        h = h.type(x.dtype)  # (B, model_channels, H, W)
        return self.id_predictor(h) if self.predict_codebook_ids else self.out(h)
