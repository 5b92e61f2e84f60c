"""Score a ControlLDM on a fixed set of items: sample each hint with a fixed seed, then measure control fidelity.

`evaluate_control` serves both the evaluation during training and `tool_eval_control.py`: it samples as
`ControlLDM.log_images` does (DDIM, the item's prompt guided against the empty prompt, the hint in both passes),
in eval mode, without gradients and without moving any global random stream, so training after it follows the
same trajectory as without it.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import cv2
import numpy as np
import torch

from cldm.evaluation.metrics import Detector, control_metrics
from cldm.logger import eval_mode, preserved_random_state
from cldm.sampling import LATENT_FACTOR, make_grid, save_png, to_uint8_images
from ldm.checkpoint import PathLike

DEFAULT_BATCH_SIZE = 8
# The grid shows this many (hint, sample) pairs per row.
GRID_PAIRS_PER_ROW = 4


class EvalItem(NamedTuple):
    """One item to evaluate: its hint (uint8 RGB (H, W, 3)), its prompt, its target if known (uint8 RGB), and its
    index in the data set (for reports only); a plain (hint, prompt) or (hint, prompt, target) tuple also works."""

    hint: np.ndarray
    prompt: str
    target: np.ndarray | None = None
    index: int | None = None


class Summary(NamedTuple):
    """Mean, spread and range of one metric over the items where it is defined (`count` of them)."""

    mean: float
    std: float
    min: float
    max: float
    count: int


@dataclass
class EvaluationResult:
    """Per-item metrics (name -> (N,) array, NaN where a metric does not apply) and the images they score."""

    items: list[EvalItem]
    images: list[np.ndarray]
    metrics: dict[str, np.ndarray]

    def summary(self) -> dict[str, Summary]:
        """Each metric defined for at least one item, over those items (the population std, ddof 0)."""
        summaries = {}
        for name, values in self.metrics.items():
            values = values[~np.isnan(values)]
            if len(values):
                summaries[name] = Summary(float(values.mean()), float(values.std()), float(values.min()),
                                          float(values.max()), len(values))
        return summaries

    def means(self) -> dict[str, float]:
        """{name: mean} of the defined metrics: what training logs as `val/<name>`."""
        return {name: summary.mean for name, summary in self.summary().items()}

    def per_item(self) -> list[dict[str, object]]:
        """One record per item: index, prompt and every metric (None where it does not apply)."""
        records = []
        for position, item in enumerate(self.items):
            record: dict[str, object] = {"index": item.index if item.index is not None else position,
                                         "prompt": item.prompt}
            for name, values in self.metrics.items():
                value = float(values[position])
                record[name] = None if math.isnan(value) else value
            records.append(record)
        return records


def dataset_items(dataset: Sequence[Mapping[str, object]], indices: Iterable[int]) -> list[EvalItem]:
    """Items `indices` of a `MyDataset`-like data set (hint in [0, 1], `jpg` in [-1, 1], both float32 (H, W, 3);
    `txt`) as uint8 `EvalItem`s; build the data set without prompt dropout. A latent-cache item has no target."""
    items = []
    for index in indices:
        record = dataset[index]
        target = record.get("jpg")
        items.append(EvalItem(
            hint=np.rint(np.asarray(record["hint"]) * 255.0).astype(np.uint8),
            prompt=str(record["txt"]),
            target=None if target is None else np.rint((np.asarray(target) + 1.0) * 127.5).astype(np.uint8),
            index=index,
        ))
    return items


# ---------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------


def score_images(images: Sequence[np.ndarray], items: Sequence[EvalItem | tuple],
                 detector: Detector | None = None) -> EvaluationResult:
    """Score images (uint8 RGB (H, W, 3), one per item, each the size of its hint) with `control_metrics`."""
    items = [EvalItem(*item) for item in items]
    if len(images) != len(items):
        raise ValueError(f"got {len(images)} images for {len(items)} items")
    per_item = [
        control_metrics(image[None], item.hint[None], [item.prompt], detector) for image, item in zip(images, items)
    ]
    metrics = {name: np.concatenate([values[name] for values in per_item]) for name in per_item[0]}
    return EvaluationResult(items, list(images), metrics)


# ---------------------------------------------------------------------------------------------
# Sampling with fixed seeds
# ---------------------------------------------------------------------------------------------


def item_noise(seed: int, position: int, shape: Sequence[int]) -> torch.Tensor:
    """The starting latent x_T of item `position`: float32 standard normal noise from NumPy's generator seeded by
    (seed, position), so it depends on nothing else (not the batch, the device or any global random state)."""
    return torch.from_numpy(np.random.default_rng([seed, position]).standard_normal(tuple(shape), dtype=np.float32))


def _seed_ddim_noise(device: torch.device, seed: int, position: int) -> None:
    """Seed the one generator DDIM draws its per-step noise from (the device's default generator) from
    (seed, position); used when eta > 0."""
    item_seed = int(np.random.default_rng([seed, position, 1]).integers(2**63))
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(item_seed)
    else:
        torch.random.default_generator.manual_seed(item_seed)


def _batches(items: Sequence[EvalItem], batch_size: int) -> Iterator[range]:
    """Positions of consecutive items with hints of one size, at most `batch_size` at a time."""
    start = 0
    for end in range(1, len(items) + 1):
        if end - start == batch_size or end == len(items) or items[end].hint.shape != items[start].hint.shape:
            yield range(start, end)
            start = end


def _sample_batch(model: torch.nn.Module, batch: Sequence[EvalItem], noise: torch.Tensor, ddim_steps: int,
                  guidance_scale: float, eta: float) -> np.ndarray:
    """DDIM samples for one batch of same-size items, as `ControlLDM.log_images` draws its guided samples."""
    n = len(batch)
    hints = torch.from_numpy(np.stack([item.hint for item in batch])).to(model.device)
    control = hints.permute(0, 3, 1, 2).float() / 255.0  # (N, 3, H, W) in [0, 1], as the data set's hint
    # With a latent cache the training job keeps the text encoder on the CPU (`CachedEncodersOnCPU`).
    context = model.get_learned_conditioning([item.prompt for item in batch]).to(model.device)
    cond = {"c_concat": [control], "c_crossattn": [context]}
    uncond = {"c_concat": [control], "c_crossattn": [model.get_unconditional_conditioning(n)]}
    latents, _ = model.sample_log(cond=cond, batch_size=n, ddim=True, ddim_steps=ddim_steps, eta=eta,
                                  unconditional_guidance_scale=guidance_scale, unconditional_conditioning=uncond,
                                  x_T=noise.to(model.device))
    return to_uint8_images(model.decode_first_stage(latents))


def sample_items(model: torch.nn.Module, items: Sequence[EvalItem | tuple], *, ddim_steps: int = 20,
                 guidance_scale: float = 9.0, seed: int = 0, eta: float = 0.0,
                 batch_size: int = DEFAULT_BATCH_SIZE,
                 autocast: Callable[[], contextlib.AbstractContextManager] | None = None) -> list[np.ndarray]:
    """One sample (uint8 RGB, the hint's size) per item, with the noise of item i depending only on (seed, i).

    Runs in eval mode under `torch.inference_mode`, on the model's device, each batch under `autocast()` when given
    (e.g. `trainer.precision_plugin.forward_context`), and leaves the Python, NumPy and torch random states and
    every module's training flag as it found them. With eta > 0 DDIM draws fresh noise at each step from torch's
    generator: items are then sampled one at a time, each after seeding it from (seed, i).
    """
    items = [EvalItem(*item) for item in items]
    if ddim_steps < 1 or batch_size < 1:
        raise ValueError(f"ddim_steps and batch_size must be at least 1, got {ddim_steps} and {batch_size}")
    autocast = autocast or contextlib.nullcontext
    samples: list[np.ndarray] = []
    with eval_mode(model), preserved_random_state(model.device), torch.inference_mode():
        for positions in _batches(items, batch_size if eta == 0 else 1):
            batch = [items[i] for i in positions]
            height, width = batch[0].hint.shape[:2]
            shape = (model.channels, height // LATENT_FACTOR, width // LATENT_FACTOR)
            noise = torch.stack([item_noise(seed, i, shape) for i in positions])
            if eta > 0:
                _seed_ddim_noise(model.device, seed, positions.start)
            with autocast():
                samples.extend(_sample_batch(model, batch, noise, ddim_steps, guidance_scale, eta))
    return samples


def evaluate_control(model: torch.nn.Module, items: Sequence[EvalItem | tuple], *, ddim_steps: int = 20,
                     guidance_scale: float = 9.0, seed: int = 0, eta: float = 0.0,
                     batch_size: int = DEFAULT_BATCH_SIZE,
                     autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
                     detector: Detector | None = None) -> EvaluationResult:
    """Sample every item with fixed seeds (`sample_items`) and score the samples (`score_images`).

    Args:
        model: a ControlLDM; it is left in its training mode, on its device, with its weights untouched.
        items: (hint uint8 RGB (H, W, 3) with sides multiples of 8, prompt[, target[, index]]).
        ddim_steps, guidance_scale, eta: DDIM settings (guidance against the empty prompt, as log_images).
        seed: item i starts from `item_noise(seed, i, ...)`, whatever the batch size.
        autocast: a factory of the context each batch runs under, for a model that runs in mixed precision.
        detector: the hint's annotator for soft hints; adds `control_ssim`.
    """
    items = [EvalItem(*item) for item in items]
    images = sample_items(model, items, ddim_steps=ddim_steps, guidance_scale=guidance_scale, seed=seed, eta=eta,
                          batch_size=batch_size, autocast=autocast)
    return score_images(images, items, detector)


# ---------------------------------------------------------------------------------------------
# The grid
# ---------------------------------------------------------------------------------------------


def pairs_grid(result: EvaluationResult, pairs_per_row: int = GRID_PAIRS_PER_ROW) -> np.ndarray:
    """(hint, image) side by side for every item, `pairs_per_row` pairs a row; other sizes scaled to the first's."""
    height, width = result.items[0].hint.shape[:2]
    tiles = []
    for item, image in zip(result.items, result.images):
        for tile in (item.hint, image):
            tiles.append(tile if tile.shape[:2] == (height, width) else cv2.resize(tile, (width, height)))
    return make_grid(tiles, columns=2 * pairs_per_row)


def write_grid(result: EvaluationResult, path: PathLike, pairs_per_row: int = GRID_PAIRS_PER_ROW) -> None:
    """Write `pairs_grid(result)` as a PNG, atomically."""
    save_png(pairs_grid(result, pairs_per_row), path)

