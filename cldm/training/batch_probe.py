"""`--batch_size max`: the largest batch whose training step fits in one GPU's memory, found by running the step.

Each candidate batch (1, 2, 4, ... up to the data set's size) is copies of one real item, so images, hints and a
latent cache have their true shapes. The probe runs forward and backward with the run's model, precision and
settings, with memory held back for AdamW's two state tensors per trainable parameter, and keeps a tenth of the
GPU free for the allocator's fragmentation and what Lightning adds; it stops at the first batch that does not fit.
The weights are not updated and the random streams are restored, so the run that follows is the one a user who
passed that number would get.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import default_collate

logger = logging.getLogger(__name__)

MAX_BATCH = "max"
MEMORY_FRACTION = 0.9
AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
ADAMW_STATE_TENSORS = 2


def batch_sizes_up_to(limit: int) -> list[int]:
    """1, 2, 4, ... and `limit` itself when it is not a power of two."""
    sizes = [1 << power for power in range(limit.bit_length()) if 1 << power <= limit]
    return sizes if sizes[-1] == limit else [*sizes, limit]


def largest_fitting(candidates: Iterable[int], fits: Callable[[int], bool]) -> int | None:
    """The last of the increasing `candidates` for which `fits` holds before the first that fails; None if the
    first fails."""
    largest = None
    for candidate in candidates:
        if not fits(candidate):
            break
        largest = candidate
    return largest


def largest_batch(model: pl.LightningModule, item: Mapping[str, Any], dataset_size: int, precision: str,
                  device: torch.device) -> int:
    """The largest batch of copies of `item` whose training step fits on the GPU `device` (see the module)."""
    model.to(device).train()
    budget = MEMORY_FRACTION * torch.cuda.get_device_properties(device).total_memory
    state_bytes = ADAMW_STATE_TENSORS * sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    autocast = AUTOCAST_DTYPES.get(precision)

    def fits(batch_size: int) -> bool:
        peak = _step_peak_memory(model, default_collate([item] * batch_size), state_bytes, autocast, device)
        logger.info("--batch_size max: batch %d %s", batch_size,
                    "does not fit" if peak is None else f"peaks at {peak / 2**30:.1f} GiB")
        return peak is not None and peak <= budget

    with torch.random.fork_rng(devices=[device]):
        largest = largest_fitting(batch_sizes_up_to(dataset_size), fits)
    if largest is None:
        raise ValueError(f"--batch_size max: not even one sample's training step fits in the "
                         f"{budget / 2**30:.0f} GiB of {torch.cuda.get_device_name(device)} that a run may use; "
                         "try --gradient_checkpointing or --frozen_dtype bfloat16 with --precision bf16-mixed")
    return largest


def _step_peak_memory(model: pl.LightningModule, batch: dict[str, Any], state_bytes: int,
                      autocast: torch.dtype | None, device: torch.device) -> int | None:
    """Peak GPU memory of forward and backward on `batch` beside `state_bytes` of optimizer state; None when it
    runs out of memory. Gradients are dropped afterwards."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    try:
        optimizer_state = torch.empty(state_bytes, dtype=torch.uint8, device=device)
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            loss, _ = model.shared_step(batch)
        loss.backward()
        del loss, optimizer_state
        return torch.cuda.max_memory_allocated(device)
    except torch.OutOfMemoryError:
        return None
    finally:
        model.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
