"""The shared argparse types of cldm/flags.py: what each accepts, and the sentence for what it refuses."""
from __future__ import annotations

import argparse

import pytest
import torch

from cldm import flags


@pytest.mark.parametrize("parse, text, value", [
    (flags.positive_int, "1", 1),
    (flags.positive_int, str(flags.INT64_MAX), flags.INT64_MAX),
    (flags.non_negative_int, "0", 0),
    (flags.seed, "4294967295", 4294967295),
    (flags.integer(1, sentinel=-1, sentinel_meaning="no limit"), "-1", -1),
    (flags.positive_finite_float, "1e-5", 1e-5),
    (flags.non_negative_finite_float, "-0.0", 0.0),
    (flags.probability, "1", 1.0),
    (flags.finite_float, "-3.5", -3.5),
    (flags.path, "./models/cldm_v15.yaml", "./models/cldm_v15.yaml"),
    (flags.device, "cpu", "cpu"),
])
def test_accepted_values(parse, text, value) -> None:
    assert parse(text) == value


@pytest.mark.parametrize("parse, text, message", [
    (flags.positive_int, "0", "must be a whole number between 1 and 9223372036854775807, got 0"),
    (flags.positive_int, str(2**63), f"must be a whole number between 1 and 9223372036854775807, got {2**63}"),
    (flags.positive_int, "1.5", "must be a whole number between 1 and 9223372036854775807, got 1.5"),
    (flags.seed, "-1", "must be a whole number between 0 and 4294967295, got -1"),
    (flags.integer(1, sentinel=-1, sentinel_meaning="no limit"), "-5",
     "must be -1 (no limit) or a whole number between 1 and 9223372036854775807, got -5"),
    (flags.positive_finite_float, "nan", "must be a finite number greater than 0, got nan"),
    (flags.positive_finite_float, "-0.0", "must be a finite number greater than 0, got -0.0"),
    (flags.non_negative_finite_float, "inf", "must be a finite number at least 0, got inf"),
    (flags.finite_float, "1e999", "must be a finite number, got 1e999"),
    (flags.probability, "1.01", "must be a number between 0 and 1, got 1.01"),
    (flags.real(0.0, low_open=True, fix="leave the flag out"), "0", "greater than 0, got 0; leave the flag out"),
    (flags.path, "", "must be a path, got an empty string"),
    (flags.path, "a\0b", "must be a path without NUL characters, got 'a\\x00b'"),
    (flags.device, "tpu", "must be cpu, cuda or cuda:N, got tpu"),
    (flags.device, "meta", "must be cpu, cuda or cuda:N, got meta"),
])
def test_refused_values_get_one_sentence(parse, text, message) -> None:
    with pytest.raises(argparse.ArgumentTypeError) as error:
        parse(text)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_long_or_unprintable_text_is_shown_on_one_line_and_cut() -> None:
    with pytest.raises(argparse.ArgumentTypeError) as error:
        flags.positive_int("x\n" * 100)
    assert "\n" not in str(error.value) and str(error.value).endswith("...'")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
def test_cuda_device_without_a_gpu() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=r"asks for CUDA \(cuda:0\), which is not available here"):
        flags.device("cuda:0")


def test_argparse_names_the_flag(capsys) -> None:
    parser = argparse.ArgumentParser(prog="tool")
    parser.add_argument("--seed", type=flags.seed)
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["--seed", "-1"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "tool: error: argument --seed: must be a whole number between 0 and 4294967295, got -1")
