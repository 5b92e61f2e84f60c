"""Control-only weights: the `control_model.*` entries of a ControlLDM checkpoint, checked against a config."""
from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from cldm.checkpoints.kinds import BASE_MODEL_DESCRIPTIONS, CONTROL_PREFIX, detect_base_model
from cldm.checkpoints.paths import check_output_path, checkpoint_format
from cldm.checkpoints.saving import save_state_dict
from cldm.model import check_config_path, check_weights_fit, read_control_stage_config
from ldm.checkpoint import PathLike, check_input_path, read_state_dict
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)

OUTPUT_SUFFIX = "_control.safetensors"


def extract_control(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The `control_model.*` entries of a ControlLDM state dict, keys unchanged."""
    control = {key: tensor for key, tensor in state_dict.items() if key.startswith(CONTROL_PREFIX)}
    if not control:
        kind = BASE_MODEL_DESCRIPTIONS[detect_base_model(state_dict)]
        raise ValueError(f"the checkpoint has no '{CONTROL_PREFIX}*' weights; it looks like {kind}")
    return control


def to_half(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating-point tensors as float16; other tensors unchanged."""
    return {key: t.half() if t.is_floating_point() else t for key, t in state_dict.items()}


def check_control_weights(control: Mapping[str, torch.Tensor], config_path: PathLike, source: PathLike) -> None:
    """Raise ValueError unless `control` has exactly the keys and shapes of the config's ControlNet."""
    with torch.device("meta"):  # the shapes without allocating or initialising weights
        holder = nn.Module()
        holder.control_model = instantiate_from_config(read_control_stage_config(config_path))
    check_weights_fit(holder.state_dict(), control, source=source, config=config_path)


def default_output_path(input_path: PathLike) -> Path:
    """`<input stem>_control.safetensors` next to the input."""
    input_path = Path(input_path)
    return input_path.with_name(input_path.stem + OUTPUT_SUFFIX)


def extract_control_file(input_path: PathLike, output_path: PathLike | None = None, config: PathLike | None = None,
                         half: bool = False, overwrite: bool = False) -> Path:
    """Save the control weights of the checkpoint `input_path` to `output_path` (default: `default_output_path`),
    checked against the ControlNet of `config` when given; returns the output path."""
    output_path = Path(output_path) if output_path is not None else default_output_path(input_path)
    start = time.perf_counter()

    # 1. cheap checks before reading the checkpoint
    check_input_path(input_path, role="input checkpoint")
    if config is not None:
        check_config_path(config)
    checkpoint_format(output_path)
    check_output_path(output_path, overwrite=overwrite)

    # 2. extract, check, convert, save
    control = extract_control(read_state_dict(input_path))
    if config is not None:
        check_control_weights(control, config, input_path)
    if half:
        control = to_half(control)
    save_state_dict(control, output_path)
    size_mb = sum(t.numel() * t.element_size() for t in control.values()) / 2**20
    logger.info("Saved %d control tensors (%.1f MiB) to %s in %.1f s.", len(control), size_mb, output_path,
                time.perf_counter() - start)
    return output_path
