"""Generated values for every flag of every script: each is answered with exit code 0 or 2 and, for 2, one
`error:` sentence that names the flag (or shows the value given to it), never a traceback (docs/bad_inputs.md).

The flags come from each script's parser (`parser._actions`), so a new flag is covered without editing this file.
Each example starts from a valid command line on tiny inputs and replaces one to three of its flags (or
positionals) with generated values: integers of any size and sign, floats with nan, inf and -0.0, the flag's
choices and default, and text (empty, unicode, NUL). The script runs through `cldm.cli.run` as on the command line,
with the first heavy function after its checks replaced by one that raises `ChecksPassed`, so no model is built.
The examples are derandomized (the same on every run): 150 per script, 1950 in all, about 20 s on two slow cores.
"""
from __future__ import annotations

import argparse
import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tool_add_control
import tool_cache_latents
import tool_eval_control
import tool_export_diffusers
import tool_extract_control
import tool_make_fill50k
import tool_make_random_sd
import tool_make_shards
import tool_plot_run
import tool_pretrain_tiny_sd
import tool_sample
import tool_transfer_control
import tutorial_dataset_test
import tutorial_train
from cldm.cli import run
from cldm.training import SINGLE_DEVICE_DEFAULTS, build_parser as build_training_parser
from tests.helpers.paths import REPO_ROOT
from run_logs import training_rows, write_log
from tiny_training import TINY_CONFIG, make_data, make_initial_weights

