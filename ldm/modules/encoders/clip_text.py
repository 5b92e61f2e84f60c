"""Our own CLIP text transformers, named exactly like the text encoders inside SD checkpoints.

Two layouts of the same causal pre-LayerNorm transformer:
* `CLIPTextModel`: the Hugging Face layout of SD 1.x checkpoints (`text_model.embeddings.*`,
  `text_model.encoder.layers.N.*`), quick-GELU MLP;
* `OpenCLIPTextModel`: open_clip's text tower of SD 2.x checkpoints (`transformer.resblocks.N.*`,
  packed `in_proj_weight`), exact-GELU MLP, no visual tower.
Neither passes a padding mask to attention (the originals did not); only the causal mask is applied.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------------------------
# Shared layers
# ----------------------------------------------------------------------------------------------


def causal_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Multi-head causal attention of (B, L, W) projections, scaled by head_dim^-0.5; returns (B, L, W)."""
    batch, length, width = q.shape
    q, k, v = (t.reshape(batch, length, num_heads, width // num_heads).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, L, D)
    return out.transpose(1, 2).reshape(batch, length, width)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), the activation OpenAI's CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


# ----------------------------------------------------------------------------------------------
# Hugging Face layout (SD 1.x: cond_stage_model.transformer.text_model.*)
# ----------------------------------------------------------------------------------------------


@dataclass
class CLIPTextOutput:
    """Outputs of `CLIPTextModel`, named as in transformers' `BaseModelOutputWithPooling`."""

    last_hidden_state: torch.Tensor  # (B, L, W), after final_layer_norm
    pooler_output: torch.Tensor  # (B, W), last_hidden_state at the first end-of-text token
    hidden_states: tuple[torch.Tensor, ...] | None = None  # embeddings, then every layer's output


class CLIPTextEmbeddings(nn.Module):
    """Token plus learned position embeddings; keeps the persistent `position_ids` buffer of SD 1.x files."""

    def __init__(self, vocab_size: int, num_positions: int, width: int):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.position_embedding = nn.Embedding(num_positions, width)
        self.register_buffer("position_ids", torch.arange(num_positions).unsqueeze(0), persistent=True)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        return self.token_embedding(input_ids) + self.position_embedding(self.position_ids[:, :length])

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # SD 1.x files written with transformers < 4.31 carry `position_ids`; later ones do not, because
        # the buffer became non-persistent there, and some community files store it as drifted floats
        # (e.g. 76.9999) that truncate wrongly. It only ever holds arange(num_positions), so it is always
        # (re)built here and every kind of file loads with strict=True. (`load_state_dict` hands every
        # module a shallow copy of the caller's dict, so the caller's dict is left unchanged.)
        state_dict[prefix + "position_ids"] = torch.arange(self.position_ids.shape[1]).unsqueeze(0)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class CLIPAttention(nn.Module):
    """Causal self-attention with separate q/k/v/out projections."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        # Registration order k, v, q, out is the key order of the checkpoints.
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.q_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attended = causal_self_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.num_heads)
        return self.out_proj(attended)  # (B, L, W)


class CLIPMLP(nn.Module):
    """fc1 → quick-GELU → fc2."""

    def __init__(self, width: int, intermediate_size: int):
        super().__init__()
        self.fc1 = nn.Linear(width, intermediate_size)
        self.activation = QuickGELU()
        self.fc2 = nn.Linear(intermediate_size, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-LayerNorm residual block: attention, then MLP."""

    def __init__(self, width: int, num_heads: int, intermediate_size: int, layer_norm_eps: float):
        super().__init__()
        self.self_attn = CLIPAttention(width, num_heads)
        self.layer_norm1 = nn.LayerNorm(width, eps=layer_norm_eps)
        self.mlp = CLIPMLP(width, intermediate_size)
        self.layer_norm2 = nn.LayerNorm(width, eps=layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    """The stack of `CLIPEncoderLayer`s (`encoder.layers.N`)."""

    def __init__(self, width: int, num_layers: int, num_heads: int, intermediate_size: int, layer_norm_eps: float):
        super().__init__()
        self.layers = nn.ModuleList(
            CLIPEncoderLayer(width, num_heads, intermediate_size, layer_norm_eps) for _ in range(num_layers)
        )


class CLIPTextTransformer(nn.Module):
    """Embeddings, encoder and final LayerNorm of the CLIP text tower (the `text_model` level)."""

    def __init__(
        self,
        vocab_size: int,
        num_positions: int,
        width: int,
        num_layers: int,
        num_heads: int,
        intermediate_size: int,
        layer_norm_eps: float,
    ):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(vocab_size, num_positions, width)
        self.encoder = CLIPEncoder(width, num_layers, num_heads, intermediate_size, layer_norm_eps)
        self.final_layer_norm = nn.LayerNorm(width, eps=layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, output_hidden_states: bool = False) -> CLIPTextOutput:
        # 1. embed tokens and positions
        x = self.embeddings(input_ids)  # (B, L, W)
        hidden_states = [x]
        # 2. causal transformer layers
        for layer in self.encoder.layers:
            x = layer(x)  # (B, L, W)
            hidden_states.append(x)
        # 3. final LayerNorm, and the pooled state at the first end-of-text token, which has the
        #    largest id in CLIP's vocabulary (the original's argmax rule)
        last_hidden_state = self.final_layer_norm(x)  # (B, L, W)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        pooler_output = last_hidden_state[rows, input_ids.argmax(dim=-1)]  # (B, W)
        return CLIPTextOutput(last_hidden_state, pooler_output, tuple(hidden_states) if output_hidden_states else None)


class CLIPTextModel(nn.Module):
    """The SD 1.x text encoder, with transformers 4.x's extra `text_model` level in its key names."""

    def __init__(
        self,
        vocab_size: int = 49408,
        num_positions: int = 77,
        width: int = 768,
        num_layers: int = 12,
        num_heads: int = 12,
        intermediate_size: int = 3072,
        layer_norm_eps: float = 1e-5,
    ):
        super().__init__()
        self.text_model = CLIPTextTransformer(
            vocab_size, num_positions, width, num_layers, num_heads, intermediate_size, layer_norm_eps
        )
        self._init_embeddings()

    def _init_embeddings(self) -> None:
        # CLIP's own init for the embeddings; linear and LayerNorm layers keep PyTorch's defaults.
        # Real weights always come from a checkpoint afterwards.
        nn.init.normal_(self.text_model.embeddings.token_embedding.weight, std=0.02)
        nn.init.normal_(self.text_model.embeddings.position_embedding.weight, std=0.01)

    def forward(self, input_ids: torch.Tensor, output_hidden_states: bool = False) -> CLIPTextOutput:
        return self.text_model(input_ids, output_hidden_states=output_hidden_states)


# ----------------------------------------------------------------------------------------------
# open_clip layout (SD 2.x: cond_stage_model.model.*)
# ----------------------------------------------------------------------------------------------


class PackedSelfAttention(nn.Module):
    """Causal self-attention with `nn.MultiheadAttention`'s parameter names (packed q/k/v projection)."""

    def __init__(self, width: int, num_heads: int):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"width {width} is not divisible by heads {num_heads}")
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)  # 3 × (B, L, W)
        return self.out_proj(causal_self_attention(q, k, v, self.num_heads))  # (B, L, W)


