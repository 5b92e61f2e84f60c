"""Frozen text encoders of the ControlNet configs: CLIP ViT-L/14 (SD 1.x) and OpenCLIP ViT-H/14 (SD 2.x).

Everything is built offline: the architecture comes from the keyword arguments (defaults = the
released models), the BPE tokenizer from the files shipped in `models/clip_tokenizer/`, and the
weights later from the user's checkpoint, so a fresh encoder holds random weights.
"""
from __future__ import annotations

import html
import logging
from pathlib import Path
from typing import Any

import ftfy
import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTokenizer

from ldm.modules.encoders.clip_text import CLIPTextModel, OpenCLIPTextModel
from ldm.util import to_device

logger = logging.getLogger(__name__)

SHIPPED_TOKENIZER_DIR = Path(__file__).resolve().parents[3] / "models" / "clip_tokenizer"
OPENAI_CLIP_VIT_L14 = "openai/clip-vit-large-patch14"
OPEN_CLIP_ARCHS = ("ViT-H-14",)

# ----------------------------------------------------------------------------------------------
# Tokenization
# ----------------------------------------------------------------------------------------------


def load_clip_tokenizer(directory: str | Path = SHIPPED_TOKENIZER_DIR) -> CLIPTokenizer:
    """CLIP BPE tokenizer read from a local directory holding vocab.json and merges.txt."""
    directory = Path(directory)
    for name in ("vocab.json", "merges.txt"):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"tokenizer file {directory / name} is missing; restore models/clip_tokenizer/")
    return CLIPTokenizer.from_pretrained(str(directory))


def clean_prompt(text: str, unescape_html: bool) -> str:
    """Unicode repair the original tokenizers applied before BPE (ftfy; open_clip also unescapes HTML)."""
    text = ftfy.fix_text(text)
    if unescape_html:
        text = html.unescape(html.unescape(text))
    return text


def bpe_token_ids(tokenizer: CLIPTokenizer, texts: list[str], unescape_html: bool = False) -> list[list[int]]:
    """BPE ids of every prompt, without start/end tokens and without truncation."""
    cleaned = [clean_prompt(text, unescape_html) for text in texts]
    return tokenizer(cleaned, add_special_tokens=False, verbose=False)["input_ids"]


def pack_window(tokenizer: CLIPTokenizer, ids: list[int], length: int, pad_id: int) -> list[int]:
    """`[start] + ids + [end]`, cut to `length` with the end token kept last, then padded with `pad_id`."""
    window = [tokenizer.bos_token_id, *ids[: length - 2], tokenizer.eos_token_id]
    return window + [pad_id] * (length - len(window))


# ----------------------------------------------------------------------------------------------
# Shared encoder behaviour
# ----------------------------------------------------------------------------------------------


class AbstractEncoder(nn.Module):
    """Base class of the conditioning encoders; `encode` is the name LatentDiffusion calls."""

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        return self(*args, **kwargs)


class FrozenTextEncoder(AbstractEncoder):
    """Prompt tokenization into fixed windows of max_length tokens, freezing, and the device of the weights."""

    def __init__(self, tokenizer: CLIPTokenizer, max_length: int, pad_id: int, unescape_html: bool):
        super().__init__()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_id = pad_id
        self.unescape_html = unescape_html
        self._warned_truncation = False

    @property
    def device(self) -> torch.device:
        """Device of the weights; tokens go there (the original's `device` argument is ignored)."""
        return next(self.parameters()).device

    def freeze(self) -> None:
        """Evaluation mode and no gradients for any parameter."""
        self.eval()
        for param in self.parameters():
            param.requires_grad = False

    def tokenize(self, text: str | list[str], num_windows: int = 1) -> torch.Tensor:
        """Token ids (B, num_windows, max_length): consecutive chunks of each prompt, each in its own window."""
        texts = [text] if isinstance(text, str) else list(text)
        chunk = self.max_length - 2
        token_ids = bpe_token_ids(self.tokenizer, texts, self.unescape_html)
        self._warn_if_truncated(token_ids, chunk * num_windows)
        windows = [
            [self._pack(ids[i * chunk : (i + 1) * chunk]) for i in range(num_windows)] for ids in token_ids
        ]
        return torch.tensor(windows, dtype=torch.long)

    def _pack(self, ids: list[int]) -> list[int]:
        return pack_window(self.tokenizer, ids, self.max_length, self.pad_id)

    def _warn_if_truncated(self, token_ids: list[list[int]], capacity: int) -> None:
        longest = max((len(ids) for ids in token_ids), default=0)
        if longest > capacity and not self._warned_truncation:
            logger.warning(
                "A prompt of %d tokens was truncated to its first %d tokens, as the original encoder does "
                "(this warning is shown once per encoder).", longest, capacity,
            )
            self._warned_truncation = True


