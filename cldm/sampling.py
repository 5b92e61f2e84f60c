"""Inference with a ControlLDM the way the original gradio apps do it: load weights, prepare the hint, sample, and
write the grid and the single images (what tool_sample.py runs)."""
from __future__ import annotations

import argparse
import contextlib
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import torch
from einops import rearrange
from PIL import Image
from pytorch_lightning import seed_everything

from cldm import flags
from cldm.checkpoints.kinds import BASE_MODEL_DESCRIPTIONS, CONTROL_PREFIX, detect_base_model
from cldm.checkpoints.atomic import atomic_write
from cldm.checkpoints.paths import check_output_path
from cldm.data.images import DEFAULT_MAX_IMAGE_PIXELS, TooManyPixelsError, UnreadableImageError, read_unchanged
from cldm.ddim_hacked import DDIMSampler
from cldm.model import check_config_path, create_model, load_weights
from ldm.checkpoint import PathLike, check_input_path, read_state_dict

logger = logging.getLogger(__name__)

# The canny app's defaults for the added and the negative prompt.
DEFAULT_A_PROMPT = "best quality, extremely detailed"
DEFAULT_N_PROMPT = (
    "longbody, lowres, bad anatomy, bad hands, missing fingers, extra digit, fewer digits, cropped, "
    "worst quality, low quality"
)
# The latent grid is 1/8 of the image; both sides are rounded to multiples of 64 as in the apps.
LATENT_FACTOR = 8
SIDE_MULTIPLE = 64
# A hint whose long side is more than this many times its short side is refused: scaled so that the short side is
# --resolution, it would make a sample of many megapixels (a 1x5000 px hint: 512x2560000 px).
MAX_HINT_ASPECT_RATIO = 4
# --precision values: autocast dtype (None: full float32) and the devices it may run on.
PRECISIONS = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}
_PRECISION_DEVICES = {"32": ("cpu", "cuda"), "bf16": ("cpu", "cuda"), "16": ("cuda",)}

# ---------------------------------------------------------------------------------------------
# Weights: a full checkpoint, or a base Stable Diffusion plus control-only weights
# ---------------------------------------------------------------------------------------------


