"""Checkpoint surgery as pure functions: build a ControlLDM state dict from Stable Diffusion weights."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from cldm.checkpoints.kinds import CONTROL_PREFIX, UNET_PREFIX

# Parts of a ControlLDM that tool_transfer_control takes whole from the fine-tuned model (VAE, text encoder).
FINETUNED_STAGE_PREFIXES = ("first_stage_model", "cond_stage_model")


def control_source_key(key: str) -> str:
    """The base-model key a ControlLDM key is initialised from: `control_model.X` <- `model.diffusion_model.X`."""
    if key.startswith(CONTROL_PREFIX):
        return UNET_PREFIX + key.removeprefix(CONTROL_PREFIX)
    return key


def _check_same_shape(key: str, source_key: str, source: torch.Tensor, target: torch.Tensor) -> None:
    if tuple(source.shape) != tuple(target.shape):
        needs = "the model needs" if source_key == key else f"the model's '{key}' needs"
        raise ValueError(
            f"'{source_key}' has shape {list(source.shape)} in the checkpoint but {needs} {list(target.shape)}; "
            "the checkpoint does not match the config"
        )


def add_control(
    model_state_dict: Mapping[str, torch.Tensor], base_state_dict: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Fill a fresh ControlLDM state dict from a base SD state dict; returns (merged, newly added keys).

    Every `control_model.X` is a clone of the base `model.diffusion_model.X` (so the two branches never share
    storage), every other key is taken by name, and keys the base lacks keep the model's fresh tensor and are
    listed as newly added. Base keys the model does not have (e.g. `model_ema.*`) are dropped.
    """
    merged: dict[str, torch.Tensor] = {}
    newly_added: list[str] = []
    for key, fresh in model_state_dict.items():
        source_key = control_source_key(key)
        if source_key not in base_state_dict:
            merged[key] = fresh
            newly_added.append(key)
            continue
        source = base_state_dict[source_key]
        _check_same_shape(key, source_key, source, fresh)
        merged[key] = source.clone() if source_key != key else source
    return merged, newly_added


def transfer_control(
    control_sd: Mapping[str, torch.Tensor],
    base_sd: Mapping[str, torch.Tensor],
    finetuned_sd: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Move a ControlNet from a base SD to a fine-tune of it by adding the weight offset (fine-tuned - base).

    VAE and text-encoder tensors come from the fine-tuned model; every other tensor whose UNet counterpart the
    fine-tuned model has becomes `control + finetuned - base`; ControlNet-only layers are kept as they are. Each
    input tensor is looked up once, when it is needed, so lazy mappings (`ldm.checkpoint.StateDictReader`) stream.
    """
    merged: dict[str, torch.Tensor] = {}
    for key in control_sd:
        if key.startswith(FINETUNED_STAGE_PREFIXES):
            if key not in finetuned_sd:
                raise ValueError(f"the fine-tuned model has no '{key}'; it is not a full Stable Diffusion checkpoint")
            merged[key] = finetuned_sd[key]
            continue
        source_key = control_source_key(key)
        if source_key not in finetuned_sd:
            merged[key] = control_sd[key]
            continue
        if source_key not in base_sd:
            raise ValueError(f"the base model has no '{source_key}', which the fine-tuned model has; pass its base")
        control, base, finetuned = control_sd[key], base_sd[source_key], finetuned_sd[source_key]
        for name, other in (("base", base), ("fine-tuned", finetuned)):
            if tuple(other.shape) != tuple(control.shape):
                raise ValueError(
                    f"cannot transfer '{key}': shape {list(control.shape)} in the ControlNet vs "
                    f"{list(other.shape)} for '{source_key}' in the {name} model; the models do not match"
                )
        merged[key] = control + finetuned - base
    return merged
