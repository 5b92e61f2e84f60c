"""The training job's guards, on the tiny config: non-finite losses and gradients, and image logging that never
changes the training trajectory nor ends a run."""
from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import tool_export_diffusers
import tool_extract_control
import tutorial_train
from cldm.training.callbacks import NonFiniteLossError, NonFiniteLossGuard
from ldm.checkpoint import read_checkpoint
from cldm.cli import run

from tiny_training import (
    TINY_CONFIG, config_with_model, make_data, make_initial_weights, train_args)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("guards")
    return dict(tmp=tmp, initial=make_initial_weights(tmp / "control_tiny_ini.ckpt"), data=make_data(tmp / "fill", 8))


def _train(setup: dict[str, Path], root: Path, *extra: str, config: Path | None = None) -> int:
    config_args = {} if config is None else {"config": config}
    return run(tutorial_train.main, train_args(setup["initial"], setup["data"], root, *extra, **config_args))


def _checkpoint(root: Path, name: str = "last.ckpt") -> dict:
    return read_checkpoint(root / "checkpoints" / name, mmap=False)


def _all_finite(checkpoint: dict) -> bool:
    return all(torch.isfinite(value).all() for value in checkpoint["state_dict"].values())


def _same_weights(a: dict, b: dict, prefix: str = "") -> bool:
    return all(torch.equal(value, b["state_dict"][key]) for key, value in a["state_dict"].items()
               if key.startswith(prefix))


# ---------------------------------------------------------------------------------------------
# Non-finite loss and gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault,problem", [("nan_loss_steps", "the loss became nan"),
                                           ("nan_grad_steps", "the gradients became non-finite")])
def test_non_finite_values_stop_training_and_keep_the_last_good_checkpoint(setup, capsys, fault, problem) -> None:
    config = config_with_model(setup["tmp"], "faulty_controlldm.NonFiniteLossControlLDM", **{fault: [3]})
    root = setup["tmp"] / f"stop_{fault}"
    code = _train(setup, root, "--max_steps", "6", "--checkpoint_every_n_steps", "1", "--logger_freq", "100",
                  config=config)
    err = capsys.readouterr().err
    assert code == 2, err[-3000:]
    last = root / "checkpoints" / "last.ckpt"
    expected = (f"error: {problem} at step 3, so training stopped; the last good checkpoint is {last}: resume from "
                f"it with --resume_from_checkpoint last after lowering --learning_rate or using --precision 32, or "
                f"pass --skip_nonfinite to skip such steps")
    assert expected in err.splitlines() and "Traceback" not in err
    checkpoint = _checkpoint(root)
    assert checkpoint["global_step"] == 3 and _all_finite(checkpoint)
    assert _same_weights(checkpoint, _checkpoint(root, "step-0000003.ckpt"))
    assert sorted(path.name for path in last.parent.iterdir()) == [
        "last.ckpt", "step-0000001.ckpt", "step-0000002.ckpt", "step-0000003.ckpt"]


def test_skip_nonfinite_skips_the_step_and_trains_on(setup, caplog) -> None:
    config = config_with_model(setup["tmp"], "faulty_controlldm.NonFiniteLossControlLDM", nan_loss_steps=[2],
                               nan_grad_steps=[3])
    root = setup["tmp"] / "skip"
    with caplog.at_level(logging.WARNING, logger="cldm.training.callbacks"):
        code = _train(setup, root, "--max_steps", "5", "--checkpoint_every_n_steps", "1", "--keep_last_k", "10",
                      "--logger_freq", "100", "--skip_nonfinite", config=config)
    assert code == 0
    skipped = [record.getMessage() for record in caplog.records if "skipped" in record.getMessage()]
    assert skipped == ["step 2 skipped (loss nan); 1 skipped so far",
                       "step 3 skipped (non-finite gradients); 2 skipped so far"]
    steps = [_checkpoint(root, f"step-{step:07d}.ckpt") for step in range(1, 6)]
    assert all(_all_finite(checkpoint) for checkpoint in steps)
    assert steps[-1]["global_step"] == 5
    # Skipped steps change nothing (weights, and AdamW moments: the next real step is the same as without them).
    assert _same_weights(steps[1], steps[2], "control_model.") and _same_weights(steps[2], steps[3], "control_model.")
    assert not _same_weights(steps[3], steps[4], "control_model.") and not _same_weights(steps[0], steps[1])


