"""UNetModel: the SD state-dict tree, head-count logic, argument checks, checkpointing and attention backends."""
from __future__ import annotations

import json
import math

import pytest
import torch
from omegaconf import OmegaConf
from torch.testing import assert_close

from ldm.modules.attention import ATTENTION_BACKENDS, BasicTransformerBlock, set_attention_backend
from ldm.modules.diffusionmodules.openaimodel import (
    AttentionBlock,
    QKVAttention,
    QKVAttentionLegacy,
    ResBlock,
    UNetModel,
)
from ldm.modules.diffusionmodules.util import timestep_embedding
from tests.helpers.random_weights import randomize_

TINY_UNET = dict(
    image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[2, 1],
    num_res_blocks=1, channel_mult=[1, 2], num_heads=2, use_spatial_transformer=True, transformer_depth=1,
    context_dim=32, use_checkpoint=True, legacy=False,
)
SD_PARAMETERS = {"v15": 859_520_964, "v21": 865_910_724}


def _tiny_inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(2, 4, 8, 8, generator=generator),
        timesteps=torch.tensor([3, 901]),
        context=torch.randn(2, 5, 32, generator=generator),
    )


# ---------------------------------------------------------------------------------------------
# Full-size SD models on the meta device
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["v15", "v21"])
def test_sd_unet_state_dict_equals_the_original(version, repo_root, fixtures_dir):
    params = OmegaConf.load(repo_root / f"models/cldm_{version}.yaml").model.params.unet_config.params
    with torch.device("meta"):
        unet = UNetModel(**params)  # ListConfig arguments straight from the yaml
    prefix = "model.diffusion_model."
    original = json.loads((fixtures_dir / f"keys_cldm_{version}.json").read_text())
    expected = {key.removeprefix(prefix): value for key, value in original.items() if key.startswith(prefix)}
    got = {key: [list(t.shape), str(t.dtype).removeprefix("torch.")] for key, t in unet.state_dict().items()}
    assert sorted(set(expected) - set(got)) == [], "missing keys"
    assert sorted(set(got) - set(expected)) == [], "unexpected keys"
    assert got == expected
    assert list(got) == list(expected), "state-dict order differs from the original"
    assert sum(p.numel() for p in unet.parameters()) == SD_PARAMETERS[version]


@pytest.mark.parametrize(
    "version, heads, dim_heads", [("v15", [8, 8, 8], [40, 80, 160]), ("v21", [5, 10, 20], [64, 64, 64])]
)
def test_sd_attention_heads_per_level(version, heads, dim_heads, repo_root):
    params = OmegaConf.load(repo_root / f"models/cldm_{version}.yaml").model.params.unet_config.params
    with torch.device("meta"):
        unet = UNetModel(**params)
    for block_index, level in ((1, 0), (4, 1), (7, 2)):
        attn = unet.input_blocks[block_index][1].transformer_blocks[0].attn1
        assert (attn.heads, attn.to_q.out_features // attn.heads) == (heads[level], dim_heads[level])
    middle = unet.middle_block[1].transformer_blocks[0].attn2
    assert (middle.heads, middle.to_q.out_features // middle.heads) == (heads[2], dim_heads[2])


# ---------------------------------------------------------------------------------------------
# Helpers and layers
# ---------------------------------------------------------------------------------------------


def test_timestep_embedding_is_cos_then_sin():
    embedding = timestep_embedding(torch.tensor([0, 5]), 8)
    assert embedding.dtype == torch.float32
    assert_close(embedding[0], torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0]))
    assert_close(embedding[1, 0], torch.cos(torch.tensor(5.0)))  # frequency 1 first
    assert_close(embedding[1, 4], torch.sin(torch.tensor(5.0)))
    assert timestep_embedding(torch.tensor([1]), 7).shape == (1, 7)


def test_qkv_attention_layouts_compute_the_same_heads():
    torch.manual_seed(0)
    batch, heads, channels, length = 2, 3, 4, 5
    q, k, v = (torch.randn(batch, heads, channels, length) for _ in range(3))
    new_order = torch.cat([t.reshape(batch, heads * channels, length) for t in (q, k, v)], dim=1)
    legacy_order = torch.cat([q, k, v], dim=2).reshape(batch, heads * 3 * channels, length)
    weights = torch.softmax(q.transpose(2, 3) @ k / math.sqrt(channels), dim=-1)  # (B, H, T, S)
    expected = (v @ weights.transpose(2, 3)).reshape(batch, heads * channels, length)
    assert_close(QKVAttention(heads)(new_order), expected)
    assert_close(QKVAttentionLegacy(heads)(legacy_order), expected)


