"""Learning-rate multipliers by step, for `scheduler_config` of `LatentDiffusion` (the original's module and classes).

`DDPM.configure_optimizers` wraps `schedule` in `torch.optim.lr_scheduler.LambdaLR`, which multiplies the model's
`learning_rate` by it at every step. `LambdaWarmUpCosineScheduler2` and `LambdaLinearScheduler` run one or more
cycles, each a linear warm-up from `f_start` to `f_max` followed by a fall towards `f_min` (a half cosine, or a
line); a step after the last cycle keeps the last cycle's end. `LambdaWarmUpCosineScheduler` is the one-cycle
cosine form under its own argument names.
"""
from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Sequence
from itertools import accumulate

logger = logging.getLogger(__name__)


class LambdaWarmUpCosineScheduler2:
    """Cycles of `cycle_lengths` steps; cycle i warms up linearly from `f_start[i]` to `f_max[i]` over
    `warm_up_steps[i]`, then falls along a half cosine to `f_min[i]` at its end. Use with a base learning rate of 1
    to read the factors as rates, or with the model's `learning_rate` to read them as its multipliers."""

    def __init__(self, warm_up_steps: Sequence[int], f_min: Sequence[float], f_max: Sequence[float],
                 f_start: Sequence[float], cycle_lengths: Sequence[int], verbosity_interval: int = 0):
        lists = {"warm_up_steps": warm_up_steps, "f_min": f_min, "f_max": f_max, "f_start": f_start,
                 "cycle_lengths": cycle_lengths}
        if len({len(values) for values in lists.values()}) != 1 or not cycle_lengths:
            lengths = ", ".join(f"{name} {len(values)}" for name, values in lists.items())
            raise ValueError(f"the scheduler's lists must have one entry per cycle and the same length ({lengths})")
        for warm_up, length in zip(warm_up_steps, cycle_lengths):
            if not 0 <= warm_up < length:
                raise ValueError(f"each cycle's warm_up_steps ({warm_up}) must be at least 0 and below its "
                                 f"cycle_lengths entry ({length})")
        self.warm_up_steps = list(warm_up_steps)
        self.f_min = list(f_min)
        self.f_max = list(f_max)
        self.f_start = list(f_start)
        self.cycle_lengths = list(cycle_lengths)
        self.cycle_ends = list(accumulate(self.cycle_lengths))
        self.verbosity_interval = verbosity_interval

    def find_in_interval(self, n: int) -> int:
        """The cycle that step `n` lies in (the last one after all cycles); a cycle's last step is its length."""
        return min(bisect.bisect_left(self.cycle_ends, n), len(self.cycle_ends) - 1)

    def schedule(self, n: int) -> float:
        cycle = self.find_in_interval(n)
        step = min(n - (self.cycle_ends[cycle] - self.cycle_lengths[cycle]), self.cycle_lengths[cycle])
        value = self.factor(cycle, step)
        _report(n, value, self.verbosity_interval)
        return value

    def factor(self, cycle: int, step: int) -> float:
        """The factor at `step` steps into `cycle`."""
        return _warm_up_then_cosine(step, self.warm_up_steps[cycle], self.cycle_lengths[cycle],
                                    self.f_start[cycle], self.f_max[cycle], self.f_min[cycle])

    __call__ = schedule


class LambdaWarmUpCosineScheduler(LambdaWarmUpCosineScheduler2):
    """One cycle under the original's own argument names: a linear warm-up from `lr_start` to `lr_max` over
    `warm_up_steps`, then a half cosine down to `lr_min` at `max_decay_steps`, which it keeps."""

    def __init__(self, warm_up_steps: int, lr_min: float, lr_max: float, lr_start: float, max_decay_steps: int,
                 verbosity_interval: int = 0):
        if not 0 <= warm_up_steps < max_decay_steps:
            raise ValueError(f"warm_up_steps ({warm_up_steps}) must be at least 0 and below max_decay_steps "
                             f"({max_decay_steps})")
        super().__init__([warm_up_steps], [lr_min], [lr_max], [lr_start], [max_decay_steps], verbosity_interval)


class LambdaLinearScheduler(LambdaWarmUpCosineScheduler2):
    """`LambdaWarmUpCosineScheduler2` whose fall after the warm-up is a line: from `f_max` at the cycle's start
    (reached at the warm-up's end, so the line starts below it) to `f_min` at its end. Stable Diffusion's training
    configs use it with one endless cycle as a plain warm-up."""

    def factor(self, cycle: int, step: int) -> float:
        warm_up, length = self.warm_up_steps[cycle], self.cycle_lengths[cycle]
        if step < warm_up:
            return _warm_up(step, warm_up, self.f_start[cycle], self.f_max[cycle])
        f_min, f_max = self.f_min[cycle], self.f_max[cycle]
        return f_min + (f_max - f_min) * (length - step) / length


def _report(step: int, value: float, interval: int) -> None:
    """Log the factor every `interval` steps (never with 0), as the original's `verbosity_interval` does."""
    if interval > 0 and step % interval == 0:
        logger.info("step %d: learning-rate factor %.6g", step, value)


def _warm_up(step: int, warm_up_steps: int, start: float, peak: float) -> float:
    return start + (peak - start) * step / warm_up_steps


def _warm_up_then_cosine(step: int, warm_up_steps: int, end_step: int, start: float, peak: float,
                         end: float) -> float:
    if step < warm_up_steps:
        return _warm_up(step, warm_up_steps, start, peak)
    progress = min(1.0, (step - warm_up_steps) / (end_step - warm_up_steps))
    return end + 0.5 * (peak - end) * (1.0 + math.cos(math.pi * progress))
