"""Which model a state dict holds (from its key names and shapes), and key-mismatch messages that say so."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ldm.checkpoint import PathLike

UNET_PREFIX = "model.diffusion_model."
CONTROL_PREFIX = "control_model."

BASE_MODEL_DESCRIPTIONS = {
    "sd1": "a Stable Diffusion 1.x model",
    "sd2": "a Stable Diffusion 2.x model",
    "controlnet-sd1": "a Stable Diffusion 1.x model with a ControlNet",
    "controlnet-sd2": "a Stable Diffusion 2.x model with a ControlNet",
    "controlnet-only": "ControlNet weights without a base model",
    "diffusers": "a diffusers-format model",
    "unknown": "no known Stable Diffusion layout",
}

_CONTEXT_DIM_VERSIONS = {768: "sd1", 1024: "sd2"}
# ControlNet weights stored without the `control_model.` prefix.
_BARE_CONTROLNET_PREFIXES = ("input_hint_block.", "zero_convs.", "middle_block_out.")
_DIFFUSERS_PREFIXES = ("conv_in.", "time_embedding.", "controlnet_cond_embedding.")
_DIFFUSERS_PARTS = ("down_blocks.", "mid_block.", "up_blocks.")


def _shape(value: Any) -> tuple[int, ...] | None:
    shape = getattr(value, "shape", None)
    return None if shape is None else tuple(shape)


def _sd_version(state_dict: Mapping[str, Any]) -> str | None:
    """"sd1"/"sd2" from the cross-attention width, else the proj_in layout, else the text encoder's keys."""
    branches = (UNET_PREFIX, CONTROL_PREFIX)
    for key, value in state_dict.items():
        shape = _shape(value)
        if key.startswith(branches) and key.endswith("attn2.to_k.weight") and shape and len(shape) == 2:
            if shape[1] in _CONTEXT_DIM_VERSIONS:
                return _CONTEXT_DIM_VERSIONS[shape[1]]
    for key, value in state_dict.items():
        shape = _shape(value)
        if key.startswith(branches) and key.endswith("proj_in.weight") and shape and len(shape) in (2, 4):
            return "sd1" if len(shape) == 4 else "sd2"  # SD2.x configs use linear projections in transformers
    if any(key.startswith("cond_stage_model.transformer.") for key in state_dict):
        return "sd1"
    if any(key.startswith("cond_stage_model.model.") for key in state_dict):
        return "sd2"
    return None


def detect_base_model(state_dict: Mapping[str, Any]) -> str:
    """Which model a state dict holds: one of the keys of `BASE_MODEL_DESCRIPTIONS`."""
    keys = list(state_dict)
    has_unet = any(key.startswith(UNET_PREFIX) for key in keys)
    has_control = any(key.startswith(CONTROL_PREFIX) for key in keys)
    if not has_unet:
        if has_control or any(key.startswith(_BARE_CONTROLNET_PREFIXES) for key in keys):
            return "controlnet-only"
        if any(key.startswith(_DIFFUSERS_PREFIXES) or any(p in key for p in _DIFFUSERS_PARTS) for key in keys):
            return "diffusers"
        return "unknown"
    if any(key.startswith("conditioner.") for key in keys):  # SDXL and later
        return "unknown"
    version = _sd_version(state_dict)
    if version is None:
        return "unknown"
    return f"controlnet-{version}" if has_control else version


def _first_names(keys: Iterable[str], count: int = 3) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:count])
    return shown + (", ..." if len(keys) > count else "")


def describe_key_mismatch(
    missing: Iterable[str],
    unexpected: Iterable[str],
    checkpoint_state_dict: Mapping[str, Any],
    config_path: PathLike | None,
    *,
    mismatched_shapes: Iterable[tuple[str, tuple[int, ...], tuple[int, ...]]] = (),
    source: PathLike | None = None,
) -> str:
    """One sentence: how many keys are missing/unexpected/mis-shaped, the first names, what the checkpoint is."""
    missing, unexpected, mismatched_shapes = list(missing), list(unexpected), list(mismatched_shapes)
    problems = []
    if missing:
        problems.append(f"{len(missing)} keys missing ({_first_names(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({_first_names(unexpected)})")
    if mismatched_shapes:
        shapes = [f"{key} {list(got)} vs {list(want)}" for key, got, want in mismatched_shapes]
        problems.append(f"{len(shapes)} with another shape ({_first_names(shapes)})")
    checkpoint = f"checkpoint '{source}'" if source is not None else "the checkpoint"
    config = f"config '{config_path}'" if config_path is not None else "the model"
    kind = BASE_MODEL_DESCRIPTIONS[detect_base_model(checkpoint_state_dict)]
    return f"{checkpoint} does not fit {config}: {'; '.join(problems)}; the checkpoint looks like {kind}"