def test_res_block_keys_and_zero_init():
    block = ResBlock(32, 64, 0.0, out_channels=64)
    assert sorted(block.state_dict()) == sorted(
        f"{layer}.{kind}" for layer in ("in_layers.0", "in_layers.2", "emb_layers.1", "out_layers.0", "out_layers.3",
                                        "skip_connection") for kind in ("weight", "bias")
    )
    assert tuple(block.skip_connection.weight.shape) == (64, 32, 1, 1)
    assert not block.out_layers[3].weight.any() and not block.out_layers[3].bias.any()


# ---------------------------------------------------------------------------------------------
# The tiny UNet on CPU
# ---------------------------------------------------------------------------------------------


def test_tiny_unet_forward_backward():
    unet = randomize_(UNetModel(**TINY_UNET))
    inputs = _tiny_inputs()
    out = unet(**inputs)
    assert out.shape == inputs["x"].shape
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in unet.parameters())


def test_checkpointing_changes_memory_not_results():
    unet = randomize_(UNetModel(**TINY_UNET))
    inputs = _tiny_inputs()
    calls = []
    unet.input_blocks[1][1].transformer_blocks[0].attn1.register_forward_hook(lambda *_: calls.append(1))
    results = {}
    for enabled in (True, False):
        unet.set_gradient_checkpointing(enabled)
        unet.zero_grad(set_to_none=True)
        calls.clear()
        out = unet(**inputs)
        out.square().mean().backward()
        results[enabled] = (out.detach(), {name: p.grad for name, p in unet.named_parameters()})
        assert len(calls) == (2 if enabled else 1), "checkpointed blocks recompute their forward in backward"
    assert_close(results[True][0], results[False][0], rtol=0, atol=0)
    for name, grad in results[True][1].items():
        assert_close(grad, results[False][1][name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("variant", [dict(), dict(out_channels=64, down=True), dict(use_scale_shift_norm=True)])
def test_resblock_checkpoint_recomputes_all_but_the_last_conv_and_the_skip_path(variant):
    block = randomize_(ResBlock(32, 12, dropout=0.0, use_checkpoint=True, **variant))
    generator = torch.Generator().manual_seed(0)
    x, emb = torch.randn(2, 32, 8, 8, generator=generator), torch.randn(2, 12, generator=generator)
    results = {}
    for enabled in (True, False):
        block.use_checkpoint = enabled
        block.zero_grad(set_to_none=True)
        calls = {"first conv": 0, "last conv": 0, "skip": 0}
        hooks = [
            module.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
            for name, module in (("first conv", block.in_layers[-1]), ("last conv", block.out_layers[-1]),
                                 ("skip", block.skip_connection))
        ]
        out = block(x, emb)
        out.square().mean().backward()
        for hook in hooks:
            hook.remove()
        results[enabled] = out.detach(), {name: p.grad for name, p in block.named_parameters()}
        assert calls == {"first conv": 2 if enabled else 1, "last conv": 1, "skip": 1}
    assert_close(results[True][0], results[False][0], rtol=0, atol=0)
    for name, grad in results[True][1].items():
        assert_close(grad, results[False][1][name], rtol=0, atol=0, msg=name)


def _checkpoint_flags(module):
    flags = {name: m.use_checkpoint for name, m in module.named_modules() if isinstance(m, ResBlock)}
    flags.update({name: m.checkpoint for name, m in module.named_modules() if isinstance(m, BasicTransformerBlock)})
    return flags


@pytest.mark.parametrize("use_checkpoint", [True, False])
def test_checkpointing_reaches_every_block_but_the_middle_one(use_checkpoint):
    unet = UNetModel(**{**TINY_UNET, "use_checkpoint": use_checkpoint})
    for enabled in (use_checkpoint, not use_checkpoint):
        if enabled != use_checkpoint:
            unet.set_gradient_checkpointing(enabled)
        flags = _checkpoint_flags(unet)
        assert len(flags) == 8 + 7  # ResBlocks: 2 encoder, 2 middle, 4 decoder; transformers: 2, 1, 4
        middle = {name for name in flags if name.startswith("middle_block.")}
        assert len(middle) == 3
        assert all(flags[name] == enabled for name in flags.keys() - middle)
        assert not any(flags[name] for name in middle), "the lowest-resolution middle block is never recomputed"


def test_attention_backends_agree_in_the_unet():
    unet = randomize_(UNetModel(**TINY_UNET, attn_backend="math"))
    inputs = _tiny_inputs()
    with torch.no_grad():
        reference = unet(**inputs)
        for backend in ATTENTION_BACKENDS:
            set_attention_backend(unet, backend)
            assert_close(unet(**inputs), reference, rtol=1e-5, atol=1e-5)


def test_omegaconf_arguments_build_the_same_model():
    plain = UNetModel(**TINY_UNET)
    from_yaml = UNetModel(**OmegaConf.create(TINY_UNET))
    list_context = UNetModel(**{**TINY_UNET, "context_dim": OmegaConf.create([32])})
    shapes = {key: value.shape for key, value in plain.state_dict().items()}
    assert {key: value.shape for key, value in from_yaml.state_dict().items()} == shapes
    assert {key: value.shape for key, value in list_context.state_dict().items()} == shapes


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(context_dim=None), "context_dim"),
        (dict(use_spatial_transformer=False), "use_spatial_transformer"),
        (dict(num_heads=-1), "num_head_channels"),
        (dict(num_res_blocks=[1, 1, 1]), "num_res_blocks"),
        (dict(disable_self_attentions=[True]), "disable_self_attentions"),
        (dict(num_attention_blocks=[2, 1]), "num_attention_blocks"),
        (dict(attn_backend="xformers"), "attention backend"),
    ],
)
def test_invalid_arguments_are_value_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        UNetModel(**{**TINY_UNET, **overrides})


