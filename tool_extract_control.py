"""Extract the control-only weights (`control_model.*`) from a ControlLDM checkpoint.

    python tool_extract_control.py ./lightning_logs/version_0/checkpoints/last.ckpt ./models/control_fill50k.safetensors

The output keeps the released files' key layout (`control_model.input_blocks.0.0.weight`, ...), so it loads
strictly next to a base Stable Diffusion checkpoint: `tool_sample.py --base v1-5-pruned.ckpt --control <output>`.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from cldm.checkpoint_io import (
    BASE_MODEL_DESCRIPTIONS,
    CONTROL_PREFIX,
    PathLike,
    check_input_path,
    check_output_path,
    checkpoint_format,
    describe_key_mismatch,
    detect_base_model,
    read_state_dict,
    save_state_dict,
)
from cldm.cli import add_debug_argument, run
from cldm.model import check_config_path
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


def read_control_stage_config(config_path: PathLike) -> DictConfig:
    """`model.params.control_stage_config` (target and params of the ControlNet) of a ControlLDM yaml file."""
    check_config_path(config_path)
    try:
        config = OmegaConf.load(config_path)
    except (yaml.YAMLError, UnicodeDecodeError, OmegaConfBaseException) as error:
        raise ValueError(f"config file '{config_path}' is not valid YAML ({error})") from error
    control = OmegaConf.select(config, "model.params.control_stage_config") if isinstance(config, DictConfig) else None
    if control is None:
        raise ValueError(
            f"config file '{config_path}' has no model.params.control_stage_config; pass a ControlLDM config "
            "such as ./models/cldm_v15.yaml"
        )
    return control


def check_control_weights(control: Mapping[str, torch.Tensor], config_path: PathLike, source: PathLike) -> None:
    """Raise ValueError unless `control` has exactly the keys and shapes of the config's ControlNet."""
    with torch.device("meta"):  # the shapes without allocating or initialising weights
        holder = nn.Module()
        holder.control_model = instantiate_from_config(read_control_stage_config(config_path))
    expected = holder.state_dict()
    missing = [key for key in expected if key not in control]
    unexpected = [key for key in control if key not in expected]
    mismatched = [
        (key, tuple(tensor.shape), tuple(expected[key].shape))
        for key, tensor in control.items()
        if key in expected and tuple(tensor.shape) != tuple(expected[key].shape)
    ]
    if missing or unexpected or mismatched:
        message = describe_key_mismatch(
            missing, unexpected, control, config_path, mismatched_shapes=mismatched, source=source
        )
        raise ValueError(message)


def default_output_path(input_path: PathLike) -> Path:
    """`<input stem>_control.safetensors` next to the input."""
    input_path = Path(input_path)
    return input_path.with_name(input_path.stem + OUTPUT_SUFFIX)


def build_parser() -> argparse.ArgumentParser:
    """Command line of the extractor."""
    parser = argparse.ArgumentParser(
        prog="tool_extract_control.py",
        description="Keep only the ControlNet weights (control_model.*) of a ControlLDM checkpoint.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("input_path", help="ControlLDM checkpoint: training .ckpt, released .pth or .safetensors")
    parser.add_argument(
        "output_path", nargs="?", default=None,
        help=f"control-only weights, .safetensors or .ckpt/.pth by extension (default: <input stem>{OUTPUT_SUFFIX})",
    )
    parser.add_argument("--half", action="store_true", help="store floating-point weights as float16")
    parser.add_argument("--config", default=None,
                        help="ControlLDM config (yaml) whose ControlNet the weights must fit exactly (optional check)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    add_debug_argument(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Extract the control weights of a checkpoint and save them."""
    args = build_parser().parse_args(argv)
    output_path = args.output_path or default_output_path(args.input_path)
    start = time.perf_counter()

    # 1. cheap checks before reading the checkpoint
    check_input_path(args.input_path, role="input checkpoint")
    if args.config is not None:
        check_config_path(args.config)
    checkpoint_format(output_path)
    check_output_path(output_path, overwrite=args.overwrite)

    # 2. extract, check, convert, save
    control = extract_control(read_state_dict(args.input_path))
    if args.config is not None:
        check_control_weights(control, args.config, args.input_path)
    if args.half:
        control = to_half(control)
    save_state_dict(control, output_path)
    size_mb = sum(t.numel() * t.element_size() for t in control.values()) / 2**20
    logger.info("Saved %d control tensors (%.1f MiB) to %s in %.1f s.", len(control), size_mb, output_path,
                time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
