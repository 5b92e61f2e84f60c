"""Build a model from a yaml config and load checkpoint weights into it (the original's `cldm.model` API)."""
from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cldm.checkpoint_io import PathLike, describe_key_mismatch, get_state_dict, read_state_dict
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)

__all__ = ["check_config_path", "create_model", "get_state_dict", "load_state_dict", "load_weights"]


def check_config_path(config_path: PathLike) -> None:
    """Raise FileNotFoundError unless the config file exists."""
    if not Path(config_path).is_file():
        raise FileNotFoundError(f"config file '{config_path}' does not exist; check the path")


def _yaml_problem(error: Exception) -> str:
    """`problem at line L, column C` for a yaml syntax error, else the error's first line."""
    mark = getattr(error, "problem_mark", None)
    if mark is not None:
        return f"{error.problem} at line {mark.line + 1}, column {mark.column + 1}"
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _load_config(config_path: PathLike) -> DictConfig:
    """The yaml file as an OmegaConf mapping that has a `model` section."""
    check_config_path(config_path)
    path = Path(config_path)
    try:
        config = OmegaConf.load(path)
    except (yaml.YAMLError, UnicodeDecodeError, OmegaConfBaseException) as error:
        raise ValueError(f"config file '{config_path}' is not valid YAML ({_yaml_problem(error)})") from error
    if not isinstance(config, DictConfig) or "model" not in config:
        raise ValueError(f"config file '{config_path}' has no top-level 'model' section")
    return config


def create_model(config_path: PathLike) -> torch.nn.Module:
    """Instantiate `config.model` of a yaml file (target/params) on the CPU."""
    config = _load_config(config_path)
    try:
        model = instantiate_from_config(config.model)
    except ImportError as error:
        raise ValueError(f"config file '{config_path}' names a class that cannot be imported: {error}") from error
    except KeyError as error:
        raise ValueError(f"config file '{config_path}' is incomplete: {error.args[0]}") from error
    logger.info("Loaded model config from [%s]", config_path)
    return model.cpu()


def load_state_dict(ckpt_path: PathLike, location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Flat state dict of a .ckpt/.pth/.safetensors file, read safely (no pickled code runs)."""
    state_dict = read_state_dict(ckpt_path, location=location)
    logger.info("Loaded state_dict from [%s]", ckpt_path)
    return state_dict


def _mismatched_shapes(
    model_state: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor]
) -> list[tuple[str, tuple[int, ...], tuple[int, ...]]]:
    """(key, checkpoint shape, model shape) for every shared key whose shapes differ."""
    return [
        (key, tuple(tensor.shape), tuple(model_state[key].shape))
        for key, tensor in state_dict.items()
        if key in model_state and tuple(tensor.shape) != tuple(model_state[key].shape)
    ]


def load_weights(
    model: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    source: PathLike,
    config: PathLike | None = None,
) -> None:
    """Load `state_dict` into `model` strictly; a mismatch raises ValueError naming the keys and the likely model."""
    model_state = model.state_dict()
    mismatched = _mismatched_shapes(model_state, state_dict)
    if mismatched:  # load_state_dict would fail on these; report the key differences alongside
        missing = [key for key in model_state if key not in state_dict]
        unexpected = [key for key in state_dict if key not in model_state]
    else:
        # strict=False and the same check as strict=True afterwards, so the error can say what the checkpoint is.
        result = model.load_state_dict(state_dict, strict=False)
        missing, unexpected = result.missing_keys, result.unexpected_keys
    if mismatched or missing or unexpected:
        raise ValueError(
            describe_key_mismatch(missing, unexpected, state_dict, config, mismatched_shapes=mismatched, source=source)
        )
