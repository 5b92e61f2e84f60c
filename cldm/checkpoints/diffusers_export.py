"""Our ControlNet in diffusers' layout: `ControlNetModel` config.json values and state-dict key names.

The mappings need no diffusers import: `diffusers_config` turns the `ControlNet` constructor arguments (the
`control_stage_config.params` of a yaml file) into the config of an equivalent `diffusers.ControlNetModel`,
and `to_diffusers_state_dict` renames a `ControlNet.state_dict()` to that model's keys. The tensors are the same:
diffusers' blocks compute what ours compute (cos-then-sin timestep embedding, GroupNorm(32) with eps 1e-5 in
the ResBlocks, the same spatial transformer), so no weight is reshaped. `export_diffusers` writes the model folder
(what tool_export_diffusers.py runs).
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from omegaconf import OmegaConf

from cldm.checkpoints.atomic import atomic_path
from cldm.checkpoints.extraction import check_control_weights, extract_control, to_half
from cldm.checkpoints.kinds import CONTROL_PREFIX
from cldm.checkpoints.paths import check_output_path
from cldm.checkpoints.saving import save_state_dict
from cldm.model import check_config_path, key_mismatch, read_control_stage_config
from ldm.checkpoint import PathLike, check_input_path, read_state_dict
from ldm.modules.diffusionmodules.openaimodel import UNetConfig

logger = logging.getLogger(__name__)

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
    fields = {field.name: field for field in dataclasses.fields(UNetConfig)}
    required = ["hint_channels"] + [name for name, field in fields.items() if field.default is dataclasses.MISSING]
    unknown = [name for name in params if name not in fields and name != "hint_channels"]
    missing = [name for name in required if name not in params]
    if unknown or missing:
        problem = f"unknown {', '.join(unknown)}" if unknown else f"missing {', '.join(missing)}"
        raise ValueError(f"the ControlNet parameters do not fit ControlNet's constructor: {problem}")
    defaults = {name: field.default for name, field in fields.items() if field.default is not dataclasses.MISSING}
    arguments = {**defaults, **params}
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
    missing, unexpected, mismatched = key_mismatch(expected, state_dict)
    problems = [f"missing {key}" for key in missing] + [f"unexpected {key}" for key in unexpected]
    problems += [f"{key} {list(got)} vs {list(want)}" for key, got, want in mismatched]
    if problems:
        shown = "; ".join(problems[:3]) + ("; ..." if len(problems) > 3 else "")
        raise ValueError(f"the converted weights do not fit diffusers' ControlNetModel ({len(problems)}: {shown})")


# ---------------------------------------------------------------------------------------------
# The model folder
# ---------------------------------------------------------------------------------------------


def export_diffusers(input_path: PathLike, output_dir: PathLike, config_path: PathLike, half: bool = False,
                     overwrite: bool = False) -> None:
    """Convert the control weights of the checkpoint `input_path` (checked against the ControlNet of
    `config_path`) and write them with their config.json as the diffusers model folder `output_dir`."""
    start = time.perf_counter()
    # 1. cheap checks before reading the checkpoint
    diffusers = import_diffusers()
    check_input_path(input_path, role="input checkpoint")
    check_config_path(config_path)
    check_output_path(output_dir, overwrite=overwrite, folder=True, marker=CONFIG_NAME,
                      kind="ControlNet model folder", marker_fields={"_class_name": DIFFUSERS_CLASS_NAME})
    params = OmegaConf.to_container(read_control_stage_config(config_path).get("params", {}), resolve=True)
    config = {**diffusers_config(params), "_diffusers_version": diffusers.__version__}

    # 2. the control weights, checked against our ControlNet, renamed and checked against diffusers'
    control = extract_control(read_state_dict(input_path))
    check_control_weights(control, config_path, input_path)
    weights = to_diffusers_state_dict({key.removeprefix(CONTROL_PREFIX): t for key, t in control.items()}, params)
    check_against_diffusers(weights, config)
    if half:
        weights = to_half(weights)

    # 3. write config.json and the weights into a temporary folder that becomes the output
    with atomic_path(output_dir, folder=True) as folder:
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_state_dict(weights, folder / WEIGHTS_NAME)
    logger.info("Saved %d tensors to %s in %.1f s; load it with diffusers.ControlNetModel.from_pretrained(%r).",
                len(weights), output_dir, time.perf_counter() - start, str(output_dir))

