"""The first-stage autoencoder's convolutional encoder and decoder (the SD VAE's building blocks)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

ATTN_BACKENDS = ("sdpa", "math")
ATTN_TYPES = ("vanilla", "vanilla-xformers", "none")

# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def Normalize(in_channels: int, num_groups: int = 32) -> nn.GroupNorm:
    """The VAE's normalisation layer: affine GroupNorm with eps 1e-6 (no float32 upcast)."""
    return nn.GroupNorm(num_groups=num_groups, num_channels=in_channels, eps=1e-6, affine=True)


def nonlinearity(x: torch.Tensor) -> torch.Tensor:
    """Swish, x * sigmoid(x), as one fused kernel (within an ulp of the original's two ops, twice as fast)."""
    return F.silu(x)


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling, optionally followed by a 3x3 conv (key `conv`)."""

    def __init__(self, in_channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
        return self.conv(x) if self.with_conv else x


class Downsample(nn.Module):
    """x2 downsampling: stride-2 3x3 conv after padding right/bottom by one (key `conv`), or 2x2 average pooling."""

    def __init__(self, in_channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.with_conv:
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        # Asymmetric padding: torch convs only pad symmetrically, the original pads (left 0, right 1, top 0, bottom 1).
        x = F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0)
        return self.conv(x)  # (B, C, H/2, W/2)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: norm, swish, 3x3 conv, (+ timestep projection), norm, swish, dropout, 3x3 conv."""

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int | None = None,
        conv_shortcut: bool = False,
        dropout: float,
        temb_channels: int = 512,
    ):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.use_conv_shortcut = conv_shortcut

        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if temb_channels > 0:
            self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            if conv_shortcut:
                self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
            else:
                self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        # 1. first conv
        h = self.conv1(nonlinearity(self.norm1(x)))  # (B, C_out, H, W)
        # 2. optional timestep embedding, broadcast over space
        if temb is not None:
            h = h + self.temb_proj(nonlinearity(temb))[:, :, None, None]
        # 3. second conv
        h = self.conv2(self.dropout(nonlinearity(self.norm2(h))))
        # 4. residual, projecting the input when the channel count changes
        if self.in_channels != self.out_channels:
            x = self.conv_shortcut(x) if self.use_conv_shortcut else self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1-conv projections and a residual connection.

    Args:
        in_channels: channels of the feature map (also the attention width).
        backend: "sdpa" uses `F.scaled_dot_product_attention`; "math" spells out softmax(q k^T / sqrt(C)) v as the
            original does. Both give the same result up to floating-point rounding.
    """

    def __init__(self, in_channels: int, backend: str = "sdpa"):
        super().__init__()
        if backend not in ATTN_BACKENDS:
            raise ValueError(f"AttnBlock backend '{backend}' is unknown; use one of {ATTN_BACKENDS}")
        self.in_channels = in_channels
        self.backend = backend

        self.norm = Normalize(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        # 1. project to queries, keys, values laid out as (B, HW, C)
        h = self.norm(x)
        q, k, v = (proj(h).reshape(b, c, height * width).transpose(1, 2) for proj in (self.q, self.k, self.v))
        # 2. attend over all positions
        h = self._attend(q, k, v)  # (B, HW, C)
        # 3. back to a feature map, output projection, residual
        h = h.transpose(1, 2).reshape(b, c, height, width)
        return x + self.proj_out(h)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(q k^T / sqrt(C)) v for (B, HW, C) inputs."""
        if self.backend == "sdpa":
            return F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        weights = torch.bmm(q, k.transpose(1, 2)) * (int(self.in_channels) ** (-0.5))  # (B, HW_q, HW_k)
        weights = torch.softmax(weights, dim=2)
        return torch.bmm(weights, v)


def make_attn(in_channels: int, attn_type: str = "vanilla", attn_backend: str = "sdpa") -> nn.Module:
    """The attention layer named by `attn_type`: "vanilla" / "vanilla-xformers" (both AttnBlock) or "none"."""
    if attn_type not in ATTN_TYPES:
        raise ValueError(f"attn_type '{attn_type}' is not supported; use one of {ATTN_TYPES}")
    if attn_type == "none":
        return nn.Identity()
    # "vanilla-xformers" named a memory-efficient kernel with the same weights; SDPA plays that role here.
    return AttnBlock(in_channels, backend=attn_backend)


def _check_attention_args(use_linear_attn: bool) -> None:
    """Reject the original's linear-attention option, which this port leaves out."""
    if use_linear_attn:
        raise ValueError("use_linear_attn=True (linear attention) is not supported; set it to False")


def _middle(channels: int, temb_channels: int, dropout: float, attn_type: str, attn_backend: str) -> nn.Module:
    """The middle stage shared by encoder and decoder: `block_1`, `attn_1`, `block_2`."""
    mid = nn.Module()
    mid.block_1 = ResnetBlock(in_channels=channels, out_channels=channels, temb_channels=temb_channels, dropout=dropout)
    mid.attn_1 = make_attn(channels, attn_type, attn_backend)
    mid.block_2 = ResnetBlock(in_channels=channels, out_channels=channels, temb_channels=temb_channels, dropout=dropout)
    return mid


