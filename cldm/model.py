"""Build a model from a yaml config and load checkpoint weights into it (the original's `cldm.model` API): the one
config loader and the one key-and-shape check of the project."""
from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cldm.checkpoints.kinds import describe_key_mismatch
from ldm.checkpoint import PathLike, get_state_dict, read_state_dict
from ldm.util import ConfigError, check_config, instantiate_from_config

logger = logging.getLogger(__name__)

__all__ = [
    "check_config_path", "check_weights_fit", "create_control_model", "create_model", "get_state_dict",
    "key_mismatch", "load_config", "load_state_dict", "load_weights", "model_state_shapes", "read_control_stage_config",
]


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


def load_config(config_path: PathLike) -> DictConfig:
    """The yaml file as an OmegaConf mapping that has a `model` section, checked as data: every `target` anywhere in
    it names a class of this project (or an allowed torch class) and every `params` key is one its class takes
    (`ldm.util.check_config`), before anything the file names is imported."""
    check_config_path(config_path)
    path = Path(config_path)
    try:
        config = OmegaConf.load(path)
    except (yaml.YAMLError, UnicodeDecodeError, OmegaConfBaseException) as error:
        raise ValueError(f"config file '{config_path}' is not valid YAML ({_yaml_problem(error)})") from error
    if not isinstance(config, DictConfig) or "model" not in config:
        raise ValueError(f"config file '{config_path}' has no top-level 'model' section")
    try:
        tree = OmegaConf.to_container(config, resolve=True)
    except OmegaConfBaseException as error:
        raise ValueError(f"config file '{config_path}' has a reference that cannot be resolved ({_yaml_problem(error)})"
                         ) from error
    check_config(tree, source=str(config_path))
    return config


def _instantiate(config_path: PathLike, section: Mapping[str, Any], **params: Any) -> torch.nn.Module:
    """Instantiate the target/params `section` of the config file `config_path`, with its errors as sentences."""
    try:
        return instantiate_from_config(section, **params)
    except ImportError as error:
        raise ValueError(f"config file '{config_path}' names a class that cannot be imported: {error}") from error
    except ConfigError as error:
        raise ConfigError(f"config file '{config_path}': {error}") from error
    except KeyError as error:
        raise ValueError(f"config file '{config_path}' is incomplete: {error.args[0]}") from error


def create_model(config_path: PathLike, **params: Any) -> torch.nn.Module:
    """Instantiate `config.model` of a yaml file (target/params) on the CPU; `params` replace or add entries of its
    `params:` (the training job passes its learning rate, `sd_locked`, `only_mid_control` and optimizer factory)."""
    model = _instantiate(config_path, load_config(config_path).model, **params)
    logger.info("Loaded model config from [%s]", config_path)
    return model.cpu()


def model_state_shapes(config_path: PathLike) -> dict[str, torch.Tensor]:
    """The state dict of `config.model` on the meta device: every key, shape and dtype, and no weights in memory."""
    with torch.device("meta"):
        model = _instantiate(config_path, load_config(config_path).model)
    return model.state_dict()


def create_control_model(config_path: PathLike) -> torch.nn.Module:
    """Instantiate only the ControlNet (`model.params.control_stage_config`) of a ControlLDM yaml file on the CPU."""
    return _instantiate(config_path, read_control_stage_config(config_path)).cpu()


def load_state_dict(ckpt_path: PathLike, location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Flat state dict of a .ckpt/.pth/.safetensors file, read safely (no pickled code runs)."""
    state_dict = read_state_dict(ckpt_path, location=location)
    logger.info("Loaded state_dict from [%s]", ckpt_path)
    return state_dict


def read_control_stage_config(config_path: PathLike) -> DictConfig:
    """`model.params.control_stage_config` (target and params of the ControlNet) of a ControlLDM yaml file."""
    control = OmegaConf.select(load_config(config_path), "model.params.control_stage_config")
    if control is None:
        raise ValueError(
            f"config file '{config_path}' has no model.params.control_stage_config; pass a ControlLDM config "
            "such as ./models/cldm_v15.yaml"
        )
    return control


def key_mismatch(
    expected: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor]
) -> tuple[list[str], list[str], list[tuple[str, tuple[int, ...], tuple[int, ...]]]]:
    """The keys of `expected` that `state_dict` lacks, those it has in excess, and (key, its shape, the expected
    shape) for every shared key whose shapes differ."""
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [
        (key, tuple(tensor.shape), tuple(expected[key].shape))
        for key, tensor in state_dict.items()
        if key in expected and tuple(tensor.shape) != tuple(expected[key].shape)
    ]
    return missing, unexpected, mismatched


def check_weights_fit(
    expected: Mapping[str, torch.Tensor],
    state_dict: Mapping[str, torch.Tensor],
    *,
    source: PathLike,
    config: PathLike | None = None,
) -> None:
    """Raise ValueError naming the keys and the likely model unless `state_dict` has exactly the keys and shapes of
    `expected` (a model's state dict, possibly on the meta device)."""
    missing, unexpected, mismatched = key_mismatch(expected, state_dict)
    if missing or unexpected or mismatched:
        raise ValueError(
            describe_key_mismatch(missing, unexpected, state_dict, config, mismatched_shapes=mismatched, source=source)
        )


def load_weights(
    model: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    source: PathLike,
    config: PathLike | None = None,
) -> None:
    """Load `state_dict` into `model` strictly; a mismatch raises ValueError naming the keys and the likely model."""
    check_weights_fit(model.state_dict(), state_dict, source=source, config=config)
    model.load_state_dict(state_dict, strict=True)
