"""Cross-attention and the spatial transformer that the UNet and the ControlNet place at each attention site."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ldm.modules.diffusionmodules.util import checkpoint, zero_module

# ---------------------------------------------------------------------------------------------
# Attention backends: (B, H, N, D) queries, (B, H, M, D) keys/values -> (B, H, N, D)
# ---------------------------------------------------------------------------------------------


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Fused `F.scaled_dot_product_attention` (flash / memory-efficient kernels where available)."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """The original's explicit path: logits and softmax in (at least) float32 even under autocast, then `attn @ v`."""
    logits_dtype = torch.promote_types(q.dtype, torch.float32)
    # Half-precision logits overflow and lose resolution at large |q.k|, so autocast is suspended for them.
    with torch.autocast(device_type=q.device.type, enabled=False):
        logits = torch.einsum("b h i d, b h j d -> b h i j", q.to(logits_dtype), k.to(logits_dtype)) * scale
    weights = logits.softmax(dim=-1).to(v.dtype)  # what autocast would cast to; lets pure fp16 models run too
    return torch.einsum("b h i j, b h j d -> b h i d", weights, v)


def sliced_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """The original hack.py's low-memory path: one (batch, head) slice at a time, no float32 upcast."""
    batch, heads, n_queries, _ = q.shape
    q, k, v = (t.reshape(batch * heads, *t.shape[2:]) for t in (q, k, v))
    slices = []
    for i in range(batch * heads):
        weights = (torch.einsum("i d, j d -> i j", q[i], k[i]) * scale).softmax(dim=-1)  # (N, M)
        slices.append(weights @ v[i])
    return torch.stack(slices).reshape(batch, heads, n_queries, -1)


ATTENTION_BACKENDS = {"sdpa": sdpa_attention, "math": math_attention, "sliced": sliced_attention}