# Examples per script (a run of 1500 per script, randomized, found nothing more).
EXAMPLES = 150
settings.register_profile("generated-flags", max_examples=EXAMPLES, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


class ChecksPassed(Exception):
    """Raised where a script's heavy work would start: its checks accepted the command line."""


@dataclass
class Script:
    """A script, its parser, a valid command line on the tiny inputs, and where its heavy work starts.

    Paths in the command line are written `{name}` for the files of the `inputs` fixture.
    """

    main: Callable[[list[str]], int]
    parser: Callable[[], argparse.ArgumentParser]
    positionals: list[str]
    options: dict[str, str | None]  # flag -> value (None: a flag without a value)
    stop: str | None  # "module:function" that raises `ChecksPassed` instead of working; None: cheap work
    stop_after: bool = False  # call the real function (the checks themselves), then raise


SCRIPTS = {
    "tutorial_train": Script(
        tutorial_train.main, lambda: build_training_parser(SINGLE_DEVICE_DEFAULTS, "train"), [],
        {"--config": "{tiny}", "--resume_path": "{initial}", "--data_root": "{fill}", "--batch_size": "2",
         "--accelerator": "cpu", "--default_root_dir": "{out}", "--max_steps": "1"},
        "cldm.training.job:check_args", stop_after=True),
    "tool_sample": Script(
        tool_sample.main, tool_sample.build_parser, [],
        {"--config": "{tiny}", "--ckpt": "{initial}", "--hint": "{hint}", "--resolution": "64", "--device": "cpu",
         "--out": "{out}.png"},
        "cldm.sampling:load_control_ldm"),
    "tool_make_fill50k": Script(
        tool_make_fill50k.main, tool_make_fill50k.build_parser, [],
        {"--out": "{out}", "--count": "2", "--size": "64", "--quiet": None}, "cldm.data.fill50k:_render_all"),
    "tool_cache_latents": Script(
        tool_cache_latents.main, tool_cache_latents.build_parser, [],
        {"--config": "{tiny}", "--resume_path": "{initial}", "--data_root": "{fill}", "--device": "cpu",
         "--out": "{out}"},
        "cldm.data.latent_cache_writer:create_model"),
    "tool_export_diffusers": Script(
        tool_export_diffusers.main, tool_export_diffusers.build_parser, ["{initial}", "{out}"], {"--config": "{tiny}"},
        "cldm.checkpoints.diffusers_export:read_state_dict"),
    "tool_extract_control": Script(
        tool_extract_control.main, tool_extract_control.build_parser, ["{initial}", "{out}.safetensors"], {},
        "cldm.checkpoints.extraction:read_state_dict"),
    "tool_transfer_control": Script(
        tool_transfer_control.main, tool_transfer_control.build_parser,
        ["{initial}", "{initial}", "{initial}", "{out}.ckpt"], {}, "cldm.checkpoints.transfer:open_state_dict"),
    "tool_add_control": Script(
        tool_add_control.main, lambda: tool_add_control.build_parser("sd1"), ["{initial}", "{out}.ckpt"],
        {"--config": "{tiny}"}, "cldm.checkpoints.initial_weights:open_state_dict"),
    "tool_eval_control": Script(
        tool_eval_control.main, tool_eval_control.build_parser, [],
        {"--config": "{tiny}", "--ckpt": "{initial}", "--data_root": "{fill}", "--items": "2", "--device": "cpu"},
        "cldm.evaluation.eval_control:load_control_ldm"),
    "tool_plot_run": Script(
        tool_plot_run.main, tool_plot_run.build_parser, ["{run}"], {"--out": "{out}.png"},
        "cldm.evaluation.run_plot:draw"),
    "tool_make_random_sd": Script(
        tool_make_random_sd.main, tool_make_random_sd.build_parser, ["{out}.ckpt"], {"--config": "{tiny}"},
        "cldm.checkpoints.random_weights:random_base_state_dict"),
    "tool_pretrain_tiny_sd": Script(
        tool_pretrain_tiny_sd.main, tool_pretrain_tiny_sd.build_parser, [],
        {"--config": "{tiny}", "--data_root": "{fill}", "--work_dir": "{out}", "--out": "{out}.ckpt"},
        "cldm.training.pretrain:_pretrain_stages"),
    "tool_make_shards": Script(
        tool_make_shards.main, tool_make_shards.build_parser, [],
        {"--data_root": "{fill}", "--out": "{out}", "--shard_size": "1"}, "cldm.data.shards:atomic_path"),
    "tutorial_dataset_test": Script(
        tutorial_dataset_test.main, tutorial_dataset_test.build_parser, [], {"--root": "{fill}", "--index": "1"}, None),
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    """The valid files every base command line names: the tiny config, initial weights, a data set, a hint
    image, a run folder with a CSV log, and an output name that does not exist."""
    root = tmp_path_factory.mktemp("inputs")
    files = {"tiny": str(TINY_CONFIG), "initial": str(make_initial_weights(root / "initial.ckpt")),
             "fill": str(make_data(root / "fill", 2)), "hint": str(root / "hint.png"), "out": str(root / "out"),
             "run": str(write_log(root / "run", 0, training_rows(range(3))).parents[2])}
    cv2.imwrite(files["hint"], np.zeros((64, 64, 3), np.uint8))
    return files


def _stop_heavy_work(script: Script, monkeypatch: pytest.MonkeyPatch) -> None:
    """Replace the script's first heavy function by one that raises `ChecksPassed`."""
    if script.stop is None:
        return
    module_name, name = script.stop.split(":")
    module = importlib.import_module(module_name)
    real = getattr(module, name)

    def checks_passed(*args, **kwargs):
        if script.stop_after:
            real(*args, **kwargs)
        raise ChecksPassed
    monkeypatch.setattr(module, name, checks_passed)


def _base_command_line(script: Script, files: dict[str, str]) -> tuple[list[str], dict[str, str | None]]:
    """The script's valid positionals and options, with the input files' paths filled in."""
    options = {flag: None if value is None else value.format(**files) for flag, value in script.options.items()}
    return [value.format(**files) for value in script.positionals], options


# ---------------------------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------------------------

_numbers = st.one_of(
    st.integers(min_value=-3, max_value=300), st.integers(), st.integers(min_value=2**31, max_value=2**80),
    st.integers(max_value=-(2**31)),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 1e-9, 0.5, 1.0, 1e308]),
).map(str)
_texts = st.one_of(
    st.sampled_from(["", " ", "nan", "inf", "-inf", "1e999", "0x10", "1_000", "last", "cpu", "cuda", "cuda:7",
                     "max", "\0", "a\0b", "../..", "/", "é", "３", "\n", "-x"]),
    st.text(max_size=12),
).filter(lambda text: text != "--debug")  # asks for tracebacks


