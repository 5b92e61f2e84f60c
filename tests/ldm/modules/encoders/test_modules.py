"""Text encoders: checkpoint layout, tokenization, options and freezing (all offline, tiny or meta models)."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import open_clip
import pytest
import torch
from transformers import CLIPConfig, CLIPTextConfig

from ldm.modules.encoders.modules import SHIPPED_TOKENIZER_DIR, FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder

TINY_CLIP = dict(hidden_size=64, num_layers=3, num_heads=4, intermediate_size=128)
TINY_OPEN_CLIP = dict(width=64, layers=3, heads=4, embed_dim=32)
EOS, PAD_SD1, PAD_SD2 = 49407, 49407, 0

PROMPTS = [
    "burly wood circle with orange background",
    "a cat",
    "",
    "Hello, World!!! ... (masterpiece:1.2), best-quality; 8k",
    "it’s a “quoted” café naïve Ærøskøbing",
    "東京の夜景, 日本語のプロンプト 😀🎉",
    "tom &amp; jerry &lt;3",
    "ﬁne ｆｕｌｌｗｉｄｔｈ 123456 3.14",
    "don't won't y'all 'quoted' I'LL",
    "  spaces\t\ttabs\nnewlines  ",
    " ".join(f"word{i}" for i in range(60)),  # 170 BPE tokens: truncated
]


def _cond_stage_keys(path: Path) -> dict[str, list]:
    keys = json.loads(path.read_text())
    return {key: value for key, value in keys.items() if key.startswith("cond_stage_model.")}


def _layout(module: torch.nn.Module) -> dict[str, list]:
    return {
        f"cond_stage_model.{key}": [list(tensor.shape), str(tensor.dtype).removeprefix("torch.")]
        for key, tensor in module.state_dict().items()
    }


def _open_clip_ids(prompts: list[str], pad_id: int) -> torch.Tensor:
    """open_clip.tokenize, with the zero padding after the end token replaced by `pad_id`."""
    ids = open_clip.tokenize(prompts)
    first_eos = (ids == EOS).int().argmax(dim=1, keepdim=True)
    return ids.masked_fill(torch.arange(ids.shape[1]) > first_eos, pad_id)


# ----------------------------------------------------------------------------------------------
# Checkpoint layout
# ----------------------------------------------------------------------------------------------


def test_clip_embedder_state_dict_matches_sd15_checkpoint_layout(fixtures_dir):
    with torch.device("meta"):
        encoder = FrozenCLIPEmbedder()
    # Same keys in the same order, same shapes and dtypes (position_ids int64 [1, 77], persistent).
    assert list(_layout(encoder).items()) == list(_cond_stage_keys(fixtures_dir / "keys_cldm_v15.json").items())


def test_open_clip_embedder_state_dict_matches_sd21_checkpoint_layout(fixtures_dir):
    with torch.device("meta"):
        encoder = FrozenOpenCLIPEmbedder(layer="penultimate")
    assert list(_layout(encoder).items()) == list(_cond_stage_keys(fixtures_dir / "keys_cldm_v21.json").items())
    # The causal mask exists (as in open_clip) but is not persistent.
    assert encoder.model.attn_mask.shape == (77, 77)
    assert "model.attn_mask" not in encoder.state_dict()


def test_checkpoint_without_position_ids_loads_strictly():
    # transformers >= 4.31 stopped saving text_model.embeddings.position_ids (spec pitfall 20).
    source = FrozenCLIPEmbedder(**TINY_CLIP)
    state = source.state_dict()
    key = "transformer.text_model.embeddings.position_ids"
    del state[key]
    target = FrozenCLIPEmbedder(**TINY_CLIP)
    target.transformer.text_model.embeddings.position_ids.zero_()
    target.load_state_dict(state, strict=True)
    assert key not in state  # the caller's dict is left alone
    torch.testing.assert_close(target.state_dict()[key], torch.arange(77).unsqueeze(0), rtol=0, atol=0)
    for name, tensor in state.items():
        torch.testing.assert_close(target.state_dict()[name], tensor, rtol=0, atol=0)


def test_full_size_checkpoint_without_position_ids_loads_strictly_on_meta():
    with torch.device("meta"):
        encoder = FrozenCLIPEmbedder()
        state = FrozenCLIPEmbedder().state_dict()
    state.pop("transformer.text_model.embeddings.position_ids")
    encoder.load_state_dict(state, strict=True, assign=True)
    assert encoder.transformer.text_model.embeddings.position_ids.tolist() == [list(range(77))]


# ----------------------------------------------------------------------------------------------
# Tokenization
# ----------------------------------------------------------------------------------------------


def test_sd1_tokens_equal_open_clip_tokenize_with_eos_padding():
    with torch.device("meta"):
        encoder = FrozenCLIPEmbedder(**TINY_CLIP)
    tokens = encoder.tokenize(PROMPTS)
    assert tokens.shape == (len(PROMPTS), 1, 77) and tokens.dtype == torch.long
    assert torch.equal(tokens[:, 0], _open_clip_ids(PROMPTS, PAD_SD1))


def test_sd2_tokens_equal_open_clip_tokenize():
    with torch.device("meta"):
        encoder = FrozenOpenCLIPEmbedder(**TINY_OPEN_CLIP)
    prompts = [*PROMPTS, "a&b <b>bold</b> &amp;"]  # open_clip unescapes HTML even next to tags
    assert torch.equal(encoder.tokenize(prompts)[:, 0], open_clip.tokenize(prompts))


def test_single_string_is_a_batch_of_one():
    with torch.device("meta"):
        encoder = FrozenCLIPEmbedder(**TINY_CLIP)
    assert torch.equal(encoder.tokenize("a cat"), encoder.tokenize(["a cat"]))


def test_long_prompt_windows_hold_consecutive_75_token_chunks():
    with torch.device("meta"):
        encoder = FrozenCLIPEmbedder(**TINY_CLIP, long_prompt=True)
    prompt = " ".join(f"word{i}" for i in range(60))
    bpe = encoder.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert 150 < len(bpe) <= 225
    windows = encoder.tokenize([prompt, "a cat"], num_windows=3)
    assert windows.shape == (2, 3, 77)
    for i in range(3):
        chunk = bpe[75 * i : 75 * (i + 1)]
        expected = [49406, *chunk, EOS] + [PAD_SD1] * (75 - len(chunk))
        assert windows[0, i].tolist() == expected
    # A short prompt still fills three windows; the last two hold only start and end tokens.
    assert windows[1, 2].tolist() == [49406, EOS] + [PAD_SD1] * 75


def test_truncation_warning_is_logged_once(caplog):
    encoder = FrozenCLIPEmbedder(**TINY_CLIP)
    long_prompt = " ".join(f"word{i}" for i in range(60))
    with caplog.at_level(logging.WARNING, logger="ldm.modules.encoders.modules"):
        encoder(["a short prompt"])
        assert not caplog.records
        encoder([long_prompt])
        encoder([long_prompt, long_prompt])
    assert len(caplog.records) == 1
    assert "truncated" in caplog.records[0].getMessage()


# ----------------------------------------------------------------------------------------------
# Options, versions, freezing
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer_idx", [None, 4, -4])
def test_hidden_layer_index_is_bounded_by_depth(layer_idx):
    with pytest.raises(ValueError, match="layer_idx"):
        FrozenCLIPEmbedder(**TINY_CLIP, layer="hidden", layer_idx=layer_idx)


@pytest.mark.parametrize("layer_idx", [0, 3, -3])
def test_hidden_layer_index_within_depth_is_accepted(layer_idx):
    with torch.device("meta"):
        encoder = FrozenCLIPEmbedder(**TINY_CLIP, layer="hidden", layer_idx=layer_idx)
    assert encoder.layer_idx == layer_idx


def test_invalid_options_raise_value_error():
    with pytest.raises(ValueError, match="layer 'middle'"):
        FrozenCLIPEmbedder(**TINY_CLIP, layer="middle")
    with pytest.raises(ValueError, match="clip_skip"):
        FrozenCLIPEmbedder(**TINY_CLIP, clip_skip=4)
    with pytest.raises(ValueError, match="clip_skip"):
        FrozenCLIPEmbedder(**TINY_CLIP, clip_skip=2, layer="pooled")
    with pytest.raises(ValueError, match="max_length"):
        FrozenCLIPEmbedder(**TINY_CLIP, max_length=78)
    with pytest.raises(ValueError, match="layer 'hidden'"):
        FrozenOpenCLIPEmbedder(**TINY_OPEN_CLIP, layer="hidden")


def test_unknown_versions_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="not downloaded"):
        FrozenCLIPEmbedder(version="openai/clip-vit-base-patch32")
    with pytest.raises(FileNotFoundError, match="neither config.json"):
        FrozenCLIPEmbedder(version=str(tmp_path))
    with pytest.raises(ValueError, match="arch 'ViT-bigG-14'"):
        FrozenOpenCLIPEmbedder(arch="ViT-bigG-14")


def test_local_text_config_directory_sets_the_architecture(tmp_path):
    CLIPTextConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2).save_pretrained(
        tmp_path
    )
    with torch.device("meta"):
        encoder = FrozenCLIPEmbedder(version=str(tmp_path))
    layers = encoder.transformer.text_model.encoder.layers
    assert len(layers) == 2 and layers[0].mlp.fc1.weight.shape == (48, 32)
    assert encoder.transformer.text_model.embeddings.position_ids.shape == (1, 77)


def test_local_clip_config_and_tokenizer_directory(tmp_path):
    text_config = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2)
    CLIPConfig(text_config=text_config).save_pretrained(tmp_path)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(SHIPPED_TOKENIZER_DIR / name, tmp_path / name)
    encoder = FrozenCLIPEmbedder(version=str(tmp_path))
    assert encoder.tokenizer.name_or_path == str(tmp_path)
    assert encoder(["a cat"]).shape == (1, 77, 32)


def test_device_argument_is_ignored_in_favour_of_the_weights():
    encoder = FrozenCLIPEmbedder(**TINY_CLIP, device="cuda")
    assert encoder.device == torch.device("cpu")
    assert encoder(["a cat"]).device == torch.device("cpu")


@pytest.mark.parametrize(
    "build", [lambda: FrozenCLIPEmbedder(**TINY_CLIP), lambda: FrozenOpenCLIPEmbedder(**TINY_OPEN_CLIP)]
)
def test_freeze_leaves_no_trainable_parameter(build):
    encoder = build()
    assert not encoder.training
    assert not any(param.requires_grad for param in encoder.parameters())


def test_freeze_false_keeps_parameters_trainable():
    encoder = FrozenOpenCLIPEmbedder(**TINY_OPEN_CLIP, freeze=False)
    assert all(param.requires_grad for param in encoder.parameters())


def test_output_shapes():
    assert FrozenCLIPEmbedder(**TINY_CLIP)(["a", "b"]).shape == (2, 77, 64)
    assert FrozenCLIPEmbedder(**TINY_CLIP, layer="pooled")(["a", "b"]).shape == (2, 1, 64)
    assert FrozenCLIPEmbedder(**TINY_CLIP, long_prompt=True)(["a", "b"]).shape == (2, 231, 64)
    encoder = FrozenOpenCLIPEmbedder(**TINY_OPEN_CLIP, layer="penultimate")
    assert encoder.encode(["a", "b", "c"]).shape == (3, 77, 64)
