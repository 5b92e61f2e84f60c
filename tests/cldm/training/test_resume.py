"""Resuming runs: runs stopped by --max_steps continue exactly, and resumed runs say which settings changed."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from cldm.training.resume import RunSettings, check_resumed_settings, run_settings

from tiny_training import differing_tensors, make_data, make_initial_weights, train_in_stops


@pytest.fixture(scope="module")
def initial(tmp_path_factory) -> Path:
    return make_initial_weights(tmp_path_factory.mktemp("init") / "control_tiny_ini.ckpt")


# (items at batch 2, --max_steps of each run, extra flags). A run stopped by --max_steps in the middle of an epoch
# used to resume with the next epoch, and one stopped at the end of an epoch skipped the next epoch on a later resume.
CHAINS = {
    "ends-at-epoch-ends": (4, [2, 4, 5], ()),
    "with-accumulation": (6, [1, 2, 3], ("--accumulate_grad_batches", "2")),  # 2 steps per epoch of 3 batches
}


@pytest.mark.slow
@pytest.mark.parametrize("chain", list(CHAINS))
def test_runs_stopped_by_max_steps_continue_like_one_run(chain: str, initial: Path, tmp_path: Path) -> None:
    items, stops, extra = CHAINS[chain]
    data = make_data(tmp_path / "data", items)
    want = train_in_stops(initial, data, tmp_path / "straight", stops[-1:], *extra)
    got = train_in_stops(initial, data, tmp_path / "stopped", stops, *extra)
    assert got["global_step"] == want["global_step"] == stops[-1]
    assert got["epoch"] == want["epoch"]
    assert differing_tensors(got, want) == []


def _args(tmp_path: Path, checkpoint: Path | None, **flags) -> argparse.Namespace:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    if not (data / "prompt.json").exists():
        (data / "prompt.json").write_text(json.dumps({"source": "s.png", "target": "t.png", "prompt": "p"}) + "\n")
    settings = dict(batch_size=2, seed=3, precision="32-true", learning_rate=1e-5, sd_locked=True, resize="crop",
                    crop="center", buckets=False, data_root=str(data), data_shards=None)
    return argparse.Namespace(resume_from_checkpoint=None if checkpoint is None else str(checkpoint),
                              **{**settings, **flags})


def _checkpoint_with_settings(tmp_path: Path, settings: dict | None) -> Path:
    callbacks = {} if settings is None else {RunSettings.__qualname__: RunSettings(settings).state_dict()}
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, "callbacks": callbacks}, path)
    return path


@pytest.mark.parametrize("flag,value,sentence", [
    ("batch_size", 4, "--batch_size 4 differs from the batch size 2 of the run in {ckpt}; the data order continues "
                      "from the same sample, in batches of 4"),
    ("seed", 5, "--seed 5 differs from the seed 3 of the run in {ckpt}; the run continues the checkpoint's random "
                "streams and data order, so --seed 5 is not used"),
    ("precision", "bf16-mixed", "--precision bf16-mixed differs from the precision 32-true of the run in {ckpt}; "
                                "training continues in bf16-mixed"),
    ("resize", "stretch", "--resize stretch differs from the framing --resize crop --crop center of the run in {ckpt}; "
                          "the images are framed by --resize stretch from here on"),
    ("learning_rate", 2e-5, "--learning_rate 2e-05 differs from the learning rate 1e-05 of the run in {ckpt}; the "
                            "optimizer state restores 1e-05, so --learning_rate 2e-05 is not used"),
])
def test_each_changed_setting_gets_one_sentence(tmp_path: Path, flag: str, value, sentence: str) -> None:
    checkpoint = _checkpoint_with_settings(tmp_path, run_settings(_args(tmp_path, None), items=1))
    args = _args(tmp_path, checkpoint, **{flag: value})
    with pytest.warns(UserWarning) as warned:
        check_resumed_settings(args, run_settings(args, items=1))
    assert [str(warning.message) for warning in warned] == [sentence.format(ckpt=checkpoint)]


@pytest.mark.parametrize("items,counts", [(2, "2 items, was 1"), (1, "still 1 items")])
def test_a_changed_data_set_is_named_with_its_item_counts(tmp_path: Path, items: int, counts: str, recwarn) -> None:
    checkpoint = _checkpoint_with_settings(tmp_path, run_settings(_args(tmp_path, None), items=1))
    args = _args(tmp_path, checkpoint)
    (tmp_path / "data" / "prompt.json").write_text("{}\n" * items)
    check_resumed_settings(args, run_settings(args, items=items))
    assert [str(warning.message) for warning in recwarn] == [
        f"the data set's prompt.json differs from that of the run in {checkpoint} ({counts}); the run continues "
        f"the epoch from the same position in the new data set's order"]


@pytest.mark.parametrize("saved", ["same", "older-run", "resumed-without-seed"])
def test_same_settings_an_older_checkpoint_or_no_seed_say_nothing(tmp_path: Path, saved: str, recwarn) -> None:
    settings = None if saved == "older-run" else run_settings(_args(tmp_path, None), items=1)
    args = _args(tmp_path, _checkpoint_with_settings(tmp_path, settings), seed={"same": 3}.get(saved, None))
    check_resumed_settings(args, run_settings(args, items=1))
    assert len(recwarn) == 0


def test_a_seed_given_to_a_run_started_without_one_is_named(tmp_path: Path) -> None:
    checkpoint = _checkpoint_with_settings(tmp_path, run_settings(_args(tmp_path, None, seed=None), items=1))
    args = _args(tmp_path, checkpoint, seed=5)
    with pytest.warns(UserWarning, match=r"^--seed 5 differs from the random seed of the run in .*, so --seed 5 is "
                                         r"not used$"):
        check_resumed_settings(args, run_settings(args, items=1))


def test_batch_size_max_is_not_compared_before_it_is_measured(tmp_path: Path, recwarn) -> None:
    checkpoint = _checkpoint_with_settings(tmp_path, run_settings(_args(tmp_path, None), items=1))
    args = _args(tmp_path, checkpoint, batch_size="max")
    check_resumed_settings(args, run_settings(args, items=1))
    assert len(recwarn) == 0


@pytest.mark.parametrize("saved_locked,flag,then", [(True, "--no-sd_locked", "--sd_locked"),
                                                    (False, "--sd_locked", "--no-sd_locked")])
def test_another_sd_locked_is_refused(tmp_path: Path, saved_locked: bool, flag: str, then: str) -> None:
    checkpoint = _checkpoint_with_settings(tmp_path, run_settings(_args(tmp_path, None, sd_locked=saved_locked), 1))
    args = _args(tmp_path, checkpoint, sd_locked=not saved_locked)
    with pytest.raises(ValueError) as error:
        check_resumed_settings(args, run_settings(args, items=1))
    assert str(error.value) == (
        f"{flag} trains other weights than the run in {checkpoint}, which trained with {then}, so its optimizer "
        f"state does not fit; resume with {then}, or start a new run from its weights with --resume_path {checkpoint}")


@pytest.mark.parametrize("saved,now", [(False, True), (True, False)])
def test_another_buckets_setting_is_refused(tmp_path: Path, saved: bool, now: bool) -> None:
    checkpoint = _checkpoint_with_settings(tmp_path, run_settings(_args(tmp_path, None, buckets=saved), items=1))
    args = _args(tmp_path, checkpoint, buckets=now)
    with pytest.raises(ValueError, match=r"(--buckets|no --buckets): the run in .* trained (without|with) --buckets, "
                                         r"and its position in the data order counts"):
        check_resumed_settings(args, run_settings(args, items=1))


def test_a_checkpoint_without_the_framing_settings_is_not_compared_on_them(tmp_path: Path) -> None:
    saved = run_settings(_args(tmp_path, None), items=1)
    for name in ("resize", "crop", "buckets"):
        del saved[name]
    args = _args(tmp_path, _checkpoint_with_settings(tmp_path, saved), resize="stretch", buckets=True)
    check_resumed_settings(args, run_settings(args, items=1))  # neither a warning nor an error
