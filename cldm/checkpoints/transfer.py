"""Moving a ControlNet trained on base Stable Diffusion 1.5 onto a fine-tuned SD1.5 model, file to file (what
tool_transfer_control.py runs): `control + finetuned - base` for every tensor with a UNet counterpart.

Memory: the inputs are read one tensor at a time (`open_state_dict`) and each transferred tensor is computed from
its three sources and kept, so the peak is about the output's size rather than three inputs plus the output.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from cldm.checkpoints.kinds import BASE_MODEL_DESCRIPTIONS, detect_base_model
from cldm.checkpoints.paths import check_output_path, checkpoint_format
from cldm.checkpoints.saving import save_state_dict
from cldm.checkpoints.surgery import FINETUNED_STAGE_PREFIXES, control_source_key, transfer_control
from ldm.checkpoint import check_input_path, open_state_dict

logger = logging.getLogger(__name__)


def _require(kind: str, allowed: Sequence[str], role: str, path: str, what: str) -> None:
    """Refuse a checkpoint whose detected kind is not among `allowed`."""
    if kind not in allowed:
        raise ValueError(f"{role} '{path}' looks like {BASE_MODEL_DESCRIPTIONS[kind]}; pass {what}")


def _check_kinds(paths: dict[str, str], base_kind: str, control_kind: str, finetuned_kind: str) -> None:
    """The base and fine-tuned models are the same plain SD version; the control file holds a ControlNet."""
    plain = ("sd1", "sd2")
    _require(base_kind, plain, "--sd15", paths["sd15"], "the plain Stable Diffusion checkpoint")
    _require(finetuned_kind, (base_kind,), "--input", paths["input"], f"a fine-tune of {paths['sd15']}")
    controls = ("controlnet-only", f"controlnet-{base_kind}")
    _require(control_kind, controls, "--control", paths["control"], f"a ControlNet for {paths['sd15']}")


def transfer_control_file(sd15: str, control: str, input: str, output: str) -> None:
    """Transfer the ControlNet of `control`, trained on `sd15`, onto its fine-tune `input`; save it to `output`."""
    paths = {"sd15": sd15, "control": control, "input": input, "output": output}
    start = time.perf_counter()

    # 1. cheap checks before any heavy work
    for name in ("sd15", "control", "input"):
        check_input_path(paths[name], role=f"--{name} checkpoint")
    checkpoint_format(output)
    check_output_path(output)

    # 2. open the three checkpoints (keys and shapes; tensors are read when used) and check what each is
    base_sd, control_sd, finetuned_sd = open_state_dict(sd15), open_state_dict(control), open_state_dict(input)
    _check_kinds(paths, *(detect_base_model(sd.meta) for sd in (base_sd, control_sd, finetuned_sd)))

    # 3. transfer, one tensor at a time, and save
    merged = transfer_control(control_sd, base_sd, finetuned_sd)
    save_state_dict(merged, output)

    offset = sum(
        1 for key in control_sd
        if not key.startswith(FINETUNED_STAGE_PREFIXES) and control_source_key(key) in finetuned_sd
    )
    logger.info(
        "Transferred model saved at %s: %d tensors, offset applied to %d, in %.1f s.",
        output, len(merged), offset, time.perf_counter() - start,
    )
