"""Our ControlNet in diffusers' layout: `ControlNetModel` config.json values and state-dict key names.

Pure mappings, no diffusers import: `diffusers_config` turns the `ControlNet` constructor arguments (the
`control_stage_config.params` of a yaml file) into the config of an equivalent `diffusers.ControlNetModel`,
and `to_diffusers_state_dict` renames a `ControlNet.state_dict()` to that model's keys. The tensors are the same:
diffusers' blocks compute what ours compute (cos-then-sin timestep embedding, GroupNorm(32) with eps 1e-5 in
the ResBlocks, the same spatial transformer), so no weight is reshaped.
"""
from __future__ import annotations

import importlib
import inspect
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

import torch

from cldm.cldm import ControlNet

DIFFUSERS_CLASS_NAME = "ControlNetModel"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

# Output channels of the hint encoder's conv stages (fixed in our ControlNet, a config entry in diffusers).
HINT_ENCODER_CHANNELS = (16, 32, 96, 256)
# Our hint encoder is Sequential(conv, SiLU, conv, SiLU, ..., zero conv): the convs sit at the even indices.
_HINT_CONV_INDICES = tuple(range(0, 16, 2))

# ResBlock sub-modules (ours) -> ResnetBlock2D sub-modules (diffusers).
_RESBLOCK_NAMES = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}

# ControlNet arguments that diffusers' ControlNetModel cannot express, with the only value it supports.
_REQUIRED_VALUES = {
    "dims": 2,
    "conv_resample": True,
    "use_scale_shift_norm": False,
    "resblock_updown": False,
    "use_spatial_transformer": True,
    "disable_self_attentions": None,
    "num_attention_blocks": None,
    "disable_middle_self_attn": False,
}

# ---------------------------------------------------------------------------------------------
# Architecture: the ControlNet arguments, validated and with defaults filled in
# ---------------------------------------------------------------------------------------------


def _control_net_arguments(params: Mapping[str, Any]) -> dict[str, Any]:
    """All `ControlNet.__init__` arguments (given or default); ValueError for unknown or unsupported ones."""
    signature = inspect.signature(ControlNet.__init__)
    try:
        bound = signature.bind(None, **dict(params))
    except TypeError as error:
        raise ValueError(f"the ControlNet parameters do not fit ControlNet's constructor: {error}") from error
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    del arguments["self"]
    for name, required in _REQUIRED_VALUES.items():
        if arguments[name] != required:
            raise ValueError(
                f"ControlNet parameter {name}={arguments[name]!r} has no diffusers equivalent; "
                f"diffusers' ControlNetModel needs {name}={required!r}"
            )
    return arguments


def _single_value(name: str, value: int | Sequence[int]) -> int:
    """`value` itself, or its one repeated element when given per level (diffusers needs a single value)."""
    if isinstance(value, int):
        return value
    values = set(value)
    if len(values) != 1:
        raise ValueError(f"ControlNet parameter {name}={list(value)} varies per level; diffusers needs one value")
    return values.pop()


