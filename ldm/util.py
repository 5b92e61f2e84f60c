"""Small helpers shared by the whole code base: config instantiation, defaults, caption images."""
from __future__ import annotations

import importlib
import logging
import textwrap
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Special `target` strings of the original configs that stand for "no module".
_NONE_TARGETS = ("__is_first_stage__", "__is_unconditional__")


def to_device(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`tensor.to(device, dtype)` for a tensor made on the host during a step (noise, tokens): copied to a GPU
    through pinned memory without waiting, so the host keeps queueing work instead of stalling until the GPU has
    caught up (a plain copy from pageable memory synchronises). The values are the same."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device=device, dtype=dtype, non_blocking=True)
    return tensor.to(device=device, dtype=dtype)


def exists(value: Any) -> bool:
    """True when `value` is not None."""
    return value is not None


def default(value: T | None, fallback: T | Callable[[], T]) -> T:
    """`value` if it is set, else `fallback` (called when it is a function)."""
    if exists(value):
        return value
    return fallback() if callable(fallback) else fallback


def count_params(model: torch.nn.Module, verbose: bool = False) -> int:
    """Number of parameters of `model`; logs it in millions when `verbose`."""
    total = sum(p.numel() for p in model.parameters())
    if verbose:
        logger.info("%s has %.2f M params.", model.__class__.__name__, total * 1.0e-6)
    return total


def get_obj_from_str(string: str, reload: bool = False) -> Any:
    """Import `package.module.Name` and return `Name`; errors name the missing piece."""
    module_name, _, obj_name = string.rpartition(".")
    if not module_name:
        raise ImportError(f"target '{string}' is not a dotted path such as 'package.module.Class'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise ImportError(f"target '{string}': cannot import module '{module_name}' ({error})") from error
    if reload:
        module = importlib.reload(module)
    try:
        return getattr(module, obj_name)
    except AttributeError as error:
        raise ImportError(f"target '{string}': module '{module_name}' has no attribute '{obj_name}'") from error


def instantiate_from_config(config: Mapping[str, Any], **overrides: Any) -> Any:
    """Build `config['target'](**config.get('params', {}))`, as the original yaml files expect; `overrides` replace
    or add constructor arguments (Python objects too, which a yaml file cannot hold)."""
    if "target" not in config:
        if config in _NONE_TARGETS:
            return None
        raise KeyError(f"config has no 'target' key (keys: {sorted(config) if hasattr(config, 'keys') else config})")
    params = config.get("params", None) or {}
    return get_obj_from_str(config["target"])(**{**params, **overrides})


# ---------------------------------------------------------------------------------------------
# Captions as images (the "conditioning" panel of the image logs)
# ---------------------------------------------------------------------------------------------

def _caption_font(size: int) -> ImageFont.ImageFont:
    """A scalable font that ships with Pillow (no font file on disk needed)."""
    return ImageFont.load_default(size=size)


def log_txt_as_img(wh: tuple[int, int], captions: Iterable[str], size: int = 10) -> torch.Tensor:
    """Draw each caption as black text on a white `wh` canvas; returns (B, 3, H, W) in [-1, 1]."""
    width, height = wh
    font = _caption_font(size)
    chars_per_line = int(40 * (width / 256))
    images = []
    for caption in captions:
        canvas = Image.new("RGB", (width, height), color="white")
        text = "\n".join(textwrap.wrap(str(caption), chars_per_line)) if caption else ""
        ImageDraw.Draw(canvas).multiline_text((0, 0), text, fill="black", font=font)
        array = np.asarray(canvas, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0
        images.append(torch.from_numpy(array))
    if not images:
        return torch.empty(0, 3, height, width)
    return torch.stack(images)
