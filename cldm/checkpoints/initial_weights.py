"""The initial ControlNet checkpoint: a Stable Diffusion checkpoint plus a ControlNet initialised from its UNet
encoder (what tool_add_control.py and tool_add_control_sd21.py run).

The hint encoder, zero convolutions and middle-block output are newly initialised (zero convolutions are zero).

Memory: the model is built on the meta device (keys and shapes only), only the ControlNet is built for the new
weights (before anything else is read), and the input is read one tensor at a time, only the tensors the output
uses, so the peak is about the output's size rather than input + model + output.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Iterator, Sequence

import torch

from cldm.checkpoints.kinds import BASE_MODEL_DESCRIPTIONS, CONTROL_PREFIX, detect_base_model
from cldm.checkpoints.paths import check_output_path, checkpoint_format
from cldm.checkpoints.saving import save_state_dict
from cldm.checkpoints.surgery import add_control, control_source_key
from cldm.model import check_config_path, check_weights_fit, create_control_model, create_model, model_state_shapes
from ldm.checkpoint import PathLike, check_input_path, open_state_dict

logger = logging.getLogger(__name__)

# Per Stable Diffusion version: the script that handles it and its default config.
SCRIPTS = {"sd1": "tool_add_control.py", "sd2": "tool_add_control_sd21.py"}
DEFAULT_CONFIGS = {"sd1": "./models/cldm_v15.yaml", "sd2": "./models/cldm_v21.yaml"}


def _check_base_model(kind: str, base: str, input_path: PathLike) -> None:
    """Refuse a checkpoint that is not the Stable Diffusion version this script handles."""
    if kind == base:
        return
    looks_like = f"'{input_path}' looks like {BASE_MODEL_DESCRIPTIONS[kind]}"
    if kind in SCRIPTS:
        raise ValueError(f"{looks_like}; use {SCRIPTS[kind]} for it")
    if kind.startswith("controlnet"):
        raise ValueError(f"{looks_like}; pass the plain Stable Diffusion checkpoint the ControlNet should be added to")
    if kind == "diffusers":
        raise ValueError(f"{looks_like}; pass the original single-file .ckpt or .safetensors checkpoint")
    raise ValueError(f"{looks_like}; expected {BASE_MODEL_DESCRIPTIONS[base]} with model.diffusion_model.* keys")


@contextlib.contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Seed torch's CPU generator inside the block without touching the caller's RNG state; None: no seeding."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _fresh_tensors(config: PathLike, keys: Sequence[str], seed: int | None) -> dict[str, torch.Tensor]:
    """Freshly initialised values of the model's `keys`: from the ControlNet alone when they all belong to it (the
    case of every full SD checkpoint), else from the whole model."""
    if not keys:
        return {}
    control_only = all(key.startswith(CONTROL_PREFIX) for key in keys)
    with _seeded(seed):
        module = create_control_model(config) if control_only else create_model(config)
    state = module.state_dict()
    prefix = CONTROL_PREFIX if control_only else ""
    return {key: state[key.removeprefix(prefix)] for key in keys}


def _as_saved(tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`tensor` as loading it into the model and saving the model's state dict gave: in the model's dtype, holding
    its own storage (a view of a larger storage would make torch.save write all of it)."""
    if tensor.dtype != like.dtype:
        return tensor.to(like.dtype)
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        return tensor.clone()
    return tensor


def _group_by_module(keys: Sequence[str]) -> str:
    """`control_model.zero_convs (24), ...`: keys counted by their first two name components."""
    groups = Counter(".".join(key.split(".")[:2]) for key in keys)
    return ", ".join(f"{prefix} ({count})" for prefix, count in groups.items())


def make_initial_checkpoint(input_path: PathLike, output_path: PathLike, config: PathLike, base: str = "sd1",
                            seed: int | None = None) -> None:
    """Add a ControlNet, initialised from the UNet encoder, to the Stable Diffusion `base` checkpoint `input_path`
    and save the ControlLDM of `config` to `output_path`; `seed` seeds the newly initialised weights."""
    start = time.perf_counter()

    # 1. cheap checks before any heavy work
    check_input_path(input_path, role="input checkpoint")
    check_config_path(config)
    checkpoint_format(output_path)
    check_output_path(output_path)

    # 2. open the base model (keys and shapes; tensors are read when used) and make sure it is the right one
    base_state_dict = open_state_dict(input_path)
    _check_base_model(detect_base_model(base_state_dict.meta), base, input_path)

    # 3. learn the model's keys and shapes (meta device); initialise the weights the input lacks before the copies
    # are read, so that the module built for them and the copies are never in memory together
    model_shapes = model_state_shapes(config)
    uncopied = [key for key in model_shapes if control_source_key(key) not in base_state_dict]
    fresh = _fresh_tensors(config, uncopied, seed)

    # 4. read and map the weights one at a time, check them, save
    merged, newly_added = add_control({**model_shapes, **fresh}, base_state_dict)
    check_weights_fit(model_shapes, merged, source=input_path, config=config)
    for key, tensor in merged.items():  # one at a time: a converted copy replaces its source before the next
        merged[key] = _as_saved(tensor, model_shapes[key])
    used_keys = {control_source_key(key) for key in merged}
    ignored = sum(1 for key in base_state_dict if key not in used_keys)
    del base_state_dict
    save_state_dict(merged, output_path)

    logger.info(
        "Copied %d tensors from %s, newly added %d: %s; ignored %d input keys the model does not use.",
        len(merged) - len(newly_added), input_path, len(newly_added),
        _group_by_module(newly_added) or "none", ignored,
    )
    logger.info("Done in %.1f s.", time.perf_counter() - start)
