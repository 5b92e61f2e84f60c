"""cldm/evaluation/metrics.py on synthetic images with known answers (Fill50K items drawn by cldm/data/fill50k.py)."""
from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest

from cldm.data.fill50k import NAMED_COLOURS, draw_pair, parse_prompt, sample_item
from cldm.evaluation import metrics
from cldm.evaluation.metrics import (
    CONTROL_F1,
    colour_errors,
    edge_fidelity,
    edge_scores,
    edge_tolerance,
    hint_edges,
    is_edge_map,
    ssim,
)

ITEMS = range(12)


def pair(index: int, size: int = 64, **changes) -> tuple[np.ndarray, np.ndarray, str]:
    """(hint, target) of Fill50K item `index` as RGB batches of one, and its prompt; `changes` edit the item."""
    item = dataclasses.replace(sample_item(0, index, size), **changes)
    source, target = draw_pair(item, size)
    rgb = [cv2.cvtColor(image, cv2.COLOR_BGR2RGB)[None] for image in (source, target)]
    return rgb[0], rgb[1], item.prompt


def f1(images: np.ndarray, hints: np.ndarray) -> float:
    return float(edge_fidelity(images, hints)[CONTROL_F1][0])


# ---------------------------------------------------------------------------------------------
# Edges
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [64, 256])
def test_a_target_against_its_own_hint_scores_f1_close_to_1(size):
    scores = [f1(target, hint) for hint, target, _ in map(lambda i: pair(i, size), ITEMS)]
    assert min(scores) > 0.95, scores


def test_a_target_shifted_by_16_px_scores_low():
    scores = [f1(np.roll(target, 16, axis=2), hint) for hint, target, _ in map(pair, ITEMS)]
    assert max(scores) < 0.3, scores


def test_a_rotated_target_scores_low():
    scores = []
    for hint, target, _ in map(pair, ITEMS):
        rotated = np.ascontiguousarray(np.rot90(target, axes=(1, 2)))
        ys, xs = np.nonzero(hint[0, ..., 0] > 127)
        centre = np.array([xs.mean(), ys.mean()]) - 31.5
        if np.linalg.norm(centre) * np.sqrt(2) >= 16:  # the rotation moves the circle by 16 px or more
            scores.append(f1(rotated, hint))
    assert len(scores) >= 6 and max(scores) < 0.3, scores


def test_noise_scores_near_0():
    rng = np.random.default_rng(0)
    scores = [f1(rng.integers(0, 256, (1, 256, 256, 3), dtype=np.uint8), hint)
              for hint, _, _ in map(lambda i: pair(i, 256), ITEMS)]
    assert max(scores) < 0.15, scores


def test_edge_scores_by_hand():
    reference = np.zeros((1, 32, 32), bool)
    reference[0, 10, 4:28] = True  # a horizontal line
    empty = np.zeros_like(reference)
    for shift, expected in [(0, 1.0), (2, 1.0), (3, 0.0)]:  # tolerance 2 px
        scores = edge_scores(np.roll(reference, shift, axis=1), reference, tolerance=2)
        assert scores[CONTROL_F1][0] == expected, shift
    half = reference.copy()
    half[0, 10, 16:] = False  # half the line: precision 1, recall 12/24 -> F1 = 2/3
    scores = edge_scores(half, reference, tolerance=0)
    assert (scores["control_precision"][0], scores["control_recall"][0]) == (1.0, 0.5)
    assert scores[CONTROL_F1][0] == pytest.approx(2 / 3)
    assert edge_scores(empty, empty, 2)[CONTROL_F1][0] == 1.0  # nothing to draw, nothing drawn
    assert edge_scores(empty, reference, 2)[CONTROL_F1][0] == 0.0
    assert edge_scores(reference, empty, 2)[CONTROL_F1][0] == 0.0


def test_edge_tolerance_scales_with_the_short_side():
    assert [edge_tolerance(size, size) for size in (64, 256, 512, 1024)] == [2, 2, 4, 8]
    assert edge_tolerance(512, 64) == 2


def test_edge_map_hints_are_binarised_and_other_hints_go_through_canny():
    hint, target, _ = pair(3)
    assert is_edge_map(hint[0]) and not is_edge_map(target[0])
    assert np.array_equal(hint_edges(hint)[0], hint[0, ..., 0] > 127)
    assert np.array_equal(hint_edges(target)[0], cv2.Canny(target[0], 100, 200) > 0)
    gradient = np.repeat(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], 64, axis=0).repeat(3, axis=2)
    assert not is_edge_map(gradient)  # a soft (depth-like) map