def _checked_backend(backend: str) -> str:
    """Return `backend` if it names a known attention backend, else raise ValueError."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend '{backend}' (expected one of {sorted(ATTENTION_BACKENDS)})")
    return backend


def set_attention_backend(module: nn.Module, backend: str) -> int:
    """Switch every CrossAttention inside `module` to `backend`; returns how many were switched."""
    backend = _checked_backend(backend)
    attentions = [m for m in module.modules() if isinstance(m, CrossAttention)]
    for attention in attentions:
        attention.backend = backend
    return len(attentions)


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------


class CrossAttention(nn.Module):
    """Multi-head attention of `x` over `context` (itself when no context is given).

    Args:
        query_dim: width of `x`.
        context_dim: width of `context`; defaults to `query_dim` (self-attention).
        heads, dim_head: number and width of heads; logits are scaled by `dim_head ** -0.5`.
        dropout: dropout after the output projection.
        backend: "sdpa", "math" or "sliced" (see ATTENTION_BACKENDS); parameters are the same for all.
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
        backend: str = "sdpa",
    ) -> None:
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.scale = dim_head**-0.5
        self.backend = _checked_backend(backend)
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        # 1. project and split heads: (B, N, H*D) -> (B, H, N, D)
        q, k, v = (
            rearrange(projection, "b n (h d) -> b h n d", h=self.heads)
            for projection in (self.to_q(x), self.to_k(context), self.to_v(context))
        )
        # 2. attend with the chosen backend
        out = ATTENTION_BACKENDS[self.backend](q, k, v, self.scale)  # (B, H, N, D)
        # 3. merge heads and project back: (B, N, query_dim)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class GEGLU(nn.Module):
    """Gated GELU projection: the first half of the projection is the value, the second half the gate."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)  # exact (erf) GELU


class FeedForward(nn.Module):
    """Transformer MLP: (GE)GLU or Linear+GELU up-projection by `mult`, dropout, down-projection."""

    def __init__(
        self, dim: int, dim_out: int | None = None, mult: int = 4, glu: bool = False, dropout: float = 0.0
    ) -> None:
        super().__init__()
        inner_dim = int(dim * mult)
        dim_out = dim if dim_out is None else dim_out
        project_in = GEGLU(dim, inner_dim) if glu else nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner_dim, dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention, gated feed-forward, each residual."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        d_head: int,
        dropout: float = 0.0,
        context_dim: int | None = None,
        gated_ff: bool = True,
        checkpoint: bool = True,
        disable_self_attn: bool = False,
        attn_backend: str = "sdpa",
    ) -> None:
        super().__init__()
        self.disable_self_attn = disable_self_attn
        # Registration order attn1, ff, attn2, norm1..3 is the original's state-dict order.
        self.attn1 = CrossAttention(
            dim, context_dim=context_dim if disable_self_attn else None, heads=n_heads, dim_head=d_head,
            dropout=dropout, backend=attn_backend,
        )
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(
            dim, context_dim=context_dim, heads=n_heads, dim_head=d_head, dropout=dropout, backend=attn_backend
        )
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.checkpoint = checkpoint

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        return checkpoint(self._forward, (x, context), self.parameters(), self.checkpoint)

    def _forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        # 1. self-attention (attends to the context instead when self-attention is disabled)
        x = self.attn1(self.norm1(x), context=context if self.disable_self_attn else None) + x  # (B, N, C)
        # 2. cross-attention to the context
        x = self.attn2(self.norm2(x), context=context) + x
        # 3. feed-forward
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map: norm, project in, blocks, zero-init project out, residual.

    Args:
        in_channels: channels of the feature map; `n_heads * d_head` is the transformer width.
        depth: number of BasicTransformerBlocks.
        context_dim: width of the cross-attention context, or a list with one width per block.
        use_linear: project with Linear layers on tokens (SD 2.x) instead of 1x1 convolutions (SD 1.x).
        use_checkpoint: gradient checkpointing in every block.
        attn_backend: attention backend of every CrossAttention (see ATTENTION_BACKENDS).
    """

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        depth: int = 1,
        dropout: float = 0.0,
        context_dim: int | list[int] | None = None,
        disable_self_attn: bool = False,
        use_linear: bool = False,
        use_checkpoint: bool = True,
        attn_backend: str = "sdpa",
    ) -> None:
        super().__init__()
        context_dims = self._per_block(context_dim, depth)
        inner_dim = n_heads * d_head
        self.in_channels = in_channels
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(32, in_channels, eps=1e-6, affine=True)
        self.proj_in = nn.Linear(in_channels, inner_dim) if use_linear else nn.Conv2d(in_channels, inner_dim, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner_dim, n_heads, d_head, dropout=dropout, context_dim=block_context_dim,
                disable_self_attn=disable_self_attn, checkpoint=use_checkpoint, attn_backend=attn_backend,
            )
            for block_context_dim in context_dims
        )
        proj_out = nn.Linear(inner_dim, in_channels) if use_linear else nn.Conv2d(inner_dim, in_channels, 1)
        self.proj_out = zero_module(proj_out)

    @staticmethod
    def _per_block(context_dim: int | list[int] | None, depth: int) -> list[int | None]:
        """One context width per block; a single width is shared by all blocks."""
        if not isinstance(context_dim, (list, tuple)):
            # The original wrapped an int into a one-element list and failed with IndexError for depth > 1.
            return [context_dim] * depth
        if len(context_dim) != depth:
            raise ValueError(f"context_dim lists {len(context_dim)} widths but depth is {depth}; give one per block")
        return list(context_dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | list[torch.Tensor] | None = None) -> torch.Tensor:
        contexts = context if isinstance(context, list) else [context] * len(self.transformer_blocks)
        _, _, height, width = x.shape
        x_in = x
        # 1. normalise and project to tokens: (B, C, H, W) -> (B, H*W, inner)
        x = self.norm(x)
        if self.use_linear:
            x = self.proj_in(rearrange(x, "b c h w -> b (h w) c").contiguous())
        else:
            x = rearrange(self.proj_in(x), "b c h w -> b (h w) c").contiguous()
        # 2. transformer blocks
        for block, block_context in zip(self.transformer_blocks, contexts, strict=True):
            x = block(x, context=block_context)
        # 3. project back to a feature map and add the residual: (B, C, H, W)
        if self.use_linear:
            x = rearrange(self.proj_out(x), "b (h w) c -> b c h w", h=height, w=width).contiguous()
        else:
            x = self.proj_out(rearrange(x, "b (h w) c -> b c h w", h=height, w=width).contiguous())
        return x + x_in