class ResidualAttentionBlock(nn.Module):
    """open_clip's pre-LayerNorm block: ln_1 → attn, ln_2 → mlp (c_fc → GELU → c_proj)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = PackedSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict([("c_fc", nn.Linear(width, hidden)), ("gelu", nn.GELU()), ("c_proj", nn.Linear(hidden, width))])
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """The stack of `ResidualAttentionBlock`s (`transformer.resblocks.N`), batch-first."""

    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, mlp_ratio) for _ in range(layers))

    def forward(self, x: torch.Tensor, num_blocks: int | None = None) -> torch.Tensor:
        for block in self.resblocks[:num_blocks]:
            x = block(x)  # (B, L, W)
        return x


class OpenCLIPTextModel(nn.Module):
    """open_clip's CLIP text tower without the visual tower, as SD 2.x checkpoints store it."""

    def __init__(
        self,
        context_length: int = 77,
        vocab_size: int = 49408,
        width: int = 1024,
        layers: int = 24,
        heads: int = 16,
        mlp_ratio: float = 4.0,
        embed_dim: int = 1024,
    ):
        super().__init__()
        # Own parameters first, then the children in this order: that is the checkpoints' key order.
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))  # unused by SD, kept for the keys
        self.logit_scale = nn.Parameter(torch.full((), math.log(1 / 0.07)))  # unused by SD, kept for the keys
        self.transformer = Transformer(width, layers, heads, mlp_ratio)
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.ln_final = nn.LayerNorm(width)
        # open_clip's additive causal mask, non-persistent as there; kept for code that reads
        # `model.attn_mask`. The blocks apply the same mask through SDPA's is_causal.
        mask = torch.full((context_length, context_length), float("-inf")).triu_(1)
        self.register_buffer("attn_mask", mask, persistent=False)
        self._init_parameters()

    def _init_parameters(self) -> None:
        # open_clip's init; real weights always come from a checkpoint afterwards.
        width, layers = self.transformer.width, self.transformer.layers
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=width**-0.5)
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=width**-0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=width**-0.5 * (2 * layers) ** -0.5)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=width**-0.5 * (2 * layers) ** -0.5)

    def forward(self, tokens: torch.Tensor, skip_last_blocks: int = 0) -> torch.Tensor:
        """Per-token features (B, L, W) after ln_final, leaving out the last `skip_last_blocks` blocks."""
        # 1. embed tokens and positions
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]  # (B, L, W)
        # 2. causal transformer blocks 0 .. layers - 1 - skip_last_blocks
        x = self.transformer(x, num_blocks=self.transformer.layers - skip_last_blocks)  # (B, L, W)
        # 3. final LayerNorm, applied to whichever block came last (no pooling, no projection)
        return self.ln_final(x)