def _values(action: argparse.Action) -> st.SearchStrategy[str]:
    known = [str(action.default)] + [str(choice) for choice in action.choices or ()]
    return st.one_of(st.sampled_from(known), _numbers, _texts)


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [action for action in parser._actions if action.option_strings and action.dest not in ("help", "debug")]


def _positionals(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [action for action in parser._actions if not action.option_strings]


@st.composite
def command_lines(draw, script: Script, files: dict[str, str]) -> tuple[list[str], dict[str, str | None]]:
    """The script's valid command line with one to three of its flags or positionals given generated values, and
    the flags (or positionals' names) among those with their values."""
    parser = script.parser()
    positionals, options = _base_command_line(script, files)
    candidates = _options(parser) + _positionals(parser)
    generated = {}
    for action in draw(st.lists(st.sampled_from(candidates), min_size=1, max_size=3, unique_by=id)):
        if not action.option_strings:
            index = _positionals(parser).index(action)
            values = draw(st.lists(_values(action), min_size=0 if action.nargs in ("?", "*") else 1,
                                   max_size=1 if action.nargs in (None, "?") else 5))
            positionals[index:index + 1] = values
            # A message names a positional by its value; there is one to look for only when one replaced one.
            generated[action.dest] = values[0] if len(values) == 1 and action.nargs in (None, "?") else None
            continue
        for flag in action.option_strings:
            options.pop(flag, None)
        flag = draw(st.sampled_from(action.option_strings))
        takes_value = action.nargs != 0
        if takes_value and (action.nargs != "?" or draw(st.booleans())):
            options[flag] = draw(_values(action))
        else:
            options[flag] = None
        generated[flag] = options[flag]
    return positionals + [flag if value is None else f"{flag}={value}" for flag, value in options.items()], generated


# ---------------------------------------------------------------------------------------------
# The test
# ---------------------------------------------------------------------------------------------

def _check_answer(script: Script, argv: list[str], generated: dict[str, str | None],
                  capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    try:
        code = run(script.main, argv)
    except ChecksPassed:
        code = 0
    err = capsys.readouterr().err
    assert "Traceback" not in err, (argv, err)
    assert code in (0, 2), (argv, code, err)
    assert err.count("error:") == (1 if code == 2 else 0), (argv, err)
    (flag, value), *others = generated.items()
    if code == 2 and not others and (flag.startswith("-") or value is not None):
        # The message names the one flag (or positional) given, or shows the value given to it.
        assert flag.lstrip("-").replace("-", "_") in err.replace("-", "_") or (value and value in err), (argv, err)


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_generated_flags_are_answered_without_traceback(name: str, inputs: dict[str, str], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    script = SCRIPTS[name]
    monkeypatch.chdir(tmp_path)  # a generated relative output path stays in the test's folder
    _stop_heavy_work(script, monkeypatch)
    start = time.perf_counter()

    @settings(settings.get_profile("generated-flags"))
    @given(command_line=command_lines(script, inputs))
    def answers(command_line: tuple[list[str], dict[str, str | None]]) -> None:
        _check_answer(script, *command_line, capsys)

    answers()
    print(f"{name}: {EXAMPLES} generated command lines in {time.perf_counter() - start:.1f} s")


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_the_base_command_line_passes_the_checks(name: str, inputs: dict[str, str], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The generated values replace flags of a command line that reaches the heavy work (so the test can fail)."""
    script = SCRIPTS[name]
    monkeypatch.chdir(tmp_path)
    _stop_heavy_work(script, monkeypatch)
    positionals, options = _base_command_line(script, inputs)
    argv = positionals + [part for flag, value in options.items() for part in (flag, value) if part is not None]
    if script.stop is None:
        assert run(script.main, argv) == 0
    else:
        with pytest.raises(ChecksPassed):
            run(script.main, argv)


# Scripts whose command line is another's with other defaults (tool_add_control's, tutorial_train's), and
# tutorial_dataset.py, which has none.
NOT_LISTED = {"tool_add_control_sd21", "tutorial_train_sd21", "tutorial_train_dist", "tutorial_dataset"}


def test_every_script_is_covered() -> None:
    scripts = {path.stem for pattern in ("tool_*.py", "tutorial_*.py") for path in REPO_ROOT.glob(pattern)}
    assert scripts == set(SCRIPTS) | NOT_LISTED
