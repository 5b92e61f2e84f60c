"""Sample images from a trained ControlNet, as the original gradio apps do, from the command line.

    python tool_sample.py --ckpt ./models/control_sd15_canny.pth --hint edges.png --prompt "a bird" --out bird.png
    python tool_sample.py --base ./models/v1-5-pruned.ckpt --control ./models/control.safetensors --hint edges.png ...

Writes the grid `<out>` (hint map, then the samples) and each image on its own: `<stem>_hint.png`, `<stem>_<i>.png`.
"""
from __future__ import annotations

import argparse
import logging
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cldm.checkpoints.atomic import atomic_write
from cldm.checkpoints.paths import check_output_path
from ldm.checkpoint import PathLike
from cldm.cli import add_debug_argument, run
from cldm.sampling import (
    DEFAULT_A_PROMPT,
    DEFAULT_N_PROMPT,
    PRECISIONS,
    SampleSettings,
    autocast_context,
    load_control_ldm,
    prepare_hint,
    read_image,
    sample_images,
)

logger = logging.getLogger(__name__)

GRID_COLUMNS = 4
MAX_SEED = 2**32 - 1


def build_parser() -> argparse.ArgumentParser:
    """Command line of the sampler; defaults are the canny app's UI defaults."""
    parser = argparse.ArgumentParser(
        prog="tool_sample.py",
        description="Sample images from a ControlNet checkpoint and a hint image (DDIM, classifier-free guidance).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", default="./models/cldm_v15.yaml", help="ControlLDM model config (yaml)")
    parser.add_argument("--ckpt", help="full ControlLDM checkpoint (training output or released control_sd15_*.pth)")
    parser.add_argument("--base", help="Stable Diffusion checkpoint, used with --control instead of --ckpt")
    parser.add_argument("--control", help="control-only weights (tool_extract_control.py), used with --base")
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
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="32",
                        help="32: float32; bf16 / 16: autocast (16 on CUDA only)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--out", default="samples.png", help="grid PNG; the single images go next to it")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
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
    if not -1 <= args.seed <= MAX_SEED:
        raise ValueError(f"--seed must be -1 or in [0, {MAX_SEED}], got {args.seed}")


def _device(name: str | None) -> torch.device:
    """The requested device, or CUDA when available, else the CPU."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"--device '{name}' is not a torch device ({error})") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device '{name}' asks for CUDA, which is not available here; use --device cpu")
    return device


def output_paths(out: PathLike, num_samples: int) -> dict[str, Path]:
    """{"grid": <out>, "hint": <stem>_hint.png, "0": <stem>_0.png, ...}."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out '{out}' must be a .png file")
    paths = {"grid": out, "hint": out.with_name(f"{out.stem}_hint.png")}
    paths.update({str(i): out.with_name(f"{out.stem}_{i}.png") for i in range(num_samples)})
    return paths


def make_grid(images: Sequence[np.ndarray], columns: int = GRID_COLUMNS) -> np.ndarray:
    """Same-size uint8 (H, W, 3) images in rows of `columns`, black where the last row is short."""
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    height, width, channels = images[0].shape
    grid = np.zeros((rows * height, columns * width, channels), dtype=np.uint8)
    for i, image in enumerate(images):
        row, column = divmod(i, columns)
        grid[row * height:(row + 1) * height, column * width:(column + 1) * width] = image
    return grid


def save_png(image: np.ndarray, path: PathLike) -> None:
    """Write a uint8 (H, W, 3) RGB image as PNG, atomically."""
    with atomic_write(path) as file:
        Image.fromarray(image).save(file, format="PNG")


def main(argv: Sequence[str] | None = None) -> int:
    """Sample from a ControlNet and write the grid and the single images."""
    args = build_parser().parse_args(argv)

    # 1. cheap checks before loading anything
    _check_numbers(args)
    device = _device(args.device)
    autocast_context(args.precision, device)
    paths = output_paths(args.out, args.num_samples)
    for path in paths.values():
        check_output_path(path, overwrite=args.overwrite)
    hint = prepare_hint(read_image(args.hint), args.resolution)

    # 2. the model, then the samples
    model = load_control_ldm(args.config, ckpt=args.ckpt, base=args.base, control=args.control).to(device)
    seed = args.seed if args.seed != -1 else random.randint(0, 65535)
    settings = SampleSettings(
        prompt=args.prompt, a_prompt=args.a_prompt, n_prompt=args.n_prompt, num_samples=args.num_samples,
        ddim_steps=args.ddim_steps, scale=args.scale, strength=args.strength, guess_mode=args.guess_mode,
        eta=args.eta, seed=seed, precision=args.precision,
    )
    logger.info("Sampling %d image(s) of %dx%d with seed %d", args.num_samples, hint.shape[1], hint.shape[0], seed)
    start = time.perf_counter()
    images = sample_images(model, hint, settings)
    logger.info("Sampled in %.1f s", time.perf_counter() - start)

    # 3. outputs: single images first, the grid last
    save_png(hint, paths["hint"])
    for i, image in enumerate(images):
        save_png(image, paths[str(i)])
    save_png(make_grid([hint, *images]), paths["grid"])
    logger.info("Saved %s and %d single images next to it", paths["grid"], len(images) + 1)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
