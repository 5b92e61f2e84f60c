"""Random, non-zero weights for test models, so zero-initialised layers cannot hide a wrong path or mapping."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from cldm.cldm import ControlNet
from cldm.model import create_model


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Replace every parameter in place: weights N(0, 1/fan_in), norm scales 1 + 0.1 N(0, 1), biases 0.1 N(0, 1)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if p.ndim > 1:
                p.copy_(noise / math.sqrt(p[0].numel()))
            else:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
    return model


def control_params(config_path: str | Path) -> dict[str, Any]:
    """`control_stage_config.params` of a model config as a plain dict."""
    config = OmegaConf.load(config_path)
    return OmegaConf.to_container(config.model.params.control_stage_config.params, resolve=True)


def random_control_net(params: dict[str, Any], seed: int = 0) -> ControlNet:
    """A ControlNet whose every weight is random, zero convs included (so a wrong mapping cannot hide)."""
    with torch.device("meta"):
        net = ControlNet(**params)
    return randomize_(net.to_empty(device="cpu"), seed).eval()


def model_without_zero_layers(config_path: str | Path) -> nn.Module:
    """`create_model(config_path)` seeded with 0, its zero-initialised parameters drawn from N(0, 0.05^2) (as after
    training), so every control residual and gradient is non-zero."""
    torch.manual_seed(0)
    model = create_model(str(config_path))
    with torch.no_grad():
        for param in model.parameters():
            if not param.any():
                param.normal_(0.0, 0.05)
    return model