# ---------------------------------------------------------------------------------------------
# Image logging
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def never_logged(setup) -> dict:
    root = setup["tmp"] / "never_logged"
    assert _train(setup, root, "--max_steps", "3", "--log_max_images", "0") == 0
    assert not (root / "image_log").exists()
    return _checkpoint(root)


def test_logging_images_every_step_leaves_the_training_trajectory_unchanged(setup, never_logged) -> None:
    root = setup["tmp"] / "logged_every_step"
    assert _train(setup, root, "--max_steps", "3", "--logger_freq", "1") == 0
    grids = sorted(path.name for path in (root / "image_log" / "train").iterdir())
    assert [name for name in grids if name.startswith("samples")] == [
        f"samples_cfg_scale_9.00_gs-{step:06d}_e-000000_b-{step - 1:06d}.png" for step in (1, 2, 3)]
    logged = _checkpoint(root)
    assert _same_weights(logged, never_logged)
    for key, state in never_logged["optimizer_states"][0]["state"].items():
        for name, tensor in state.items():
            assert torch.equal(logged["optimizer_states"][0]["state"][key][name], tensor), (key, name)


def test_a_failure_inside_log_images_is_reported_and_training_goes_on(setup, never_logged, caplog) -> None:
    config = config_with_model(setup["tmp"], "faulty_controlldm.FailingLogImagesControlLDM")
    root = setup["tmp"] / "failing_logger"
    with caplog.at_level(logging.WARNING, logger="cldm.logger"):
        assert _train(setup, root, "--max_steps", "3", "--logger_freq", "1", config=config) == 0
    failures = [record.getMessage() for record in caplog.records if "image logging failed" in record.getMessage()]
    assert len(failures) == 3 and "simulated failure while sampling the image grid" in failures[0]
    # The failed sampler drew random numbers and switched modes: none of it reached the training trajectory.
    assert _same_weights(_checkpoint(root), never_logged)


# ---------------------------------------------------------------------------------------------
# A real training checkpoint is data only, and its training state never gets in the way
# ---------------------------------------------------------------------------------------------


def test_training_checkpoints_convert_and_export(setup, never_logged, tmp_path) -> None:
    last = setup["tmp"] / "never_logged" / "checkpoints" / "last.ckpt"
    assert {"epoch", "global_step", "loops", "callbacks", "optimizer_states"} <= set(never_logged)
    assert run(tool_extract_control.main, [str(last), str(tmp_path / "control.safetensors")]) == 0
    control = read_checkpoint(tmp_path / "control.safetensors")
    assert control.keys() == {key for key in never_logged["state_dict"] if key.startswith("control_model.")}
    exported = tmp_path / "controlnet-diffusers"
    assert run(tool_export_diffusers.main, [str(last), str(exported), "--config", str(TINY_CONFIG)]) == 0
    assert sorted(path.name for path in exported.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]


@pytest.mark.parametrize("optimizer_in_backward", [True, False])
def test_the_loss_is_checked_before_backward_only_when_backward_updates_the_weights(tmp_path, optimizer_in_backward):
    """With the optimizer in backward a NaN loss must stop before backward; otherwise one check before the step
    covers loss and gradients (one host sync per step)."""
    guard = NonFiniteLossGuard(tmp_path, check_before_backward=optimizer_in_backward)
    trainer = SimpleNamespace(global_step=4, precision_plugin=None,
                              strategy=SimpleNamespace(reduce_boolean_decision=lambda decision, all: decision))
    module = SimpleNamespace()
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1)
    if optimizer_in_backward:
        with pytest.raises(NonFiniteLossError, match="the loss became nan at step 4"):
            guard.on_before_backward(trainer, module, torch.tensor(float("nan")))
        return
    guard.on_before_backward(trainer, module, torch.tensor(float("nan")))
    with pytest.raises(NonFiniteLossError, match="the loss became nan at step 4"):
        guard.on_before_optimizer_step(trainer, module, optimizer)
