"""cldm/evaluation/evaluate.py on the tiny config: fixed per-item seeds, untouched random state and training mode,
the result's summaries, the grid, and items read from a data set."""
from __future__ import annotations

import random

import cv2
import numpy as np
import pytest
import torch

from cldm.data.dataset import MyDataset
from cldm.evaluation.evaluate import (
    EvalItem,
    dataset_items,
    evaluate_control,
    item_noise,
    pairs_grid,
    sample_items,
    score_images,
)
from tests.helpers.paths import TINY_CONFIG
from tests.helpers.random_weights import model_without_zero_layers
from tiny_training import make_data

FAST = dict(ddim_steps=2, guidance_scale=3.0)


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    """The tiny ControlLDM with every weight random (zero convs included), so the hint changes the samples."""
    return model_without_zero_layers(str(TINY_CONFIG))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_data(tmp_path_factory.mktemp("eval") / "fill", 3)


@pytest.fixture(scope="module")
def items(data) -> list[EvalItem]:
    return dataset_items(MyDataset(root=str(data)), range(3))


def test_dataset_items_are_the_files_as_uint8_rgb(data, items):
    for index, item in enumerate(items):
        source = cv2.cvtColor(cv2.imread(str(data / "source" / f"{index}.png")), cv2.COLOR_BGR2RGB)
        target = cv2.cvtColor(cv2.imread(str(data / "target" / f"{index}.png")), cv2.COLOR_BGR2RGB)
        assert np.array_equal(item.hint, source) and np.array_equal(item.target, target)
        assert item.index == index and item.prompt.endswith("background")


def test_item_noise_depends_on_seed_and_position_only():
    assert torch.equal(item_noise(0, 2, (4, 8, 8)), item_noise(0, 2, (4, 8, 8)))
    assert not torch.equal(item_noise(0, 2, (4, 8, 8)), item_noise(0, 1, (4, 8, 8)))
    assert not torch.equal(item_noise(0, 2, (4, 8, 8)), item_noise(1, 2, (4, 8, 8)))


def test_the_samples_do_not_depend_on_the_batch_size(model, items):
    whole = sample_items(model, items, batch_size=3, **FAST)
    one_by_one = sample_items(model, items, batch_size=1, **FAST)
    assert all(np.abs(a.astype(int) - b.astype(int)).max() <= 1 for a, b in zip(whole, one_by_one))
    assert not np.array_equal(whole[0], whole[1])  # each item its own noise and hint
    other_seed = sample_items(model, items, batch_size=3, seed=1, **FAST)
    assert not np.array_equal(whole[0], other_seed[0])


def test_with_eta_each_item_is_seeded_on_its_own(model, items):
    pairs = sample_items(model, items, batch_size=2, eta=1.0, **FAST)
    singles = sample_items(model, items, batch_size=1, eta=1.0, **FAST)
    assert all(np.array_equal(a, b) for a, b in zip(pairs, singles))
    assert not np.array_equal(pairs[0], sample_items(model, items[:1], **FAST)[0])


def test_random_state_training_flags_and_weights_are_left_as_they_were(model, items):
    model.train()
    model.first_stage_model.eval()  # a frozen part in eval mode, as the training job keeps it
    flags = [module.training for module in model.modules()]
    weights = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    expected = random.random(), np.random.rand(), torch.rand(3)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    evaluate_control(model, items[:2], eta=1.0, **FAST)
    assert (random.random(), np.random.rand()) == expected[:2] and torch.equal(torch.rand(3), expected[2])
    assert [module.training for module in model.modules()] == flags
    assert all(torch.equal(tensor, weights[name]) for name, tensor in model.state_dict().items())
    model.eval()


def test_evaluate_control_scores_the_samples(model, items):
    result = evaluate_control(model, items, **FAST)
    again = score_images(result.images, items)
    assert len(result.images) == 3 and result.images[0].shape == items[0].hint.shape
    assert all(np.array_equal(result.metrics[name], again.metrics[name]) for name in result.metrics)


def test_the_summary_skips_what_does_not_apply(items):
    targets = [item.target for item in items]
    items = [*items[:2], EvalItem(items[2].hint, "a bird", items[2].target, 2)]  # not a Fill50K prompt
    result = score_images(targets, items)
    summary = result.summary()
    assert summary["control_f1"].count == 3 and summary["control_f1"].mean > 0.95
    assert summary["colour_error"].count == 2 and summary["colour_error"].max < 0.5
    records = result.per_item()
    assert [record["index"] for record in records] == [0, 1, 2]
    assert records[2]["colour_error"] is None and records[2]["prompt"] == "a bird"
    assert result.means()["control_f1"] == pytest.approx(np.mean(result.metrics["control_f1"]))


def test_the_grid_holds_hint_and_sample_side_by_side(items):
    result = score_images([item.target for item in items], items)
    grid = pairs_grid(result, pairs_per_row=2)
    assert grid.shape == (2 * 64, 4 * 64, 3)
    assert np.array_equal(grid[:64, :64], items[0].hint) and np.array_equal(grid[:64, 64:128], items[0].target)
    assert np.array_equal(grid[64:, :64], items[2].hint) and not grid[64:, 128:].any()
