"""`--batch_size max`: the candidates and the search (the probe's step itself needs a GPU and runs in gpu_check)."""
from __future__ import annotations

import argparse

import pytest

from cldm.training.arguments import SINGLE_DEVICE_DEFAULTS, _check_batch_probe, build_parser
from cldm.training.batch_probe import batch_sizes_up_to, largest_fitting


def test_candidates_double_up_to_the_data_set_size():
    assert batch_sizes_up_to(1) == [1]
    assert batch_sizes_up_to(64) == [1, 2, 4, 8, 16, 32, 64]
    assert batch_sizes_up_to(50) == [1, 2, 4, 8, 16, 32, 50]


def test_the_search_keeps_the_last_fitting_batch_and_stops_at_the_first_that_does_not():
    tried = []

    def fits(batch_size: int) -> bool:
        tried.append(batch_size)
        return batch_size <= 24

    assert largest_fitting([1, 2, 4, 8, 16, 32, 64], fits) == 16
    assert tried == [1, 2, 4, 8, 16, 32]  # 64 is not tried once 32 failed
    assert largest_fitting([1, 2], lambda batch_size: False) is None


@pytest.mark.parametrize("devices, num_nodes, compile, reason", [
    (2, 1, False, "more than one device or node"),
    (1, 2, False, "more than one device or node"),
    (1, 1, True, "--compile"),
])
def test_the_probe_needs_one_gpu_and_an_eager_step(monkeypatch, devices, num_nodes, compile, reason):
    monkeypatch.setattr("cldm.training.arguments.uses_gpu", lambda args: True)
    args = argparse.Namespace(batch_size="max", devices=devices, num_nodes=num_nodes, compile=compile)
    with pytest.raises(ValueError, match=reason):
        _check_batch_probe(args)
    _check_batch_probe(argparse.Namespace(batch_size=8, devices=devices, num_nodes=num_nodes, compile=compile))


def test_the_flag_takes_a_number_or_max(capsys):
    parser = build_parser(SINGLE_DEVICE_DEFAULTS, "test")
    assert parser.parse_args(["--batch_size", "max"]).batch_size == "max"
    assert parser.parse_args(["--batch_size", "16"]).batch_size == 16
    with pytest.raises(SystemExit):
        parser.parse_args(["--batch_size", "many"])
    assert "'many' is neither a number nor 'max'" in capsys.readouterr().err
