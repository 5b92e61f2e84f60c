"""Pretrain a tiny Stable Diffusion base from scratch on Fill50K targets: the VAE, then the text-conditioned UNet.

    python tool_pretrain_tiny_sd.py --config models/cldm_demo.yaml --out ./my_demo_sd.safetensors --half
    python tool_add_control.py ./my_demo_sd.safetensors ./models/control_demo_ini.ckpt --config models/cldm_demo.yaml

With its defaults and --half --overwrite it remakes models/demo_sd.safetensors, the base `make demo` trains on.

Without --data_root, --count Fill50K pairs of --size px are generated in --work_dir. The run is deterministic for a
--seed; the finished VAE stage is kept in --work_dir (vae-<hash>.ckpt) and reused by a later run with the same VAE
settings, so a run stopped in the UNet stage, or one that tries other UNet settings, starts from there.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from cldm import flags
from cldm.cli import add_debug_argument, run
from cldm.training.pretrain import LR_SCHEDULES, PretrainSettings, pretrain, settings_from
from ldm.modules.losses.reconstruction import PIXEL_LOSSES

DEFAULTS = PretrainSettings(config="./models/cldm_demo.yaml", out="./models/demo_sd.safetensors",
                            work_dir="./pretrain_work")


def _add_stage_flags(add: Callable[..., Any], stage: str, model: str, optimizer: str) -> None:
    """--<stage>_steps, --<stage>_learning_rate and --<stage>_batch_size of the stage that trains `model`."""
    add(f"--{stage}_steps", type=flags.positive_int, default=getattr(DEFAULTS, f"{stage}_steps"),
        help=f"{model} training steps (default: %(default)s)")
    add(f"--{stage}_learning_rate", type=flags.positive_finite_float,
        default=getattr(DEFAULTS, f"{stage}_learning_rate"), help=f"{model} {optimizer} learning rate "
        "(default: %(default)s)")
    add(f"--{stage}_batch_size", type=flags.positive_int, default=getattr(DEFAULTS, f"{stage}_batch_size"),
        help=f"{model} batch size (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    """Command line of the tool."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--config", type=flags.path, default=DEFAULTS.config, help="ControlLDM config whose base is trained "
        "(default: %(default)s)")
    add("--out", type=flags.path, default=DEFAULTS.out, help="base checkpoint to write, .ckpt or .safetensors "
        "(default: %(default)s)")
    add("--overwrite", action="store_true", help="replace an existing --out")
    add("--half", action="store_true", help="store the base's floating-point weights as float16 (half the size)")
    add("--work_dir", type=flags.path, default=DEFAULTS.work_dir, help="logs, generated data and the finished VAE "
        "stage (default: %(default)s)")
    add("--data_root", type=flags.path, default=None, help="a Fill50K-layout data set to train on (default: "
        "generate one in --work_dir)")
    add("--count", type=flags.positive_int, default=DEFAULTS.count, help="pairs to generate without --data_root "
        "(default: %(default)s)")
    add("--size", type=flags.integer(8, 4096), default=DEFAULTS.size, help="side in px of the generated pairs "
        "(default: %(default)s)")
    _add_stage_flags(add, "vae", "VAE", "Adam")
    add("--kl_weight", type=flags.non_negative_finite_float, default=DEFAULTS.kl_weight,
        help="weight of the VAE's KL term (default: %(default)s)")
    add("--vae_pixel_loss", choices=PIXEL_LOSSES, default=DEFAULTS.vae_pixel_loss, help="the VAE's pixel error: "
        "l1 (mean absolute) or l2 (mean squared, which learns Fill50K's hues sooner) (default: %(default)s)")
    add("--vae_initial_logvar", type=flags.real(-30.0, 20.0), default=DEFAULTS.vae_initial_logvar,
        help="the VAE posterior's log-variance at the start, narrow so that the decoder sees the encoder's means "
        "from the first step (default: %(default)s)")
    _add_stage_flags(add, "unet", "UNet", "AdamW")
    add("--unet_lr_schedule", choices=LR_SCHEDULES, default=DEFAULTS.unet_lr_schedule, help="the UNet stage's "
        "learning rate: constant, or falling along a half cosine to 0 at its last step (default: %(default)s)")
    add("--prompt_dropout", type=flags.probability, default=DEFAULTS.prompt_dropout, help="probability of an "
        "empty prompt in the UNet stage, which gives the base an unconditional mode for guidance "
        "(default: %(default)s)")
    add("--train_text_encoder", action=argparse.BooleanOptionalAction, default=DEFAULTS.train_text_encoder,
        help="train the text encoder, random at the start, with the UNet; --no-train_text_encoder keeps it "
        "frozen random (default: %(default)s)")
    add("--seed", type=flags.seed, default=DEFAULTS.seed, help="seed of the data, weights and noise "
        "(default: %(default)s)")
    add("--accelerator", choices=("cpu", "gpu"), default=DEFAULTS.accelerator, help="where to train "
        "(default: %(default)s)")
    add("--devices", type=flags.integer(1, 1), default=DEFAULTS.devices, help="devices to train on: one, as the "
        "stages run in one process (default: %(default)s)")
    add_debug_argument(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Pretrain the base and write its checkpoint."""
    return pretrain(settings_from(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(run(main))