def test_class_labels_are_required_exactly_for_class_conditional_models():
    inputs = _tiny_inputs()
    with pytest.raises(ValueError, match="num_classes"):
        UNetModel(**TINY_UNET)(**inputs, y=torch.tensor([0, 1]))
    conditional = randomize_(UNetModel(**TINY_UNET, num_classes=3))
    with pytest.raises(ValueError, match="num_classes"):
        conditional(**inputs)
    with torch.no_grad():
        first, second = (conditional(**inputs, y=torch.tensor(labels)) for labels in ([0, 1], [2, 1]))
        assert not torch.equal(first, second)


@pytest.mark.parametrize("use_new_attention_order", [False, True])
def test_legacy_attention_variant_with_resblock_resampling(use_new_attention_order):
    unet = UNetModel(
        image_size=None, in_channels=3, model_channels=32, out_channels=5,
        num_res_blocks=[1, 2], attention_resolutions=[2], channel_mult=[1, 2], num_head_channels=16,
        use_scale_shift_norm=True, resblock_updown=True, use_new_attention_order=use_new_attention_order,
    )
    sites = [m for m in unet.modules() if isinstance(m, AttentionBlock)]
    assert len(sites) == 2 + 1 + 3 and all(site.num_heads == 4 for site in sites)
    assert isinstance(sites[0].attention, QKVAttention if use_new_attention_order else QKVAttentionLegacy)
    randomize_(unet)
    x = torch.randn(1, 3, 8, 8)
    assert unet(x, torch.tensor([10])).shape == (1, 5, 8, 8)


def test_legacy_head_logic_keeps_original_shapes():
    # legacy=True recomputes dim_head = ch // num_heads for spatial transformers and passes num_head_channels
    # through for AttentionBlock (-1 -> num_heads heads).
    spatial = UNetModel(**{**TINY_UNET, "legacy": True, "num_heads": -1, "num_head_channels": 16})
    assert [b.attn1.heads for b in spatial.modules() if isinstance(b, BasicTransformerBlock)][:2] == [2, 4]
    plain = UNetModel(image_size=None, in_channels=4, model_channels=32, out_channels=4, num_res_blocks=1,
                      attention_resolutions=[1], channel_mult=[1], num_heads=4, legacy=True)
    assert {m.num_heads for m in plain.modules() if isinstance(m, AttentionBlock)} == {4}


def test_fp16_flag_and_codebook_head():
    assert UNetModel(**TINY_UNET, use_fp16=True).dtype == torch.float16
    assert UNetModel(**TINY_UNET).dtype == torch.float32
    unet = randomize_(UNetModel(**TINY_UNET, n_embed=7))
    with torch.no_grad():
        assert unet(**_tiny_inputs()).shape == (2, 7, 8, 8)