def merge_base_and_control(
    model_keys: Iterable[str], base: Mapping[str, torch.Tensor], control: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """One ControlLDM state dict from base SD weights and `control_model.*` weights; returns (merged, ignored keys).

    The control weights must all be `control_model.*`; base keys the model lacks (e.g. `model_ema.*`) are ignored.
    Missing keys are left for the strict load to report.
    """
    not_control = [key for key in control if not key.startswith(CONTROL_PREFIX)]
    if not_control:
        raise ValueError(
            f"the control weights hold {len(not_control)} keys outside '{CONTROL_PREFIX}*' (e.g. '{not_control[0]}'); "
            "pass control-only weights (see tool_extract_control.py)"
        )
    model_keys = set(model_keys)
    merged = {key: tensor for key, tensor in base.items() if key in model_keys and not key.startswith(CONTROL_PREFIX)}
    ignored = [key for key in base if key not in merged]
    merged.update(control)
    return merged, ignored


def _check_kind(
    state_dict: Mapping[str, torch.Tensor], path: PathLike, flag: str, allowed: tuple[str, ...], advice: str
) -> None:
    """Refuse weights that `detect_base_model` classifies as none of `allowed`; `advice` says what to pass."""
    kind = detect_base_model(state_dict)
    if kind not in allowed:
        raise ValueError(f"{flag} '{path}' looks like {BASE_MODEL_DESCRIPTIONS[kind]}; {advice}")


def _check_weight_sources(ckpt: PathLike | None, base: PathLike | None, control: PathLike | None) -> None:
    """Exactly one source of weights: `ckpt`, or `base` and `control` together; each an existing file."""
    if (ckpt is None) == (base is None and control is None):
        raise ValueError("give either --ckpt (a full checkpoint), or --base and --control")
    if ckpt is None and (base is None or control is None):
        raise ValueError("--base and --control go together; give both")
    for path, flag in ((ckpt, "--ckpt"), (base, "--base"), (control, "--control")):
        if path is not None:
            check_input_path(path, role=f"{flag} checkpoint")


def load_control_ldm(
    config: PathLike, *, ckpt: PathLike | None = None, base: PathLike | None = None, control: PathLike | None = None
) -> torch.nn.Module:
    """A ControlLDM from `config` in eval mode, weights loaded strictly from `ckpt`, or from `base` plus `control`."""
    _check_weight_sources(ckpt, base, control)
    check_config_path(config)
    if ckpt is None:
        base_weights, control_weights = read_state_dict(base), read_state_dict(control)
        _check_kind(base_weights, base, "--base", ("sd1", "sd2"), "pass a plain Stable Diffusion checkpoint")
        _check_kind(control_weights, control, "--control", ("controlnet-only",),
                    "pass control-only weights (tool_extract_control.py); a full checkpoint goes to --ckpt")
        model = create_model(config)
        state_dict, ignored = merge_base_and_control(model.state_dict(), base_weights, control_weights)
        if ignored:
            logger.info("Ignored %d keys of %s that the model does not use", len(ignored), base)
        load_weights(model, state_dict, source=f"{base} + {control}", config=config)
    else:
        state_dict = read_state_dict(ckpt)
        _check_kind(state_dict, ckpt, "--ckpt", ("controlnet-sd1", "controlnet-sd2", "unknown"),
                    "pass a checkpoint that holds a ControlNet and its base model (a training checkpoint or "
                    "tool_add_control.py's output), or the base model as --base and control-only weights as --control")
        model = create_model(config)
        load_weights(model, state_dict, source=ckpt, config=config)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# The hint image
# ---------------------------------------------------------------------------------------------


def read_image(path: PathLike, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """An image file as uint8 (H, W) gray, (H, W, 3) RGB or (H, W, 4) RGBA; refused before decoding when its header
    gives more than `max_pixels` pixels, and refused when one side is over `MAX_HINT_ASPECT_RATIO` times the other."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"hint image '{path}' does not exist; check the path")
    if not path.is_file():
        raise IsADirectoryError(f"hint image '{path}' is a folder; pass an image file")
    try:
        image = read_unchanged(path, max_pixels)
    except UnreadableImageError:
        raise ValueError(f"hint image '{path}' cannot be read as an image; pass a PNG, JPEG or other common "
                         f"format") from None
    except TooManyPixelsError as error:
        raise ValueError(f"hint image '{path}' is {error.size_text()}, more than the {error.limit} pixels allowed; "
                         f"shrink it, or raise the limit with --max_image_pixels") from None
    height, width = image.shape[:2]
    if max(height, width) > MAX_HINT_ASPECT_RATIO * min(height, width):
        raise ValueError(f"hint image '{path}' is {width}x{height} px, one side more than {MAX_HINT_ASPECT_RATIO} times "
                         f"the other; crop or pad it to an aspect ratio of at most {MAX_HINT_ASPECT_RATIO}:1")
    if image.dtype == np.uint16:
        image = (image // 257).astype(np.uint8)
    if image.dtype != np.uint8:
        raise ValueError(f"hint image '{path}' has {image.dtype} pixels; pass an 8- or 16-bit image")
    if image.ndim == 3 and image.shape[2] in (3, 4):
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB if image.shape[2] == 3 else cv2.COLOR_BGRA2RGBA)
    return image


def hwc3(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3): gray is repeated, RGBA is composited over white (the apps' HWC3)."""
    if image.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an image of shape (H, W) or (H, W, 1|3|4), got {image.shape}")
    channels = image.shape[2]
    if channels == 3:
        return image
    if channels == 1:
        return np.concatenate([image] * 3, axis=2)
    color = image[:, :, :3].astype(np.float32)
    alpha = image[:, :, 3:].astype(np.float32) / 255.0
    return (color * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).astype(np.uint8)


def resize_image(image: np.ndarray, resolution: int) -> np.ndarray:
    """Scale so the short side is `resolution`, then round both sides to multiples of 64 (the apps' resize_image)."""
    height, width = image.shape[:2]
    k = float(resolution) / min(height, width)
    new_height = int(np.round(height * k / SIDE_MULTIPLE)) * SIDE_MULTIPLE
    new_width = int(np.round(width * k / SIDE_MULTIPLE)) * SIDE_MULTIPLE
    if new_height == 0 or new_width == 0:
        raise ValueError(
            f"an image of {width}x{height} at resolution {resolution} rounds to a side of 0 px; raise the resolution"
        )
    interpolation = cv2.INTER_LANCZOS4 if k > 1 else cv2.INTER_AREA
    return cv2.resize(image, (new_width, new_height), interpolation=interpolation)


def prepare_hint(image: np.ndarray, resolution: int) -> np.ndarray:
    """The hint map the model sees: uint8 (H, W, 3) with H and W multiples of 64."""
    return resize_image(hwc3(image), resolution)


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


@dataclass
class SampleSettings:
    """What the apps' UI sets: prompts, batch, DDIM steps, guidance, control strength, guess mode, seed."""

    prompt: str = ""
    a_prompt: str = DEFAULT_A_PROMPT
    n_prompt: str = DEFAULT_N_PROMPT
    num_samples: int = 1
    ddim_steps: int = 20
    scale: float = 9.0
    strength: float = 1.0
    guess_mode: bool = False
    eta: float = 0.0
    seed: int = 0
    precision: str = "32"


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """`torch.autocast` for "16"/"bf16" (float16 only on CUDA), nothing for "32"."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision '{precision}' is not one of {sorted(PRECISIONS)}")
    if device.type not in _PRECISION_DEVICES[precision]:
        raise ValueError(f"precision '{precision}' is not supported on {device.type}; use one of 32, bf16")
    if PRECISIONS[precision] is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=PRECISIONS[precision])


@torch.no_grad()
def sample_images(
    model: torch.nn.Module, hint: np.ndarray, settings: SampleSettings, verbose: bool = True
) -> np.ndarray:
    """Images (N, H, W, 3) uint8 for a prepared hint map (H, W, 3) uint8, as the gradio apps compute them."""
    device, n = model.device, settings.num_samples
    height, width = hint.shape[:2]
    # 1. hint: (N, 3, H, W) in [0, 1], laid out in memory as the apps do (a permuted copy of N stacked HWC maps)
    control = torch.from_numpy(hint.copy()).float().to(device) / 255.0
    control = rearrange(torch.stack([control] * n), "b h w c -> b c h w").clone()
    # 2. seed, then the conditional and the unconditional inputs (guess mode: no control without the prompt)
    seed_everything(settings.seed, verbose=False)
    with autocast_context(settings.precision, device):
        cond = {
            "c_concat": [control],
            "c_crossattn": [model.get_learned_conditioning([f"{settings.prompt}, {settings.a_prompt}"] * n)],
        }
        un_cond = {
            "c_concat": None if settings.guess_mode else [control],
            "c_crossattn": [model.get_learned_conditioning([settings.n_prompt] * n)],
        }
        # 3. DDIM with two-pass guidance, at the requested control strength
        model.set_control_strength(settings.strength, settings.guess_mode)
        shape = (model.channels, height // LATENT_FACTOR, width // LATENT_FACTOR)
        latents, _ = DDIMSampler(model).sample(
            settings.ddim_steps, n, shape, cond, verbose=verbose, eta=settings.eta,
            unconditional_guidance_scale=settings.scale, unconditional_conditioning=un_cond,
        )
        # 4. decode to uint8 HWC
        images = model.decode_first_stage(latents)
    return to_uint8_images(images)


def to_uint8_images(images: torch.Tensor) -> np.ndarray:
    """Decoded images (N, 3, H, W) in [-1, 1] as uint8 (N, H, W, 3) on the host, as the apps convert them."""
    images = rearrange(images.float(), "b c h w -> b h w c") * 127.5 + 127.5
    return images.cpu().numpy().clip(0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Files: the device, the grid and the single images
# ---------------------------------------------------------------------------------------------

GRID_COLUMNS = 4


def choose_device(name: str | None) -> torch.device:
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


class WeightSources(NamedTuple):
    """Where the weights come from: a full ControlLDM checkpoint, or a base model plus control-only weights."""

    config: PathLike
    ckpt: PathLike | None = None
    base: PathLike | None = None
    control: PathLike | None = None


def add_weight_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that name the weights: --config, and --ckpt or --base with --control."""
    parser.add_argument("--config", type=flags.path, default="./models/cldm_v15.yaml",
                        help="ControlLDM model config (yaml)")
    parser.add_argument("--ckpt", type=flags.path,
                        help="full ControlLDM checkpoint (training output or released control_sd15_*.pth)")
    parser.add_argument("--base", type=flags.path,
                        help="Stable Diffusion checkpoint, used with --control instead of --ckpt")
    parser.add_argument("--control", type=flags.path,
                        help="control-only weights (tool_extract_control.py), used with --base")


def weight_sources(args: argparse.Namespace) -> WeightSources:
    """The `WeightSources` of the flags `add_weight_arguments` adds."""
    return WeightSources(args.config, ckpt=args.ckpt, base=args.base, control=args.control)


def sample_to_files(weights: WeightSources, hint_path: PathLike, out: PathLike, settings: SampleSettings,
                    resolution: int, device_name: str | None = None, overwrite: bool = False,
                    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> None:
    """Sample from the ControlLDM of `weights` for the hint image `hint_path`; write the grid `out` (hint map, then
    the samples) and each image on its own next to it. A hint with more than `max_image_pixels` pixels is refused."""
    # 1. cheap checks before loading anything
    device = choose_device(device_name)
    autocast_context(settings.precision, device)
    paths = output_paths(out, settings.num_samples)
    for path in paths.values():
        check_output_path(path, overwrite=overwrite)
    hint = prepare_hint(read_image(hint_path, max_image_pixels), resolution)

    # 2. the model, then the samples
    model = load_control_ldm(weights.config, ckpt=weights.ckpt, base=weights.base, control=weights.control)
    model = model.to(device)
    logger.info("Sampling %d image(s) of %dx%d with seed %d", settings.num_samples, hint.shape[1], hint.shape[0],
                settings.seed)
    start = time.perf_counter()
    images = sample_images(model, hint, settings)
    logger.info("Sampled in %.1f s", time.perf_counter() - start)

    # 3. outputs: single images first, the grid last
    save_png(hint, paths["hint"])
    for i, image in enumerate(images):
        save_png(image, paths[str(i)])
    save_png(make_grid([hint, *images]), paths["grid"])
    logger.info("Saved %s and %d single images next to it", paths["grid"], len(images) + 1)

