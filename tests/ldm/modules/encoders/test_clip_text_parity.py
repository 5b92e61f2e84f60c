"""Numerical parity of our text transformers with transformers' CLIPTextModel and open_clip's text tower.

Tiny configurations, identical weights (copied by name), nothing downloaded. The references run the
original encoders' forward passes: `FrozenCLIPEmbedder.forward` and `cldm/hack.py`'s long-prompt forward
on a transformers model, `FrozenOpenCLIPEmbedder.encode_with_transformer` on an open_clip tower.
"""
from __future__ import annotations

import open_clip
import pytest
import torch
from open_clip.transformer import TextTransformer
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.modules.encoders.modules import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder

WIDTH, LAYERS, HEADS, MLP = 64, 3, 4, 128
PROMPTS = [
    "burly wood circle with orange background",
    "a photo of a cat, masterpiece, best quality",
    "",
    " ".join(f"word{i}" for i in range(60)),  # 170 tokens: truncated to 77, or three windows when long
]
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def _perturb_(module: torch.nn.Module, seed: int) -> None:
    """Move every float tensor off its init (LayerNorm weights away from 1, biases from 0), reproducibly."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))


# ----------------------------------------------------------------------------------------------
# SD 1.x: FrozenCLIPEmbedder vs transformers.CLIPTextModel
# ----------------------------------------------------------------------------------------------


def _clip_pair(**options) -> tuple[FrozenCLIPEmbedder, CLIPTextModel]:
    ours = FrozenCLIPEmbedder(hidden_size=WIDTH, num_layers=LAYERS, num_heads=HEADS, intermediate_size=MLP, **options)
    _perturb_(ours, seed=0)
    config = CLIPTextConfig(
        hidden_size=WIDTH,
        intermediate_size=MLP,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        hidden_act="quick_gelu",
        attn_implementation="eager",
    )
    reference = CLIPTextModel(config).eval()
    # transformers 4.x nests everything under `text_model.`, 5.x does not; 5.x has no persistent position_ids.
    reference_keys = reference.state_dict().keys()
    prefix = "text_model." if any(key.startswith("text_model.") for key in reference_keys) else ""
    ours_state = {key.removeprefix("transformer.text_model."): value for key, value in ours.state_dict().items()}
    mapped = {prefix + key: value for key, value in ours_state.items() if prefix + key in reference_keys}
    assert mapped.keys() == reference_keys
    reference.load_state_dict(mapped, strict=True)
    return ours, reference


def _reference_tokens(tokenizer, prompts: list[str]) -> torch.Tensor:
    # The original FrozenCLIPEmbedder.forward's tokenizer call.
    batch = tokenizer(
        prompts,
        truncation=True,
        max_length=77,
        return_length=True,
        return_overflowing_tokens=False,
        padding="max_length",
        return_tensors="pt",
    )
    return batch["input_ids"]


def _final_layer_norm(reference: CLIPTextModel) -> torch.nn.LayerNorm:
    return getattr(reference, "text_model", reference).final_layer_norm


@pytest.mark.parametrize(
    "options, pick",
    [
        (dict(layer="last"), lambda out: out.last_hidden_state),
        (dict(layer="pooled"), lambda out: out.pooler_output[:, None, :]),
        (dict(layer="hidden", layer_idx=0), lambda out: out.hidden_states[0]),
        (dict(layer="hidden", layer_idx=2), lambda out: out.hidden_states[2]),
        (dict(layer="hidden", layer_idx=-1), lambda out: out.hidden_states[-1]),
    ],
    ids=["last", "pooled", "hidden0", "hidden2", "hidden-1"],
)
@torch.no_grad()
def test_clip_embedder_matches_transformers(options, pick):
    ours, reference = _clip_pair(**options)
    tokens = _reference_tokens(ours.tokenizer, PROMPTS)
    expected = pick(reference(input_ids=tokens, output_hidden_states=True))
    torch.testing.assert_close(ours(PROMPTS), expected, **TOLERANCE)


@torch.no_grad()
def test_clip_skip_is_final_layer_norm_of_an_earlier_hidden_state():
    ours, reference = _clip_pair(clip_skip=2)
    out = reference(input_ids=_reference_tokens(ours.tokenizer, PROMPTS), output_hidden_states=True)
    expected = _final_layer_norm(reference)(out.hidden_states[-2])
    torch.testing.assert_close(ours(PROMPTS), expected, **TOLERANCE)
    assert not torch.allclose(expected, out.last_hidden_state, **TOLERANCE)


@pytest.mark.parametrize("clip_skip", [1, 2])
@torch.no_grad()
def test_long_prompt_matches_the_hack_forward(clip_skip):
    ours, reference = _clip_pair(long_prompt=True, clip_skip=clip_skip)
    tokenizer = ours.tokenizer
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    # cldm/hack.py: three 75-token chunks per prompt, each wrapped in start/end tokens and padded to 77.
    windows = []
    for raw in tokenizer(PROMPTS, truncation=False, add_special_tokens=False)["input_ids"]:
        chunks = [[bos, *raw[75 * i : 75 * (i + 1)], eos] for i in range(3)]
        windows.append([chunk + [pad] * (77 - len(chunk)) for chunk in chunks])
    feed = torch.tensor(windows, dtype=torch.int32).flatten(0, 1)
    out = reference(input_ids=feed, output_hidden_states=clip_skip > 1)
    y = _final_layer_norm(reference)(out.hidden_states[-clip_skip]) if clip_skip > 1 else out.last_hidden_state
    expected = y.reshape(len(PROMPTS), 3 * 77, WIDTH)
    torch.testing.assert_close(ours(PROMPTS), expected, **TOLERANCE)


# ----------------------------------------------------------------------------------------------
# SD 2.x: FrozenOpenCLIPEmbedder vs open_clip's TextTransformer
# ----------------------------------------------------------------------------------------------


def _open_clip_pair(layer: str) -> tuple[FrozenOpenCLIPEmbedder, TextTransformer]:
    ours = FrozenOpenCLIPEmbedder(width=WIDTH, layers=LAYERS, heads=HEADS, embed_dim=32, layer=layer)
    _perturb_(ours, seed=1)
    reference = TextTransformer(
        context_length=77, vocab_size=49408, width=WIDTH, heads=HEADS, layers=LAYERS, output_dim=32, output_tokens=True
    ).eval()
    ours_state = {key.removeprefix("model."): value for key, value in ours.state_dict().items()}
    reference_keys = reference.state_dict().keys()
    assert reference_keys <= ours_state.keys()
    reference.load_state_dict({key: ours_state[key] for key in reference_keys}, strict=True)
    return ours, reference


def _original_encode_with_transformer(tower: TextTransformer, tokens: torch.Tensor, layer_idx: int) -> torch.Tensor:
    # The original FrozenOpenCLIPEmbedder.encode_with_transformer, without its permutes: open_clip >= 2.26
    # builds the transformer batch-first (spec pitfall 21).
    x = tower.token_embedding(tokens) + tower.positional_embedding
    for i, block in enumerate(tower.transformer.resblocks):
        if i == len(tower.transformer.resblocks) - layer_idx:
            break
        x = block(x, attn_mask=tower.attn_mask)
    return tower.ln_final(x)


@pytest.mark.parametrize("layer, layer_idx", [("last", 0), ("penultimate", 1)])
@torch.no_grad()
def test_open_clip_embedder_matches_open_clip(layer, layer_idx):
    ours, reference = _open_clip_pair(layer)
    tokens = open_clip.tokenize(PROMPTS)
    expected = _original_encode_with_transformer(reference, tokens, layer_idx)
    torch.testing.assert_close(ours(PROMPTS), expected, **TOLERANCE)
    if layer == "last":
        _, all_tokens = reference(tokens)  # open_clip's own forward, per-token output
        torch.testing.assert_close(ours(PROMPTS), all_tokens, **TOLERANCE)
