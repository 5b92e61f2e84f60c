"""Does a pretrained tiny base draw Fill50K targets? Scores its VAE's reconstructions and its own samples.

tool_pretrain_tiny_sd.py trains a base model (VAE, then text-conditioned UNet) on generated Fill50K targets. This
script measures it on `--count` held-out pairs (generated with `--data_seed`, a seed the training data did not use):

* **VAE reconstructions** of the targets (the posterior's mode, decoded), scored by the control metrics against the
  item's own hint: the edge F1 says whether outlines survive the 8x latent, the colour error whether hues do. They
  bound what any ControlNet on this base can reach.
* **Base samples** at each `--guidance_scales` value: the base alone (a ControlNet added by `tool_add_control.py` is a no-op until trained, its zero
  convolutions output zero), prompted with the items' prompts, DDIM with classifier-free guidance as in training's
  evaluation. The base chooses where to draw, so each sample's circle is found in the sample itself: the Canny edges
  of the sample are fitted with a circle (`fit_circle`); the circle counts as detected when its radius lies in
  Fill50K's range and at least `MIN_SUPPORT` of the edge pixels lie within the edge tolerance of it. The colour
  error is then measured inside and outside that circle against the prompt's two colours.

Run from the repository root:

    python -m benchmarks.eval_demo_base --base models/demo_sd.safetensors --config models/cldm_demo.yaml
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import cv2
import numpy as np
import torch

from cldm.checkpoints.initial_weights import make_initial_checkpoint
from cldm.data.dataset import MyDataset
from cldm.data.fill50k import OUTLINE_BGR, OUTLINE_THICKNESS, generate_fill50k, radius_range
from cldm.evaluation.evaluate import dataset_items, sample_items, score_images
from cldm.evaluation.metrics import (
    BACKGROUND_COLOUR_ERROR, CIRCLE_COLOUR_ERROR, COLOUR_ERROR, CONTROL_F1, CONTROL_PRECISION, CONTROL_RECALL, canny,
    colour_errors, edge_tolerance, fit_circle,
)
from cldm.sampling import load_control_ldm, to_uint8_images

# A detected circle: at least this fraction of the sample's edge pixels lie on it (within the edge tolerance).
MIN_SUPPORT = 0.6
# The fitted radius may miss Fill50K's range (`radius_range`) by this many pixels.
RADIUS_SLACK = 2.0
# What the reconstructions are scored by (`control_metrics`) and what `sample_scores` measures, in the order printed.
RECONSTRUCTION_ROWS = (CONTROL_F1, CONTROL_PRECISION, CONTROL_RECALL, COLOUR_ERROR, CIRCLE_COLOUR_ERROR,
                       BACKGROUND_COLOUR_ERROR)
SAMPLE_ROWS = ("circle detected", COLOUR_ERROR, CIRCLE_COLOUR_ERROR, BACKGROUND_COLOUR_ERROR, "centre x std (px)",
               "centre y std (px)")


def detect_circle(image: np.ndarray) -> tuple[float, float, float] | None:
    """(x, y, radius) of the circle the image's Canny edges lie on, or None when they do not form one."""
    smallest, largest = radius_range(min(image.shape[:2]))
    edges = canny(image[None])[0]
    circle = fit_circle(edges)
    if circle is None:
        return None
    x, y, radius = circle
    if not smallest - RADIUS_SLACK <= radius <= largest + RADIUS_SLACK:
        return None
    rows, columns = np.nonzero(edges)
    on_circle = np.abs(np.hypot(columns - x, rows - y) - radius) <= edge_tolerance(*image.shape[:2])
    return circle if on_circle.mean() >= MIN_SUPPORT else None


def outline_hint(circle: tuple[float, float, float], shape: tuple[int, ...]) -> np.ndarray:
    """A Fill50K-style hint (white outline on black) of `circle`, for `colour_errors`."""
    hint = np.zeros(shape, np.uint8)
    x, y, radius = circle
    cv2.circle(hint, (round(x), round(y)), round(radius), OUTLINE_BGR, OUTLINE_THICKNESS, cv2.LINE_AA)
    return hint


def reconstructions(model: torch.nn.Module, targets: np.ndarray) -> list[np.ndarray]:
    """The VAE's reconstructions (posterior mode, decoded) of uint8 targets (N, H, W, 3)."""
    with torch.inference_mode():
        pixels = torch.from_numpy(targets).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        decoded = model.first_stage_model.decode(model.first_stage_model.encode(pixels).mode())
    return list(to_uint8_images(decoded))


def sample_scores(samples: list[np.ndarray], prompts: list[str]) -> dict[str, float]:
    """Detection rate, colour errors inside and outside the detected circles, and the spread of their centres."""
    found = [(image, prompt, detect_circle(image)) for image, prompt in zip(samples, prompts)]
    found = [(image, prompt, circle) for image, prompt, circle in found if circle is not None]
    scores = {"circle detected": len(found) / len(samples)}
    if found:
        images = np.stack([image for image, _, _ in found])
        hints = np.stack([outline_hint(circle, image.shape) for image, _, circle in found])
        errors = colour_errors(images, hints, [prompt for _, prompt, _ in found])
        scores.update({name: float(np.nanmean(values)) for name, values in errors.items()})
        centres = np.array([circle[:2] for _, _, circle in found])
        scores["centre x std (px)"], scores["centre y std (px)"] = (float(v) for v in centres.std(axis=0))
    return scores


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="the base checkpoint (Stable Diffusion layout)")
    parser.add_argument("--config", type=Path, default=Path("models/cldm_demo.yaml"))
    parser.add_argument("--count", type=int, default=64, help="held-out pairs (default: %(default)s)")
    parser.add_argument("--size", type=int, default=64, help="their size in px (default: %(default)s)")
    parser.add_argument("--data_seed", type=int, default=7, help="the held-out pairs' generator seed")
    parser.add_argument("--ddim_steps", type=int, default=20)
    parser.add_argument("--guidance_scales", type=float, nargs="+", default=[3.0, 9.0],
                        help="sample at each of these classifier-free guidance scales (default: %(default)s)")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as scratch:
        data, initial = Path(scratch, "held_out"), Path(scratch, "control_ini.ckpt")
        generate_fill50k(data, count=args.count, size=args.size, seed=args.data_seed, show_progress=False)
        make_initial_checkpoint(args.base, initial, args.config)
        model = load_control_ldm(args.config, ckpt=initial)
        items = dataset_items(MyDataset(data), range(args.count))

    targets = np.stack([item.target for item in items])
    reconstructed = score_images(reconstructions(model, targets), items).means()
    prompts = [item.prompt for item in items]
    drawn = [sample_scores(sample_items(model, items, ddim_steps=args.ddim_steps, guidance_scale=scale), prompts)
             for scale in args.guidance_scales]

    print(f"{args.base} on {args.count} held-out pairs of {args.size} px, {args.ddim_steps} DDIM steps\n")
    print("| VAE reconstructions | value |\n|---|---|")
    for name in RECONSTRUCTION_ROWS:
        print(f"| {name} | {reconstructed[name]:.3f} |")
    print("\n| samples, guidance scale | " + " | ".join(f"{scale:g}" for scale in args.guidance_scales) + " |")
    print("|---|" + "---|" * len(args.guidance_scales))
    for name in SAMPLE_ROWS:
        print(f"| {name} | " + " | ".join(f"{scores.get(name, float('nan')):.3f}" for scores in drawn) + " |")


if __name__ == "__main__":
    main()
