"""Move a ControlNet trained on base Stable Diffusion 1.5 onto a fine-tuned SD1.5 model.

    python tool_transfer_control.py --sd15 ./models/v1-5-pruned.ckpt --control ./models/control_sd15_openpose.pth \
        --input ./models/anything-v3-full.safetensors --output ./models/control_any3_openpose.pth

Every tensor with a UNet counterpart becomes `control + finetuned - base`; VAE and text encoder come from the
fine-tuned model; ControlNet-only layers are kept. The four paths may also be given as positionals in that order.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence

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
from cldm.surgery import FINETUNED_STAGE_PREFIXES, control_source_key, transfer_control

logger = logging.getLogger(__name__)

# The original's hard-coded paths, in positional order.
DEFAULT_PATHS = {
    "sd15": "./models/v1-5-pruned.ckpt",
    "control": "./models/control_sd15_openpose.pth",
    "input": "./models/anything-v3-full.safetensors",
    "output": "./models/control_any3_openpose.pth",
}
HELP = {
    "sd15": "the base Stable Diffusion checkpoint the ControlNet was trained on",
    "control": "the ControlNet checkpoint to transfer",
    "input": "the fine-tuned Stable Diffusion checkpoint to transfer to",
    "output": "the new checkpoint; .safetensors or .ckpt/.pth by extension",
}


def build_parser() -> argparse.ArgumentParser:
    """Command line: four optional positionals or the equivalent flags, defaulting to the original's paths."""
    parser = argparse.ArgumentParser(
        prog="tool_transfer_control.py",
        description="Transfer a ControlNet from base SD1.5 to a fine-tuned SD1.5 model (offset method).",
    )
    parser.add_argument("paths", nargs="*", metavar="PATH", help="sd15 control input output, in this order")
    for name, default in DEFAULT_PATHS.items():
        parser.add_argument(f"--{name}", default=None, help=f"{HELP[name]} (default: {default})")
    add_debug_argument(parser)
    return parser


def _resolve_paths(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, str]:
    """The four paths from positionals, flags and defaults; a path given both ways is an error."""
    if len(args.paths) > len(DEFAULT_PATHS):
        parser.error(f"expected at most {len(DEFAULT_PATHS)} paths ({' '.join(DEFAULT_PATHS)}), got {len(args.paths)}")
    paths = dict(zip(DEFAULT_PATHS, args.paths))
    for name, default in DEFAULT_PATHS.items():
        flagged = getattr(args, name)
        if flagged is not None and name in paths:
            parser.error(f"the {name} path is given both as a positional and as --{name}")
        paths.setdefault(name, flagged if flagged is not None else default)
    return paths


def _require(kind: str, allowed: Sequence[str], role: str, path: str, what: str) -> None:
    """Refuse a checkpoint whose detected kind is not among `allowed`."""
    if kind not in allowed:
        raise ValueError(f"{role} '{path}' looks like {BASE_MODEL_DESCRIPTIONS[kind]}; pass {what}")


def _check_kinds(paths: dict[str, str], base_kind: str, control_kind: str, finetuned_kind: str) -> None:
    """The base and fine-tuned models are the same plain SD version; the control file holds a ControlNet."""
    plain = ("sd1", "sd2")
    _require(base_kind, plain, "--sd15", paths["sd15"], "the plain Stable Diffusion checkpoint")
    _require(finetuned_kind, (base_kind,), "--input", paths["input"], f"a fine-tune of {paths['sd15']}")
    controls = ("controlnet-only", f"controlnet-{base_kind}")
    _require(control_kind, controls, "--control", paths["control"], f"a ControlNet for {paths['sd15']}")


def main(argv: Sequence[str] | None = None) -> int:
    """Transfer the ControlNet and save the result."""
    parser = build_parser()
    paths = _resolve_paths(parser, parser.parse_args(argv))
    start = time.perf_counter()

    # 1. cheap checks before any heavy work
    for name in ("sd15", "control", "input"):
        check_input_path(paths[name], role=f"--{name} checkpoint")
    checkpoint_format(paths["output"])
    check_output_path(paths["output"])

    # 2. read the three checkpoints and make sure each is what it should be
    base_sd = read_state_dict(paths["sd15"])
    control_sd = read_state_dict(paths["control"])
    finetuned_sd = read_state_dict(paths["input"])
    _check_kinds(paths, detect_base_model(base_sd), detect_base_model(control_sd), detect_base_model(finetuned_sd))

    # 3. transfer and save
    merged = transfer_control(control_sd, base_sd, finetuned_sd)
    save_state_dict(merged, paths["output"])

    offset = sum(
        1 for key in control_sd
        if not key.startswith(FINETUNED_STAGE_PREFIXES) and control_source_key(key) in finetuned_sd
    )
    logger.info(
        "Transferred model saved at %s: %d tensors, offset applied to %d, in %.1f s.",
        paths["output"], len(merged), offset, time.perf_counter() - start,
    )
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