# ----------------------------------------------------------------------------------------------
# SD 1.x: CLIP ViT-L/14 text encoder
# ----------------------------------------------------------------------------------------------


def _clip_text_architecture(directory: Path) -> dict[str, int | float]:
    """CLIPTextModel keyword arguments from a transformers config.json (CLIPTextConfig or CLIPConfig)."""
    config = CLIPTextConfig.from_pretrained(str(directory))
    if config.hidden_act != "quick_gelu":
        raise ValueError(
            f"{directory / 'config.json'} asks for hidden_act '{config.hidden_act}'; only 'quick_gelu' is supported"
        )
    return dict(
        vocab_size=config.vocab_size,
        num_positions=config.max_position_embeddings,
        width=config.hidden_size,
        num_layers=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        layer_norm_eps=config.layer_norm_eps,
    )


def _resolve_clip_version(version: str, shipped_architecture: dict) -> tuple[dict, Path]:
    """Architecture and tokenizer directory that `version` names: the shipped ViT-L/14 or a local directory."""
    if version == OPENAI_CLIP_VIT_L14:
        return shipped_architecture, SHIPPED_TOKENIZER_DIR
    directory = Path(version)
    if not directory.is_dir():
        raise ValueError(
            f"text encoder version '{version}' is not '{OPENAI_CLIP_VIT_L14}' and not a local directory; models are "
            "not downloaded, so pass a local directory with a transformers config.json and/or vocab.json + merges.txt"
        )
    has_config = (directory / "config.json").is_file()
    has_tokenizer = (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file()
    if not (has_config or has_tokenizer):
        raise FileNotFoundError(f"{directory} holds neither config.json nor vocab.json + merges.txt")
    architecture = _clip_text_architecture(directory) if has_config else shipped_architecture
    return architecture, directory if has_tokenizer else SHIPPED_TOKENIZER_DIR


class FrozenCLIPEmbedder(FrozenTextEncoder):
    """CLIP ViT-L/14 text encoder of SD 1.x: prompts → per-token features (B, 77, 768).

    Args:
        version: "openai/clip-vit-large-patch14" (the shipped ViT-L/14 configuration given by the size
            arguments) or a local directory with a transformers config.json and/or tokenizer files.
        device: accepted for config compatibility; tokens go to the device of the weights.
        layer: "last" (after final_layer_norm), "pooled" (end-of-text state, (B, 1, W)) or "hidden"
            (`hidden_states[layer_idx]`, before the final LayerNorm).
        clip_skip: >1 returns final_layer_norm(hidden_states[-clip_skip]) instead of the last layer
            (`cldm/hack.py`'s option); 0 and 1 mean no skip.
        long_prompt: encode three consecutive 75-token chunks in separate windows and concatenate them
            → (B, 231, W), as `cldm/hack.py`'s long-prompt forward.
    """

    LAYERS = ("last", "pooled", "hidden")

    def __init__(
        self,
        version: str = OPENAI_CLIP_VIT_L14,
        device: str = "cuda",
        max_length: int = 77,
        freeze: bool = True,
        layer: str = "last",
        layer_idx: int | None = None,
        hidden_size: int = 768,
        num_layers: int = 12,
        num_heads: int = 12,
        intermediate_size: int = 3072,
        clip_skip: int = 1,
        long_prompt: bool = False,
    ):
        shipped = dict(
            vocab_size=49408,
            num_positions=77,
            width=hidden_size,
            num_layers=num_layers,
            num_heads=num_heads,
            intermediate_size=intermediate_size,
        )
        architecture, tokenizer_dir = _resolve_clip_version(version, shipped)
        depth, positions = architecture["num_layers"], architecture["num_positions"]
        _check_clip_options(layer, layer_idx, clip_skip, depth, max_length, positions)
        tokenizer = load_clip_tokenizer(tokenizer_dir)
        super().__init__(tokenizer, max_length, pad_id=tokenizer.pad_token_id, unescape_html=False)
        self.transformer = CLIPTextModel(**architecture)
        self.layer = layer
        self.layer_idx = layer_idx
        self.clip_skip = clip_skip
        self.long_prompt = long_prompt
        if freeze:
            self.freeze()

    def forward(self, text: str | list[str]) -> torch.Tensor:
        # 1. tokenize: one window per prompt, or three consecutive 75-token chunks with long_prompt
        tokens = self.tokenize(text, num_windows=3 if self.long_prompt else 1)  # (B, F, 77)
        batch = tokens.shape[0]
        tokens = to_device(tokens.flatten(0, 1), self.device)  # (B·F, 77)
        # 2. run the text transformer and pick the requested features
        z = self.features(tokens)  # (B·F, 77, W), or (B·F, 1, W) when pooled
        # 3. concatenate the windows of each prompt along the tokens
        return z.reshape(batch, -1, z.shape[-1])  # (B, F·77, W)

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """Features of token windows (N, 77) for the configured layer and clip_skip."""
        skip = self.clip_skip > 1
        outputs = self.transformer(tokens, output_hidden_states=skip or self.layer == "hidden")
        if self.layer == "pooled":
            return outputs.pooler_output[:, None, :]  # (N, 1, W)
        if self.layer == "hidden":
            return outputs.hidden_states[self.layer_idx]  # (N, 77, W)
        if skip:
            return self.transformer.text_model.final_layer_norm(outputs.hidden_states[-self.clip_skip])
        return outputs.last_hidden_state  # (N, 77, W)


def _check_clip_options(
    layer: str, layer_idx: int | None, clip_skip: int, depth: int, max_length: int, num_positions: int
) -> None:
    if layer not in FrozenCLIPEmbedder.LAYERS:
        raise ValueError(f"layer '{layer}' is not one of {FrozenCLIPEmbedder.LAYERS}")
    if layer == "hidden" and (layer_idx is None or abs(layer_idx) > depth):
        raise ValueError(f"layer='hidden' needs an integer layer_idx with 0 <= |layer_idx| <= {depth}, got {layer_idx}")
    if not 0 <= clip_skip <= depth:
        raise ValueError(f"clip_skip must be between 0 and {depth}, got {clip_skip}")
    if clip_skip > 1 and layer != "last":
        raise ValueError(f"clip_skip={clip_skip} applies to layer='last' only, got layer='{layer}'")
    if not 2 < max_length <= num_positions:
        raise ValueError(f"max_length must be between 3 and the model's {num_positions} positions, got {max_length}")


# ----------------------------------------------------------------------------------------------
# SD 2.x: OpenCLIP ViT-H/14 text encoder
# ----------------------------------------------------------------------------------------------


class FrozenOpenCLIPEmbedder(FrozenTextEncoder):
    """OpenCLIP ViT-H/14 text encoder of SD 2.x: prompts → per-token features (B, 77, 1024).

    Args:
        arch: "ViT-H-14", the shipped configuration given by the size arguments.
        version: the open_clip pretrained tag; ignored, as the weights come from the checkpoint.
        device: accepted for config compatibility; tokens go to the device of the weights.
        layer: "last" runs every block, "penultimate" all but the last; ln_final follows either way.
    """

    LAYERS = ("last", "penultimate")

    def __init__(
        self,
        arch: str = "ViT-H-14",
        version: str = "laion2b_s32b_b79k",
        device: str = "cuda",
        max_length: int = 77,
        freeze: bool = True,
        layer: str = "last",
        width: int = 1024,
        layers: int = 24,
        heads: int = 16,
        mlp_ratio: float = 4.0,
        embed_dim: int = 1024,
        vocab_size: int = 49408,
    ):
        if arch not in OPEN_CLIP_ARCHS:
            raise ValueError(f"open_clip arch '{arch}' is not supported; use one of {OPEN_CLIP_ARCHS}")
        if layer not in self.LAYERS:
            raise ValueError(f"layer '{layer}' is not one of {self.LAYERS}")
        if max_length < 3:
            raise ValueError(f"max_length must be at least 3 (start, one token, end), got {max_length}")
        logger.debug("Ignoring open_clip pretrained tag '%s': weights come from the checkpoint.", version)
        # open_clip.tokenize pads with 0 and unescapes HTML entities; otherwise it is the same BPE.
        super().__init__(load_clip_tokenizer(), max_length, pad_id=0, unescape_html=True)
        self.model = OpenCLIPTextModel(max_length, vocab_size, width, layers, heads, mlp_ratio, embed_dim)
        self.layer = layer
        self.layer_idx = self.LAYERS.index(layer)  # number of final blocks left out
        if freeze:
            self.freeze()

    def forward(self, text: str | list[str]) -> torch.Tensor:
        tokens = to_device(self.tokenize(text)[:, 0], self.device)  # (B, 77)
        return self.encode_with_transformer(tokens)  # (B, 77, W)

    def encode_with_transformer(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per-token features (B, 77, W) of token ids, after ln_final, from the configured layer."""
        return self.model(tokens, skip_last_blocks=self.layer_idx)
