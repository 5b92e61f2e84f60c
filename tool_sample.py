"""Sample images from a trained ControlNet, as the original gradio apps do, from the command line.

    python tool_sample.py --ckpt ./models/control_sd15_canny.pth --hint edges.png --prompt "a bird" --out bird.png
    python tool_sample.py --base ./models/v1-5-pruned.ckpt --control ./models/control.safetensors --hint edges.png ...

Writes the grid `<out>` (hint map, then the samples) and each image on its own: `<stem>_hint.png`, `<stem>_<i>.png`.
"""
from __future__ import annotations

import argparse
import random
import sys
from collections.abc import Sequence

import numpy as np

from cldm.cli import add_debug_argument, run
from cldm.data.images import DEFAULT_MAX_IMAGE_PIXELS, check_pixel_limit
from cldm.sampling import (
    DEFAULT_A_PROMPT,
    DEFAULT_N_PROMPT,
    PRECISIONS,
    SampleSettings,
    add_weight_arguments,
    sample_to_files,
    weight_sources,
)

MAX_SEED = 2**32 - 1


def build_parser() -> argparse.ArgumentParser:
    """Command line of the sampler; defaults are the canny app's UI defaults."""
    parser = argparse.ArgumentParser(
        prog="tool_sample.py",
        description="Sample images from a ControlNet checkpoint and a hint image (DDIM, classifier-free guidance).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_weight_arguments(parser)
    parser.add_argument("--hint", required=True, help="hint image (edges, pose, ...); resized as the apps do")
    parser.add_argument("--prompt", default="", help="text prompt")
    parser.add_argument("--a_prompt", default=DEFAULT_A_PROMPT, help="added prompt, appended after ', '")
    parser.add_argument("--n_prompt", default=DEFAULT_N_PROMPT, help="negative prompt")
    parser.add_argument("--num_samples", type=int, default=1, help="images to sample")
    parser.add_argument("--ddim_steps", type=int, default=20, help="DDIM steps")
    parser.add_argument("--scale", type=float, default=9.0, help="classifier-free guidance scale")
    parser.add_argument("--strength", type=float, default=1.0, help="control strength (scales every residual)")
    parser.add_argument("--guess_mode", action="store_true", help="guess mode: no control in the negative pass, "
                        "residuals decaying towards the shallow blocks (try 50 steps and scale 3-5)")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic given the seed)")
    parser.add_argument("--seed", type=int, default=-1, help="random seed; -1 picks one in [0, 65535]")
    parser.add_argument("--resolution", type=int, default=512, help="short side of the hint, in pixels")
    parser.add_argument("--max_image_pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                        help="refuse a hint whose header gives more pixels than this, before decoding it (8192x8192)")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="32",
                        help="32: float32; bf16 / 16: autocast (16 on CUDA only)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--out", default="samples.png", help="grid PNG; the single images go next to it")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing output files (--out and its single images)")
    add_debug_argument(parser)
    return parser


def _check_numbers(args: argparse.Namespace) -> None:
    """Refuse values the sampler cannot use."""
    positive = {"--num_samples": args.num_samples, "--ddim_steps": args.ddim_steps, "--resolution": args.resolution}
    for flag, value in positive.items():
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    if args.ddim_steps > 1000:
        raise ValueError(f"--ddim_steps must be at most 1000 (the diffusion timesteps), got {args.ddim_steps}")
    for flag, value in {"--strength": args.strength, "--eta": args.eta, "--scale": args.scale}.items():
        if not np.isfinite(value) or value < 0:
            raise ValueError(f"{flag} must be a finite number >= 0, got {value}")
    check_pixel_limit(args.max_image_pixels, "--max_image_pixels")
    if not -1 <= args.seed <= MAX_SEED:
        raise ValueError(f"--seed must be -1 or in [0, {MAX_SEED}], got {args.seed}")


def main(argv: Sequence[str] | None = None) -> int:
    """Sample from a ControlNet and write the grid and the single images."""
    args = build_parser().parse_args(argv)
    _check_numbers(args)
    settings = SampleSettings(
        prompt=args.prompt, a_prompt=args.a_prompt, n_prompt=args.n_prompt, num_samples=args.num_samples,
        ddim_steps=args.ddim_steps, scale=args.scale, strength=args.strength, guess_mode=args.guess_mode,
        eta=args.eta, seed=args.seed if args.seed != -1 else random.randint(0, 65535), precision=args.precision,
    )
    sample_to_files(weight_sources(args), args.hint, args.out, settings, args.resolution, device_name=args.device,
                    overwrite=args.overwrite, max_image_pixels=args.max_image_pixels)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