def _heads_per_level(arguments: Mapping[str, Any]) -> list[int]:
    """Attention heads at each level, as our encoder chooses them (fixed count, or width / head width)."""
    channels = [arguments["model_channels"] * mult for mult in arguments["channel_mult"]]
    if arguments["num_head_channels"] == -1:
        return [arguments["num_heads"]] * len(channels)
    return [width // arguments["num_head_channels"] for width in channels]


def _has_attention(arguments: Mapping[str, Any]) -> list[bool]:
    """Whether each level's blocks carry a spatial transformer (level i works at downsampling 2**i)."""
    return [2**level in arguments["attention_resolutions"] for level in range(len(arguments["channel_mult"]))]


# ---------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------


def diffusers_config(params: Mapping[str, Any]) -> dict[str, Any]:
    """config.json of the diffusers `ControlNetModel` equivalent to `ControlNet(**params)`."""
    arguments = _control_net_arguments(params)
    heads = _heads_per_level(arguments)
    return {
        "_class_name": DIFFUSERS_CLASS_NAME,
        "act_fn": "silu",
        # diffusers' historical name: for ControlNetModel this value is the number of heads, not their width.
        "attention_head_dim": heads[0] if len(set(heads)) == 1 else heads,
        "block_out_channels": [arguments["model_channels"] * mult for mult in arguments["channel_mult"]],
        "class_embed_type": None,
        "conditioning_channels": arguments["hint_channels"],
        "conditioning_embedding_out_channels": list(HINT_ENCODER_CHANNELS),
        "controlnet_conditioning_channel_order": "rgb",
        "cross_attention_dim": _single_value("context_dim", arguments["context_dim"]),
        "down_block_types": [
            "CrossAttnDownBlock2D" if attention else "DownBlock2D" for attention in _has_attention(arguments)
        ],
        "downsample_padding": 1,
        "flip_sin_to_cos": True,  # our timestep embedding is cos-then-sin
        "freq_shift": 0,
        "global_pool_conditions": False,
        "in_channels": arguments["in_channels"],
        "layers_per_block": _single_value("num_res_blocks", arguments["num_res_blocks"]),
        "mid_block_scale_factor": 1,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "norm_eps": 1e-5,
        "norm_num_groups": 32,
        "num_class_embeds": None,
        "only_cross_attention": False,
        "projection_class_embeddings_input_dim": None,
        "resnet_time_scale_shift": "default",
        "transformer_layers_per_block": _single_value("transformer_depth", arguments["transformer_depth"]),
        "upcast_attention": False,  # like our default "sdpa" attention backend
        "use_linear_projection": bool(arguments["use_linear_in_transformer"]),
    }


# ---------------------------------------------------------------------------------------------
# State-dict keys
# ---------------------------------------------------------------------------------------------


def _resblock_names(ours: str, theirs: str) -> dict[str, str]:
    """Sub-module prefixes of one ResBlock -> one ResnetBlock2D."""
    return {f"{ours}.{name}": f"{theirs}.{their_name}" for name, their_name in _RESBLOCK_NAMES.items()}


def _hint_encoder_names() -> dict[str, str]:
    """input_hint_block.{0, 2, ..., 14} -> controlnet_cond_embedding.{conv_in, blocks.0..5, conv_out}."""
    first, *middle, last = _HINT_CONV_INDICES
    names = {f"input_hint_block.{first}": "controlnet_cond_embedding.conv_in"}
    for block, index in enumerate(middle):
        names[f"input_hint_block.{index}"] = f"controlnet_cond_embedding.blocks.{block}"
    names[f"input_hint_block.{last}"] = "controlnet_cond_embedding.conv_out"
    return names


def _encoder_names(arguments: Mapping[str, Any]) -> dict[str, str]:
    """input_blocks / zero_convs -> down_blocks / controlnet_down_blocks, level by level."""
    layers = _single_value("num_res_blocks", arguments["num_res_blocks"])
    names = {"input_blocks.0.0": "conv_in", "zero_convs.0.0": "controlnet_down_blocks.0"}
    block = 1  # input_blocks.0 is the stem conv
    attention = _has_attention(arguments)
    for level in range(len(attention)):
        for layer in range(layers):
            names.update(_resblock_names(f"input_blocks.{block}.0", f"down_blocks.{level}.resnets.{layer}"))
            if attention[level]:
                names[f"input_blocks.{block}.1"] = f"down_blocks.{level}.attentions.{layer}"
            names[f"zero_convs.{block}.0"] = f"controlnet_down_blocks.{block}"
            block += 1
        if level < len(attention) - 1:
            names[f"input_blocks.{block}.0.op"] = f"down_blocks.{level}.downsamplers.0.conv"
            names[f"zero_convs.{block}.0"] = f"controlnet_down_blocks.{block}"
            block += 1
    return names


def diffusers_module_names(params: Mapping[str, Any]) -> dict[str, str]:
    """Every module of `ControlNet(**params)` that holds tensors -> its name in the diffusers `ControlNetModel`.

    A spatial transformer maps as a whole: its inner names (norm, proj_in, transformer_blocks, proj_out) agree.
    """
    arguments = _control_net_arguments(params)
    names = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2"}
    names.update(_hint_encoder_names())
    names.update(_encoder_names(arguments))
    names.update(_resblock_names("middle_block.0", "mid_block.resnets.0"))
    names["middle_block.1"] = "mid_block.attentions.0"
    names.update(_resblock_names("middle_block.2", "mid_block.resnets.1"))
    names["middle_block_out.0"] = "controlnet_mid_block"
    return names


def _rename(key: str, module_names: Mapping[str, str]) -> str | None:
    """`key` with its longest mapped module prefix replaced, or None when no prefix is mapped."""
    parts = key.split(".")
    for length in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:length])
        if prefix in module_names:
            return ".".join([module_names[prefix], *parts[length:]])
    return None


def to_diffusers_state_dict(
    state_dict: Mapping[str, torch.Tensor], params: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """A `ControlNet(**params).state_dict()` (keys without `control_model.`) under diffusers' key names."""
    module_names = diffusers_module_names(params)
    renamed: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, tensor in state_dict.items():
        new_key = _rename(key, module_names)
        if new_key is None:
            unknown.append(key)
        else:
            renamed[new_key] = tensor
    if unknown:
        shown = ", ".join(unknown[:3]) + (", ..." if len(unknown) > 3 else "")
        raise ValueError(f"{len(unknown)} ControlNet weights have no diffusers name ({shown}); they do not fit")
    return renamed


# ---------------------------------------------------------------------------------------------
# diffusers itself: an optional dependency
# ---------------------------------------------------------------------------------------------


def import_diffusers() -> ModuleType:
    """The `diffusers` package; ValueError with the install command when it is missing."""
    try:
        return importlib.import_module("diffusers")
    except ImportError as error:
        raise ValueError(
            "exporting to diffusers needs the optional 'diffusers' package, which is not installed; "
            "install it with `pip install diffusers`"
        ) from error


def check_against_diffusers(state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> None:
    """Raise ValueError unless diffusers' `ControlNetModel(config)` has exactly these keys and shapes."""
    diffusers = import_diffusers()
    with torch.device("meta"):  # shapes only: nothing is allocated or initialised
        expected = diffusers.ControlNetModel.from_config(dict(config)).state_dict()
    problems = [f"missing {key}" for key in expected if key not in state_dict]
    problems += [f"unexpected {key}" for key in state_dict if key not in expected]
    problems += [
        f"{key} {list(tensor.shape)} vs {list(expected[key].shape)}"
        for key, tensor in state_dict.items()
        if key in expected and tuple(tensor.shape) != tuple(expected[key].shape)
    ]
    if problems:
        shown = "; ".join(problems[:3]) + ("; ..." if len(problems) > 3 else "")
        raise ValueError(f"the converted weights do not fit diffusers' ControlNetModel ({len(problems)}: {shown})")
