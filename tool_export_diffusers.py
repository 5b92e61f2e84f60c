"""Export ControlNet weights to a diffusers `ControlNetModel` folder (config.json + safetensors weights).

    python tool_export_diffusers.py ./models/control_sd15_canny.pth ./controlnet-canny
    python tool_export_diffusers.py control_sd21.safetensors ./controlnet-sd21 --config ./models/cldm_v21.yaml

The input is a full ControlLDM checkpoint or control-only weights (tool_extract_control.py). The folder loads with
`diffusers.ControlNetModel.from_pretrained(folder)` and gives the same residuals as our ControlNet.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence

from omegaconf import OmegaConf

from cldm.checkpoint_io import (
    CONTROL_PREFIX,
    atomic_folder,
    check_input_path,
    check_output_folder,
    read_state_dict,
    save_state_dict,
)
from cldm.cli import add_debug_argument, run
from cldm.diffusers_export import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    check_against_diffusers,
    diffusers_config,
    import_diffusers,
    to_diffusers_state_dict,
)
from cldm.model import check_config_path
from tool_extract_control import check_control_weights, extract_control, read_control_stage_config, to_half

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """Command line of the exporter."""
    parser = argparse.ArgumentParser(
        prog="tool_export_diffusers.py",
        description="Write ControlNet weights as a diffusers ControlNetModel folder.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("input_path", help="ControlLDM checkpoint or control-only weights (.ckpt, .pth, .safetensors)")
    parser.add_argument("output_dir", help="new diffusers model folder")
    parser.add_argument("--config", default="./models/cldm_v15.yaml",
                        help="ControlLDM config (yaml) whose ControlNet the weights fit")
    parser.add_argument("--half", action="store_true", help="store floating-point weights as float16")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    add_debug_argument(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Convert the control weights of a checkpoint and write the diffusers folder."""
    args = build_parser().parse_args(argv)
    start = time.perf_counter()

    # 1. cheap checks before reading the checkpoint
    diffusers = import_diffusers()
    check_input_path(args.input_path, role="input checkpoint")
    check_config_path(args.config)
    check_output_folder(args.output_dir, overwrite=args.overwrite, marker=CONFIG_NAME, kind="model folder")
    params = OmegaConf.to_container(read_control_stage_config(args.config).get("params", {}), resolve=True)
    config = {**diffusers_config(params), "_diffusers_version": diffusers.__version__}

    # 2. the control weights, checked against our ControlNet, renamed and checked against diffusers'
    control = extract_control(read_state_dict(args.input_path))
    check_control_weights(control, args.config, args.input_path)
    weights = to_diffusers_state_dict({key.removeprefix(CONTROL_PREFIX): t for key, t in control.items()}, params)
    check_against_diffusers(weights, config)
    if args.half:
        weights = to_half(weights)

    # 3. write config.json and the weights into a temporary folder that becomes the output
    with atomic_folder(args.output_dir) as folder:
        (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_state_dict(weights, folder / WEIGHTS_NAME)
    logger.info("Saved %d tensors to %s in %.1f s; load it with diffusers.ControlNetModel.from_pretrained(%r).",
                len(weights), args.output_dir, time.perf_counter() - start, str(args.output_dir))
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