def test_wrong_batches_are_refused():
    hint, target, _ = pair(0)
    with pytest.raises(TypeError, match="uint8"):
        edge_fidelity(target.astype(np.float32), hint)
    with pytest.raises(ValueError, match="same shape"):
        edge_fidelity(target[:, :32], hint)
    with pytest.raises(ValueError, match=r"\(N, H, W, 3\)"):
        edge_fidelity(target[0], hint[0])


# ---------------------------------------------------------------------------------------------
# SSIM
# ---------------------------------------------------------------------------------------------


def test_ssim_of_flat_images_is_the_luminance_term():
    # Without variance, SSIM = (2 a b + C1) / (a^2 + b^2 + C1) exactly.
    a, b = np.full((1, 32, 32, 3), 100, np.uint8), np.full((1, 32, 32, 3), 150, np.uint8)
    c1 = (0.01 * 255) ** 2
    assert ssim(a, b)[0] == pytest.approx((2 * 100 * 150 + c1) / (100**2 + 150**2 + c1))


def test_ssim_is_1_for_equal_images_and_low_for_unrelated_ones():
    hint, target, _ = pair(5, 128)
    noise = np.random.default_rng(0).integers(0, 256, hint.shape, dtype=np.uint8)
    assert ssim(hint, hint)[0] == pytest.approx(1.0)
    assert ssim(hint, noise)[0] == pytest.approx(ssim(noise, hint)[0])
    assert abs(ssim(hint, noise)[0]) < 0.1
    blurred = cv2.GaussianBlur(hint[0], (5, 5), 1.0)[None]
    assert abs(ssim(hint, noise)[0]) < ssim(hint, blurred)[0] < 1.0


def test_detector_ssim_runs_the_detector_on_the_image():
    hint, target, _ = pair(2)
    inverted = 255 - hint
    assert metrics.detector_ssim(inverted, hint, lambda image: 255 - image)[0] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# Fill50K colours
# ---------------------------------------------------------------------------------------------


def test_parse_prompt_reads_every_fill50k_prompt():
    for index in range(50):
        item = sample_item(1, index, 64)
        assert parse_prompt(item.prompt) == (item.circle_colour, item.background_colour)
    assert parse_prompt("light golden rod yellow circle with dark slate gray background") == (
        "light golden rod yellow", "dark slate gray")
    for other in ["a bird on a branch", "red circle with plaid background", "red square with blue background", ""]:
        assert parse_prompt(other) is None


def test_a_perfectly_coloured_circle_has_colour_error_near_0():
    for index in ITEMS:
        hint, target, prompt = pair(index)
        errors = colour_errors(target, hint, [prompt])
        assert errors["colour_error"][0] < 0.5, (index, errors)


def test_a_circle_cut_by_the_border_is_measured_too():
    hint, target, prompt = pair(0, centre=(2, 60), radius=18)
    errors = colour_errors(target, hint, [prompt])
    assert errors["circle_colour_error"][0] < 0.5 and errors["background_colour_error"][0] < 0.5


def test_swapped_colours_give_the_distance_between_the_named_colours():
    hint, target, _ = pair(0, circle_colour="red", background_colour="blue")
    _, swapped, _ = pair(0, circle_colour="blue", background_colour="red")
    prompt = "red circle with blue background"
    red, blue = (metrics._lab(np.asarray(NAMED_COLOURS[name], np.uint8)) for name in ("red", "blue"))
    errors = colour_errors(swapped, hint, [prompt])
    assert errors["colour_error"][0] == pytest.approx(np.linalg.norm(red - blue), abs=0.5)
    assert errors["colour_error"][0] > 100 and colour_errors(target, hint, [prompt])["colour_error"][0] < 0.5


def test_other_prompts_and_hints_without_a_circle_give_nan():
    hint, target, prompt = pair(4)
    images = np.concatenate([target, target])
    errors = colour_errors(images, np.concatenate([hint, np.zeros_like(hint)]), [prompt, prompt])
    assert not np.isnan(errors["colour_error"][0]) and np.isnan(errors["colour_error"][1])
    errors = colour_errors(target, hint, ["a bird"])
    assert all(np.isnan(values[0]) for values in errors.values())


def test_control_metrics_holds_every_metric_per_sample():
    hint, target, prompt = pair(6)
    images, hints = np.concatenate([target, target]), np.concatenate([hint, hint])
    result = metrics.control_metrics(images, hints, [prompt, "a bird"], detector=lambda image: image)
    assert set(result) == {"control_precision", "control_recall", "control_f1", "control_ssim",
                           "circle_colour_error", "background_colour_error", "colour_error"}
    assert all(values.shape == (2,) for values in result.values())
    assert np.isnan(result["colour_error"][1]) and result["control_f1"][1] == result["control_f1"][0]
