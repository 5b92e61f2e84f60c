"""Argparse `type=` functions shared by every script's flags.

Each turns a flag's text into its value or refuses it with a sentence that argparse prints after the flag's name
(`error: argument --seed: must be a whole number between 0 and 4294967295, got -1`), exit code 2, before anything
else runs. Numbers are bounded so that no value overflows where torch, NumPy or Lightning store it, and floats
must be finite.
"""
from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import TypeVar

import torch

# Counts (steps, batches, images) are stored in int64 tensors and checkpoints by torch and Lightning.
INT64_MAX = 2**63 - 1
# NumPy's and Lightning's seeds are unsigned 32-bit numbers.
SEED_MAX = 2**32 - 1
# Processes one flag may start (DataLoader workers, CPU devices, generator workers).
MAX_PROCESSES = 256
# Diffusion timesteps of every config in ./models/; DDIM visits at most all of them.
DDPM_TIMESTEPS = 1000

Number = TypeVar("Number", int, float)

# The longest input shown back in a message.
_SHOWN_CHARS = 40


def _shown(text: str) -> str:
    """The user's text for a one-line message: as typed if short and printable, else quoted and cut."""
    if text.isprintable() and 0 < len(text) <= _SHOWN_CHARS:
        return text
    return repr(text[:_SHOWN_CHARS] + ("..." if len(text) > _SHOWN_CHARS else ""))


def _refuse(expected: str, text: str, fix: str = "") -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(f"must be {expected}, got {_shown(text)}" + (f"; {fix}" if fix else ""))


def _parser(convert: Callable[[str], Number], accepts: Callable[[Number], bool], expected: str,
            fix: str) -> Callable[[str], Number]:
    """An argparse type: `convert` the text, and keep the value if `accepts` it; else say what was `expected`."""
    def parse(text: str) -> Number:
        try:
            value = convert(text)
        except ValueError:
            raise _refuse(expected, text, fix) from None
        if not accepts(value):
            raise _refuse(expected, text, fix)
        return value

    return parse


def integer(low: int, high: int = INT64_MAX, *, sentinel: int | None = None, sentinel_meaning: str = "",
            fix: str = "") -> Callable[[str], int]:
    """A whole number in [low, high], or `sentinel` (shown with its meaning) where the flag has one; `fix` ends the
    message."""
    expected = f"a whole number between {low} and {high}"
    if sentinel is not None:
        expected = f"{sentinel} ({sentinel_meaning}) or {expected}"
    return _parser(int, lambda value: value == sentinel or low <= value <= high, expected, fix)


def real(low: float = -math.inf, high: float = math.inf, *, low_open: bool = False,
         fix: str = "") -> Callable[[str], float]:
    """A finite number in [low, high] (in (low, high] with `low_open`); `fix` ends the message."""
    if math.isinf(low) and math.isinf(high):
        expected = "a finite number"
    elif math.isinf(high):
        expected = f"a finite number {'greater than' if low_open else 'at least'} {low:g}"
    else:
        expected = f"a number between {low:g} and {high:g}"
    return _parser(float, lambda value: math.isfinite(value) and low <= value <= high
                   and not (low_open and value == low), expected, fix)


positive_int = integer(1)
non_negative_int = integer(0)
seed = integer(0, SEED_MAX)
process_count = integer(1, MAX_PROCESSES)
worker_count = integer(0, MAX_PROCESSES)
ddim_steps = integer(1, DDPM_TIMESTEPS)
finite_float = real()
positive_finite_float = real(0.0, low_open=True)
non_negative_finite_float = real(0.0)
probability = real(0.0, 1.0)


def path(text: str) -> str:
    """A file or folder name: not empty and without NUL characters (which no file system allows)."""
    if not text:
        raise argparse.ArgumentTypeError("must be a path, got an empty string")
    if "\0" in text:
        raise argparse.ArgumentTypeError(f"must be a path without NUL characters, got {_shown(text)}")
    return text


def column_name(text: str) -> str:
    """A column of a JSON Lines file: not empty."""
    if not text:
        raise argparse.ArgumentTypeError("must be a column name, got an empty string")
    return text


def device(text: str) -> str:
    """A torch device this machine has: `cpu`, `cuda` or `cuda:N`."""
    try:
        parsed = torch.device(text)
    except (RuntimeError, ValueError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"must be cpu, cuda or cuda:N, got {_shown(text)}")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"asks for CUDA ({_shown(text)}), which is not available here; use cpu")
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"asks for GPU {parsed.index} and only {torch.cuda.device_count()} are "
                                         "visible")
    return text
