"""ldm/lr_scheduler.py: the learning-rate factors of the original's schedulers, step by step."""
from __future__ import annotations

import math

import pytest

from ldm.lr_scheduler import LambdaLinearScheduler, LambdaWarmUpCosineScheduler, LambdaWarmUpCosineScheduler2


def test_one_cycle_warms_up_linearly_then_falls_along_a_half_cosine() -> None:
    schedule = LambdaWarmUpCosineScheduler2(warm_up_steps=[10], f_min=[0.1], f_max=[1.0], f_start=[0.0],
                                            cycle_lengths=[110])
    assert schedule(0) == 0.0
    assert schedule(5) == pytest.approx(0.5)
    assert schedule(10) == pytest.approx(1.0)
    assert schedule(35) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert schedule(60) == pytest.approx(0.55)
    assert schedule(110) == pytest.approx(0.1)
    assert schedule(500) == pytest.approx(0.1)  # after the last cycle: its end


def test_a_cycle_ends_at_its_length_and_the_next_starts_one_step_later() -> None:
    schedule = LambdaWarmUpCosineScheduler2(warm_up_steps=[0, 4], f_min=[0.0, 0.0], f_max=[1.0, 2.0],
                                            f_start=[1.0, 0.0], cycle_lengths=[10, 10])
    assert schedule.find_in_interval(10) == 0
    assert schedule.find_in_interval(11) == 1
    assert schedule(10) == pytest.approx(0.0)
    assert schedule(11) == pytest.approx(0.5)  # one of the second cycle's 4 warm-up steps, from 0 to 2
    assert schedule(14) == pytest.approx(2.0)


def test_the_linear_scheduler_of_stable_diffusions_configs_is_a_plain_warm_up() -> None:
    schedule = LambdaLinearScheduler(warm_up_steps=[10000], f_min=[1.0], f_max=[1.0], f_start=[1e-6],
                                     cycle_lengths=[10000000000000])
    assert schedule(0) == pytest.approx(1e-6)
    assert schedule(5000) == pytest.approx(0.5, abs=1e-6)
    assert schedule(10000) == pytest.approx(1.0)
    assert schedule(10 ** 9) == pytest.approx(1.0)


def test_the_linear_scheduler_falls_along_a_line_after_the_warm_up() -> None:
    schedule = LambdaLinearScheduler(warm_up_steps=[0], f_min=[0.0], f_max=[1.0], f_start=[0.0],
                                     cycle_lengths=[100])
    assert [schedule(step) for step in (0, 25, 100, 200)] == pytest.approx([1.0, 0.75, 0.0, 0.0])


def test_the_one_cycle_cosine_scheduler() -> None:
    schedule = LambdaWarmUpCosineScheduler(warm_up_steps=10, lr_min=0.1, lr_max=1.0, lr_start=0.0,
                                           max_decay_steps=110)
    assert [schedule(step) for step in (0, 5, 10, 60, 110, 200)] == pytest.approx([0.0, 0.5, 1.0, 0.55, 0.1, 0.1])


def test_the_factor_is_logged_every_verbosity_interval_steps(caplog) -> None:
    schedule = LambdaWarmUpCosineScheduler2([0], [0.0], [1.0], [1.0], [10], verbosity_interval=5)
    with caplog.at_level("INFO", logger="ldm.lr_scheduler"):
        for step in range(11):
            schedule(step)
    assert [record.getMessage() for record in caplog.records] == [
        "step 0: learning-rate factor 1", "step 5: learning-rate factor 0.5", "step 10: learning-rate factor 0"]


@pytest.mark.parametrize("arguments, message", [
    (([0], [0.0], [1.0], [1.0], [10, 10]), "one entry per cycle"),
    (([], [], [], [], []), "one entry per cycle"),
    (([10], [0.0], [1.0], [1.0], [10]), "warm_up_steps (10) must be at least 0 and below"),
])
def test_inconsistent_cycles_are_refused(arguments, message) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        LambdaWarmUpCosineScheduler2(*arguments)


def test_a_warm_up_as_long_as_the_decay_is_refused() -> None:
    with pytest.raises(ValueError, match="below max_decay_steps"):
        LambdaWarmUpCosineScheduler(warm_up_steps=5, lr_min=0.0, lr_max=1.0, lr_start=0.0, max_decay_steps=5)
