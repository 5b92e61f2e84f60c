"""Randomly initialised "Stable Diffusion" weights of a config, for demos, tests and benchmarks.

The state dict has the layout of a real SD checkpoint of that architecture (every key of the config's ControlLDM
except `control_model.*`), so tool_add_control.py treats it like v1-5-pruned.ckpt. It is not a usable image
model: real images need the real SD1.5 / SD2.1 weights.
"""
from __future__ import annotations

import logging
import time

import torch

from cldm.checkpoints.kinds import CONTROL_PREFIX
from cldm.checkpoints.paths import check_output_path
from cldm.checkpoints.saving import save_state_dict
from cldm.model import check_config_path, create_model
from ldm.checkpoint import PathLike

logger = logging.getLogger(__name__)


@torch.no_grad()
def randomize_(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Give every parameter random, non-zero values of a sensible scale.

    A freshly built model is degenerate as a "pretrained" one: the zero-initialised output layers
    (UNet `out`, ResBlock `out_layers`, transformer `proj_out`) make the UNet ignore its input.
    Weights get N(0, 1/fan_in), normalisation scales 1 + N(0, 0.02^2), biases N(0, 0.02^2).
    """
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        if param.ndim >= 2:
            param.copy_(noise / param[0].numel() ** 0.5)
        elif name.endswith("weight"):
            param.copy_(1.0 + 0.02 * noise)
        else:
            param.copy_(0.02 * noise)


def random_base_state_dict(config_path: str, seed: int) -> dict[str, torch.Tensor]:
    """A random-weight state dict of `config_path`'s model, without the ControlNet."""
    model = create_model(config_path)
    randomize_(model, torch.Generator().manual_seed(seed))
    return {key: value for key, value in model.state_dict().items() if not key.startswith(CONTROL_PREFIX)}


def write_random_sd(output: PathLike, config_path: str, seed: int) -> None:
    """Write `random_base_state_dict(config_path, seed)` to `output` (.ckpt, .pth or .safetensors)."""
    check_config_path(config_path)
    check_output_path(output)
    start = time.perf_counter()
    state_dict = random_base_state_dict(config_path, seed)
    save_state_dict(state_dict, output)
    logger.info("Wrote %d random tensors (%s layout) to %s in %.1f s.", len(state_dict), config_path, output,
                time.perf_counter() - start)
