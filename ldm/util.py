"""Small helpers shared by the whole code base: config checks and instantiation, defaults, caption images."""
from __future__ import annotations

import difflib
import importlib
import inspect
import logging
import os
import textwrap
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Special `target` strings of the original configs that stand for "no module".
_NONE_TARGETS = ("__is_first_stage__", "__is_unconditional__")


def to_device(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """`tensor.to(device, dtype)` for a tensor made on the host during a step (noise, tokens): copied to a GPU
    through pinned memory without waiting, so the host keeps queueing work instead of stalling until the GPU has
    caught up (a plain copy from pageable memory synchronises). The values are the same."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device=device, dtype=dtype, non_blocking=True)
    return tensor.to(device=device, dtype=dtype)


def exists(value: Any) -> bool:
    """True when `value` is not None."""
    return value is not None


def default(value: T | None, fallback: T | Callable[[], T]) -> T:
    """`value` if it is set, else `fallback` (called when it is a function)."""
    if exists(value):
        return value
    return fallback() if callable(fallback) else fallback


def count_params(model: torch.nn.Module, verbose: bool = False) -> int:
    """Number of parameters of `model`; logs it in millions when `verbose`."""
    total = sum(p.numel() for p in model.parameters())
    if verbose:
        logger.info("%s has %.2f M params.", model.__class__.__name__, total * 1.0e-6)
    return total


def _import_object(string: str, reload: bool = False) -> Any:
    """Import `package.module.Name` and return `Name`; ImportError naming the missing piece."""
    module_name, _, obj_name = string.rpartition(".")
    if not module_name:
        raise ImportError("it is not a dotted path such as 'package.module.Class'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise ImportError(f"cannot import module '{module_name}' ({error})") from error
    if reload:
        module = importlib.reload(module)
    try:
        return getattr(module, obj_name)
    except AttributeError as error:
        raise ImportError(f"module '{module_name}' has no attribute '{obj_name}'") from error


def get_obj_from_str(string: str, reload: bool = False) -> Any:
    """Import `package.module.Name` and return `Name`; errors name the missing piece. Imports anything: configs go
    through `instantiate_from_config`, which checks the name first."""
    try:
        return _import_object(string, reload)
    except ImportError as error:
        raise ImportError(f"target '{string}': {error}") from error


# ---------------------------------------------------------------------------------------------
# Configs are data: which classes a `target` may name, and which `params` each class takes
# ---------------------------------------------------------------------------------------------

# A config's `target` may name a class of these packages, or one of the few torch classes the configs use.
ALLOWED_TARGET_PACKAGES = ("ldm", "cldm")
ALLOWED_TORCH_TARGETS = ("torch.nn.Identity",)

# Model classes of your own (a ControlLDM subclass in my_models.py, say): list their top-level modules in this
# environment variable, comma-separated, and configs may name their classes too. Only modules you wrote or trust.
TRUSTED_MODULES_VARIABLE = "CONTROLNET_TRUSTED_MODULES"

# A class whose `__init__` hands its `**kwargs` to another constructor than its parent's (UNetModel and ControlNet
# build a `UNetConfig` from them) names that constructor in this class attribute, so its parameters are checked.
KWARGS_CLASS_ATTRIBUTE = "kwargs_class"


class ConfigError(ValueError):
    """A config names a class this project does not build, or a parameter that class does not take."""


def _where(source: str | None, key: str) -> str:
    """`config file 'X': key` (or `config key` when the config did not come from a file)."""
    return f"config file '{source}': {key}" if source else f"config key {key}"


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def allowed_target_packages() -> tuple[str, ...]:
    """`ALLOWED_TARGET_PACKAGES` and the modules listed in the `CONTROLNET_TRUSTED_MODULES` environment variable."""
    listed = os.environ.get(TRUSTED_MODULES_VARIABLE, "").split(",")
    return ALLOWED_TARGET_PACKAGES + tuple(name.strip() for name in listed if name.strip())


def _is_project_module(module: str) -> bool:
    return module.split(".")[0] in allowed_target_packages()


def _allowed_target_text() -> str:
    return f"a class of this project (ldm.* or cldm.*) or {' or '.join(ALLOWED_TORCH_TARGETS)}"


def check_target_name(target: Any, key: str, source: str | None = None) -> None:
    """Raise ConfigError unless `target` is a dotted name under `ldm.`/`cldm.` or an allowed torch class; reads the
    string only (nothing is imported)."""
    allowed = isinstance(target, str) and (
        target in ALLOWED_TORCH_TARGETS
        or ("." in target and all(part.isidentifier() for part in target.split(".")) and _is_project_module(target))
    )
    if not allowed:
        raise ConfigError(
            f"{_where(source, key)} names '{target}', which a config may not use: a target must be "
            f"{_allowed_target_text()}; use a config from ./models/ or fix the target (for a model class of your "
            f"own, list its module in {TRUSTED_MODULES_VARIABLE})"
        )


def _target_class(target: str, key: str, source: str | None) -> type:
    """Import the class an allowed `target` names; ConfigError if it cannot be imported or is no such class."""
    try:
        obj = _import_object(target)
    except ImportError as error:
        raise ConfigError(f"{_where(source, key)} '{target}' cannot be imported: {error}; fix the target") from error
    is_project_class = isinstance(obj, type) and _is_project_module(obj.__module__)
    is_torch_class = any(obj is _import_object(name) for name in ALLOWED_TORCH_TARGETS)
    if not (is_project_class or is_torch_class):
        raise ConfigError(
            f"{_where(source, key)} '{target}' is not a class of this project; a target must be "
            f"{_allowed_target_text()}"
        )
    return obj


def _constructor_parameters(cls: type) -> Iterator[list[inspect.Parameter]]:
    """The keyword parameters of `cls.__init__` and, while a constructor takes `**kwargs`, of the constructor it
    hands them to (the parent class's, or the class named by `kwargs_class`), nearest first."""
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    inits = [klass for klass in cls.__mro__ if "__init__" in vars(klass)]
    for depth, klass in enumerate(inits):
        if depth and not _is_project_module(klass.__module__):
            return  # a library base class takes no config parameters
        parameters = list(inspect.signature(vars(klass)["__init__"]).parameters.values())[1:]
        yield [p for p in parameters if p.kind in keyword]
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            return
        receiver = vars(klass).get(KWARGS_CLASS_ATTRIBUTE)
        if receiver is not None:
            yield [p for p in inspect.signature(receiver).parameters.values() if p.kind in keyword]
            return


def accepted_params(cls: type) -> set[str]:
    """Keyword parameters `cls(...)` accepts, through the constructors it hands `**kwargs` to."""
    return {p.name for parameters in _constructor_parameters(cls) for p in parameters}


def required_params(cls: type) -> set[str]:
    """Parameters `cls(...)` cannot do without: those without a default in a constructor it reaches, unless a
    nearer constructor takes them itself (and so passes them on or not)."""
    required: set[str] = set()
    declared: set[str] = set()
    for parameters in _constructor_parameters(cls):
        required |= {p.name for p in parameters if p.default is p.empty} - declared
        declared |= {p.name for p in parameters}
    return required


def _check_params(cls: type, params: Any, key: str, source: str | None) -> None:
    """Raise ConfigError naming the first key of `params` that `cls` does not take, and the closest valid names."""
    if params is None:
        return
    if not isinstance(params, Mapping):
        raise ConfigError(f"{_where(source, key)} must be a mapping of parameter names to values, not {params!r}")
    valid = accepted_params(cls)
    for name in params:
        if name not in valid:
            close = difflib.get_close_matches(str(name), sorted(valid), n=3)
            hint = (f"did you mean {' or '.join(close)}?" if close
                    else f"valid names: {', '.join(sorted(valid)) or 'none'}")
            raise ConfigError(
                f"{_where(source, _join(key, name))} is not a parameter of {cls.__module__}.{cls.__qualname__}; {hint}"
            )


def _target_nodes(config: Any, path: str) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(key path, mapping) for every mapping with a `target` key anywhere in `config`, outermost first."""
    if isinstance(config, Mapping):
        if "target" in config:
            yield path, config
        for key, value in config.items():
            yield from _target_nodes(value, _join(path, key))
    elif isinstance(config, Sequence) and not isinstance(config, (str, bytes)):
        for index, value in enumerate(config):
            yield from _target_nodes(value, f"{path}[{index}]")


def check_config(config: Any, source: str | None = None, path: str = "") -> None:
    """Raise ConfigError unless every `target` anywhere in `config` is allowed (checked for all of them before
    anything is imported) and every `params` key is a parameter of its target's class. `source` (the file) and
    `path` (the key of `config` in it) make the messages name the place."""
    nodes = list(_target_nodes(config, path))
    for key, node in nodes:
        check_target_name(node["target"], _join(key, "target"), source)
    for key, node in nodes:
        cls = _target_class(node["target"], _join(key, "target"), source)
        _check_params(cls, node.get("params"), _join(key, "params"), source)


def instantiate_from_config(config: Mapping[str, Any], **overrides: Any) -> Any:
    """Build `config['target'](**config.get('params', {}))`, as the original yaml files expect; `overrides` replace
    or add constructor arguments (Python objects too, which a yaml file cannot hold). The target and the params are
    checked first (`check_config` rules, this level only): a config cannot name any other function or class."""
    if config in _NONE_TARGETS:
        return None
    if not isinstance(config, Mapping) or "target" not in config:
        raise KeyError(f"config has no 'target' key (keys: {sorted(config) if hasattr(config, 'keys') else config})")
    check_target_name(config["target"], "target")
    cls = _target_class(config["target"], "target", None)
    params = config.get("params", None) or {}
    _check_params(cls, params, "params", None)
    missing = sorted(required_params(cls) - set(params) - set(overrides))
    if missing:
        raise ConfigError(f"{cls.__module__}.{cls.__qualname__} needs {' and '.join(missing)}, which its params do not "
                          f"set; add {'it' if len(missing) == 1 else 'them'} (the configs in ./models/ show the values)")
    return cls(**{**params, **overrides})


# ---------------------------------------------------------------------------------------------
# Captions as images (the "conditioning" panel of the image logs)
# ---------------------------------------------------------------------------------------------

def _caption_font(size: int) -> ImageFont.ImageFont:
    """A scalable font that ships with Pillow (no font file on disk needed)."""
    return ImageFont.load_default(size=size)


def log_txt_as_img(wh: tuple[int, int], captions: Iterable[str], size: int = 10) -> torch.Tensor:
    """Draw each caption as black text on a white `wh` canvas; returns (B, 3, H, W) in [-1, 1]."""
    width, height = wh
    font = _caption_font(size)
    chars_per_line = int(40 * (width / 256))
    images = []
    for caption in captions:
        canvas = Image.new("RGB", (width, height), color="white")
        text = "\n".join(textwrap.wrap(str(caption), chars_per_line)) if caption else ""
        ImageDraw.Draw(canvas).multiline_text((0, 0), text, fill="black", font=font)
        array = np.asarray(canvas, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0
        images.append(torch.from_numpy(array))
    if not images:
        return torch.empty(0, 3, height, width)
    return torch.stack(images)
