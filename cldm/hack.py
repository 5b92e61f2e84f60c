"""The original cldm/hack.py switches as explicit calls on a model: nothing happens on import.

* `disable_verbosity()` silences transformers' warnings.
* `enable_sliced_attention(model)` computes attention one (batch x head) slice at a time (low VRAM).
* `hack_everything(encoder, clip_skip)` turns on the long-prompt (3 x 75 tokens) CLIP encoding and
  clip skip of a `FrozenCLIPEmbedder`.
"""
from __future__ import annotations

import logging

from torch import nn

from ldm.modules.attention import set_attention_backend
from ldm.modules.encoders.modules import FrozenCLIPEmbedder

logger = logging.getLogger(__name__)


def disable_verbosity() -> None:
    """Show only errors from transformers."""
    import transformers

    transformers.logging.set_verbosity_error()
    logger.info("logging improved.")


def enable_sliced_attention(model: nn.Module) -> None:
    """Switch every cross-attention of `model` to the sliced (low-memory) computation."""
    set_attention_backend(model, "sliced")
    logger.info("Enabled sliced_attention.")


def hack_everything(encoder: FrozenCLIPEmbedder, clip_skip: int = 0) -> None:
    """Encode prompts of up to 225 tokens in three 75-token windows, optionally skipping final CLIP layers."""
    if not isinstance(encoder, FrozenCLIPEmbedder):
        raise TypeError(f"hack_everything needs a FrozenCLIPEmbedder, got {type(encoder).__name__}")
    disable_verbosity()
    encoder.long_prompt = True
    encoder.clip_skip = clip_skip
    logger.info("Enabled clip hacks.")
