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


from cldm import flags
from cldm.cli import add_debug_argument, run
from cldm.data.images import DEFAULT_MAX_IMAGE_PIXELS, check_pixel_limit, check_resolution_pixels
from cldm.sampling import (
    DEFAULT_A_PROMPT,
    DEFAULT_N_PROMPT,
    PRECISIONS,
    SampleSettings,
    add_weight_arguments,
    sample_to_files,
    weight_sources,
)

# Images sampled in one batch; the apps' slider stops at 12.
MAX_SAMPLES = 100
_seed = flags.integer(0, flags.SEED_MAX, sentinel=-1, sentinel_meaning="pick one")


def build_parser() -> argparse.ArgumentParser:
    """Command line of the sampler; defaults are the canny app's UI defaults."""
    parser = argparse.ArgumentParser(
        prog="tool_sample.py",
        description="Sample images from a ControlNet checkpoint and a hint image (DDIM, classifier-free guidance).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_weight_arguments(parser)
    parser.add_argument("--hint", type=flags.path, required=True,
                        help="hint image (edges, pose, ...); resized as the apps do")
    parser.add_argument("--prompt", default="", help="text prompt")
    parser.add_argument("--a_prompt", default=DEFAULT_A_PROMPT, help="added prompt, appended after ', '")
    parser.add_argument("--n_prompt", default=DEFAULT_N_PROMPT, help="negative prompt")
    parser.add_argument("--num_samples", type=flags.integer(1, MAX_SAMPLES), default=1, help="images to sample")
    parser.add_argument("--ddim_steps", type=flags.ddim_steps, default=20, help="DDIM steps")
    parser.add_argument("--scale", type=flags.non_negative_finite_float, default=9.0,
                        help="classifier-free guidance scale")
    parser.add_argument("--strength", type=flags.non_negative_finite_float, default=1.0,
                        help="control strength (scales every residual)")
    parser.add_argument("--guess_mode", action="store_true", help="guess mode: no control in the negative pass, "
                        "residuals decaying towards the shallow blocks (try 50 steps and scale 3-5)")
    parser.add_argument("--eta", type=flags.non_negative_finite_float, default=0.0,
                        help="DDIM eta (0: deterministic given the seed)")
    parser.add_argument("--seed", type=_seed, default=-1,
                        help="random seed; -1 picks one in [0, 65535]")
    parser.add_argument("--resolution", type=flags.positive_int, default=512, help="short side of the hint, in pixels")
    parser.add_argument("--max_image_pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                        help="refuse a hint whose header gives more pixels than this, before decoding it (8192x8192)")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="32",
                        help="32: float32; bf16 / 16: autocast (16 on CUDA only)")
    parser.add_argument("--device", type=flags.device, default=None,
                        help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--out", type=flags.path, default="samples.png",
                        help="grid PNG; the single images go next to it")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing output files (--out and its single images)")
    add_debug_argument(parser)
    return parser


def _check_numbers(args: argparse.Namespace) -> None:
    """Refuse combinations of values the sampler cannot use (each flag's own range is checked by its type)."""
    check_pixel_limit(args.max_image_pixels, "--max_image_pixels")
    check_resolution_pixels(args.resolution, args.max_image_pixels)


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
