"""Make the initial ControlNet checkpoint from a Stable Diffusion 1.x checkpoint.

    python tool_add_control.py ./models/v1-5-pruned.ckpt ./models/control_sd15_ini.ckpt

The ControlNet encoder starts as a copy of the SD UNet encoder; the hint encoder, zero convolutions and
middle-block output are newly initialised (zero convolutions are zero).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import Counter
from collections.abc import Sequence

import torch

from cldm.checkpoint_io import (
    BASE_MODEL_DESCRIPTIONS,
    check_input_path,
    check_output_path,
    checkpoint_format,
    detect_base_model,
    read_state_dict,
    save_state_dict,
)
from cldm.cli import add_debug_argument, run
from cldm.model import check_config_path, create_model, load_weights
from cldm.surgery import add_control, control_source_key

logger = logging.getLogger(__name__)

# Per Stable Diffusion version: the script that handles it and its default config.
SCRIPTS = {"sd1": "tool_add_control.py", "sd2": "tool_add_control_sd21.py"}
DEFAULT_CONFIGS = {"sd1": "./models/cldm_v15.yaml", "sd2": "./models/cldm_v21.yaml"}


def build_parser(base: str) -> argparse.ArgumentParser:
    """Command line of the tool for Stable Diffusion version `base` ("sd1" or "sd2")."""
    parser = argparse.ArgumentParser(
        prog=SCRIPTS[base],
        description=f"Add a ControlNet, initialised from the UNet encoder, to {BASE_MODEL_DESCRIPTIONS[base]}.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("input_path", help="Stable Diffusion checkpoint (.ckpt, .pth or .safetensors)")
    parser.add_argument("output_path", help="new ControlNet checkpoint; .safetensors or .ckpt/.pth by extension")
    parser.add_argument("--config", default=DEFAULT_CONFIGS[base], help="ControlLDM model config (yaml)")
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed for the newly initialised hint-encoder weights; None leaves them unseeded, as the original",
    )
    add_debug_argument(parser)
    return parser


def _check_base_model(kind: str, base: str, input_path: str) -> None:
    """Refuse a checkpoint that is not the Stable Diffusion version this script handles."""
    if kind == base:
        return
    looks_like = f"'{input_path}' looks like {BASE_MODEL_DESCRIPTIONS[kind]}"
    if kind in SCRIPTS:
        raise ValueError(f"{looks_like}; use {SCRIPTS[kind]} for it")
    if kind.startswith("controlnet"):
        raise ValueError(f"{looks_like}; pass the plain Stable Diffusion checkpoint the ControlNet should be added to")
    if kind == "diffusers":
        raise ValueError(f"{looks_like}; pass the original single-file .ckpt or .safetensors checkpoint")
    raise ValueError(f"{looks_like}; expected {BASE_MODEL_DESCRIPTIONS[base]} with model.diffusion_model.* keys")


def _build_model(config: str, seed: int | None) -> torch.nn.Module:
    """The freshly initialised ControlLDM; with a seed, without touching the caller's RNG state."""
    if seed is None:
        return create_model(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_model(config)


def _group_by_module(keys: Sequence[str]) -> str:
    """`control_model.zero_convs (24), ...`: keys counted by their first two name components."""
    groups = Counter(".".join(key.split(".")[:2]) for key in keys)
    return ", ".join(f"{prefix} ({count})" for prefix, count in groups.items())


def main(argv: Sequence[str] | None = None, *, base: str = "sd1") -> int:
    """Add a ControlNet to a Stable Diffusion `base` checkpoint and save it."""
    args = build_parser(base).parse_args(argv)
    start = time.perf_counter()

    # 1. cheap checks before any heavy work
    check_input_path(args.input_path, role="input checkpoint")
    check_config_path(args.config)
    checkpoint_format(args.output_path)
    check_output_path(args.output_path)

    # 2. read the base model and make sure it is the right one
    base_state_dict = read_state_dict(args.input_path)
    _check_base_model(detect_base_model(base_state_dict), base, args.input_path)

    # 3. build the model, map the weights, load them strictly, save
    model = _build_model(args.config, args.seed)
    merged, newly_added = add_control(model.state_dict(), base_state_dict)
    load_weights(model, merged, source=args.input_path, config=args.config)
    used_keys = {control_source_key(key) for key in merged}
    ignored = sum(1 for key in base_state_dict if key not in used_keys)
    del merged, base_state_dict
    save_state_dict(model.state_dict(), args.output_path)

    logger.info(
        "Copied %d tensors from %s, newly added %d: %s; ignored %d input keys the model does not use.",
        len(model.state_dict()) - len(newly_added), args.input_path, len(newly_added),
        _group_by_module(newly_added) or "none", ignored,
    )
    logger.info("Done in %.1f s.", time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