# ---------------------------------------------------------------------------------------------
# Encoder / decoder
# ---------------------------------------------------------------------------------------------


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> latent moments (B, 2*z_channels, H/f, W/f), f = 2**(len(ch_mult)-1).

    Extra keyword arguments (the decoder's half of a shared `ddconfig`) are ignored. `attn_backend` picks the
    attention kernel ("sdpa" or "math"); it does not change parameter names.
    """

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: tuple[int, ...] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: tuple[int, ...],
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        in_channels: int,
        resolution: int,
        z_channels: int,
        double_z: bool = True,
        use_linear_attn: bool = False,
        attn_type: str = "vanilla",
        attn_backend: str = "sdpa",
        **ignore_kwargs,
    ):
        super().__init__()
        _check_attention_args(use_linear_attn)
        self.ch = ch
        self.temb_ch = 0
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels

        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        in_ch_mult = (1, *ch_mult)
        curr_res = resolution
        self.down = nn.ModuleList()
        for i_level in range(self.num_resolutions):
            block_in, block_out = ch * in_ch_mult[i_level], ch * ch_mult[i_level]
            level = nn.Module()
            level.block = nn.ModuleList(
                ResnetBlock(in_channels=c_in, out_channels=block_out, temb_channels=self.temb_ch, dropout=dropout)
                for c_in in [block_in] + [block_out] * (num_res_blocks - 1)
            )
            level.attn = nn.ModuleList(
                make_attn(block_out, attn_type, attn_backend)
                for _ in range(num_res_blocks if curr_res in attn_resolutions else 0)
            )
            if i_level != self.num_resolutions - 1:
                level.downsample = Downsample(block_out, resamp_with_conv)
                curr_res //= 2
            self.down.append(level)

        block_in = ch * ch_mult[-1]
        self.mid = _middle(block_in, self.temb_ch, dropout, attn_type, attn_backend)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(
            block_in, 2 * z_channels if double_z else z_channels, kernel_size=3, stride=1, padding=1
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        temb = None
        # 1. stem
        h = self.conv_in(x)  # (B, ch, H, W)
        # 2. resolution levels, halving the size after every level but the last
        for i_level, level in enumerate(self.down):
            for i_block, block in enumerate(level.block):
                h = block(h, temb)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = level.downsample(h)
        # 3. middle: resnet, attention, resnet
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h, temb)), temb)  # (B, ch * ch_mult[-1], H/f, W/f)
        # 4. head
        return self.conv_out(nonlinearity(self.norm_out(h)))  # (B, 2 * z_channels, H/f, W/f)


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, out_ch, h*f, w*f); levels are stored as `up.N`, run from the last down.

    Extra keyword arguments (the encoder's half of a shared `ddconfig`) are ignored. `attn_backend` picks the
    attention kernel ("sdpa" or "math"); it does not change parameter names.
    """

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: tuple[int, ...] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: tuple[int, ...],
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        in_channels: int,
        resolution: int,
        z_channels: int,
        give_pre_end: bool = False,
        tanh_out: bool = False,
        use_linear_attn: bool = False,
        attn_type: str = "vanilla",
        attn_backend: str = "sdpa",
        **ignore_kwargs,
    ):
        super().__init__()
        _check_attention_args(use_linear_attn)
        self.ch = ch
        self.temb_ch = 0
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels
        self.give_pre_end = give_pre_end
        self.tanh_out = tanh_out

        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.z_shape = (1, z_channels, curr_res, curr_res)

        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = _middle(block_in, self.temb_ch, dropout, attn_type, attn_backend)
        levels = []
        for i_level in reversed(range(self.num_resolutions)):
            block_out = ch * ch_mult[i_level]
            level = nn.Module()
            level.block = nn.ModuleList(
                ResnetBlock(in_channels=c_in, out_channels=block_out, temb_channels=self.temb_ch, dropout=dropout)
                for c_in in [block_in] + [block_out] * num_res_blocks
            )
            level.attn = nn.ModuleList(
                make_attn(block_out, attn_type, attn_backend)
                for _ in range(num_res_blocks + 1 if curr_res in attn_resolutions else 0)
            )
            if i_level != 0:
                level.upsample = Upsample(block_out, resamp_with_conv)
                curr_res *= 2
            block_in = block_out
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)

        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self.last_z_shape = z.shape
        temb = None
        # 1. stem and middle: resnet, attention, resnet
        h = self.conv_in(z)  # (B, ch * ch_mult[-1], h, w)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h, temb)), temb)
        # 2. resolution levels from the coarsest up, doubling the size after every level but the first
        for i_level in reversed(range(self.num_resolutions)):
            level = self.up[i_level]
            for i_block, block in enumerate(level.block):
                h = block(h, temb)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if i_level != 0:
                h = level.upsample(h)
        if self.give_pre_end:
            return h  # (B, ch * ch_mult[0], h*f, w*f)
        # 3. head
        h = self.conv_out(nonlinearity(self.norm_out(h)))  # (B, out_ch, h*f, w*f)
        return torch.tanh(h) if self.tanh_out else h

