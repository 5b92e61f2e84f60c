"""Control-fidelity metrics: does a generated image follow its hint (and, for Fill50K, its prompt)?

Every function takes batches of uint8 RGB images as NumPy arrays of shape (N, H, W, 3) and returns one value per
sample, so a caller can average, spread or plot them. The idea follows the controllability measures of later work
(e.g. ControlNet++): run the condition's own detector on the generated image and compare with the given condition.

* Edge fidelity (`edge_fidelity`): Canny edges of the image against the hint's edges, precision, recall and F1
  with a tolerance of a few pixels.
* Structural similarity (`ssim`): for soft hints (HED, depth, line art), SSIM of the hint and a detector's output.
* Fill50K colour error (`colour_errors`): the mean CIELAB colour inside and outside the hint's circle against the
  colours the prompt names.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import cv2
import numpy as np

from cldm.data.fill50k import NAMED_COLOURS, parse_prompt

# The original annotator's Canny thresholds (annotator/canny, gradio_canny2image.py defaults).
CANNY_LOW, CANNY_HIGH = 100, 200
# A pixel of a grey hint counts as "on" above this value (hints are black with white strokes).
BINARY_THRESHOLD = 127
# A hint is an edge map when it is grey and nearly binary: at most this fraction of its pixels lie strictly
# between DARK and LIGHT (the anti-aliased rim of a drawn outline stays well below it; a soft map does not).
EDGE_MAP_MAX_GREY_FRACTION = 0.1
DARK, LIGHT = 32, 223
# SSIM (Wang et al. 2004): an 11x11 Gaussian window of sigma 1.5 and the constants for 8-bit images.
SSIM_WINDOW, SSIM_SIGMA = 11, 1.5
SSIM_C1, SSIM_C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
# A Fill50K hint needs this many outline pixels for its circle to be fitted.
MIN_OUTLINE_PIXELS = 8

CONTROL_PRECISION, CONTROL_RECALL, CONTROL_F1 = "control_precision", "control_recall", "control_f1"
CONTROL_SSIM = "control_ssim"
CIRCLE_COLOUR_ERROR, BACKGROUND_COLOUR_ERROR = "circle_colour_error", "background_colour_error"
COLOUR_ERROR = "colour_error"

Detector = Callable[[np.ndarray], np.ndarray]


def _check_batch(images: np.ndarray, name: str) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise TypeError(f"{name} must be a uint8 NumPy array, got {getattr(images, 'dtype', type(images))}")
    if images.ndim != 4 or images.shape[3] != 3:
        raise ValueError(f"{name} must have the shape (N, H, W, 3), got {images.shape}")


def _check_pair(images: np.ndarray, hints: np.ndarray) -> None:
    _check_batch(images, "images")
    _check_batch(hints, "hints")
    if images.shape != hints.shape:
        raise ValueError(f"images {images.shape} and hints {hints.shape} must have the same shape")


# ---------------------------------------------------------------------------------------------
# Edges
# ---------------------------------------------------------------------------------------------


def canny(images: np.ndarray) -> np.ndarray:
    """Edge masks (N, H, W) bool: `cv2.Canny(image, 100, 200)` on the RGB image, as the original annotator runs it
    (OpenCV takes the strongest channel's gradient at each pixel)."""
    _check_batch(images, "images")
    return np.stack([cv2.Canny(image, CANNY_LOW, CANNY_HIGH) > 0 for image in images])


def is_edge_map(hint: np.ndarray) -> bool:
    """Whether one (H, W, 3) uint8 hint is an edge map (Canny, scribble, Fill50K outline): grey, and at most 10 %
    of its pixels lie strictly between 32 and 223."""
    grey = np.ptp(hint.astype(np.int16), axis=2).max() <= 8
    between = np.mean((hint[..., 0] > DARK) & (hint[..., 0] < LIGHT))
    return bool(grey and between <= EDGE_MAP_MAX_GREY_FRACTION)


def hint_edges(hints: np.ndarray) -> np.ndarray:
    """Reference edges (N, H, W) bool: an edge-map hint binarised (grey value > 127), any other hint's Canny edges."""
    _check_batch(hints, "hints")
    return np.stack([
        hint[..., 0] > BINARY_THRESHOLD if is_edge_map(hint) else cv2.Canny(hint, CANNY_LOW, CANNY_HIGH) > 0
        for hint in hints
    ])


def edge_tolerance(height: int, width: int) -> int:
    """Pixels an edge may be off and still match: 1/128 of the short side, at least 2 (2 px up to 319 px, 4 px at
    512 px, 8 px at 1024 px)."""
    return max(2, int(min(height, width) / 128 + 0.5))


def _within(mask: np.ndarray, reference: np.ndarray, tolerance: float) -> np.ndarray:
    """Pixels of `mask` whose Euclidean distance to the nearest pixel of `reference` is at most `tolerance`."""
    not_reference = np.where(reference, 0, 255).astype(np.uint8)
    distance = cv2.distanceTransform(not_reference, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return mask & (distance <= tolerance)


def edge_scores(predicted: np.ndarray, reference: np.ndarray, tolerance: float) -> dict[str, np.ndarray]:
    """Precision, recall and F1 of edge masks (N, H, W) bool, each of shape (N,).

    With P the predicted and R the reference edge pixels, and d(p, S) the distance from p to the nearest pixel of S:

        precision = |{p in P : d(p, R) <= tolerance}| / |P|     (1 when P is empty: nothing was drawn wrongly)
        recall    = |{r in R : d(r, P) <= tolerance}| / |R|     (1 when R is empty: nothing was missed)
        F1        = 2 precision recall / (precision + recall)   (0 when both are 0)

    So both empty gives F1 = 1, and exactly one empty gives F1 = 0. Each side is matched to the nearest pixel of the
    other (a distance transform), not one-to-one as in the BSDS benchmark, so F1 is slightly optimistic for thick
    strokes.
    """
    if predicted.shape != reference.shape or predicted.ndim != 3:
        raise ValueError(f"edge masks must both be (N, H, W), got {predicted.shape} and {reference.shape}")
    scores = {CONTROL_PRECISION: [], CONTROL_RECALL: [], CONTROL_F1: []}
    for pred, ref in zip(predicted, reference):
        precision = _within(pred, ref, tolerance).sum() / pred.sum() if pred.any() else 1.0
        recall = _within(ref, pred, tolerance).sum() / ref.sum() if ref.any() else 1.0
        total = precision + recall
        scores[CONTROL_PRECISION].append(precision)
        scores[CONTROL_RECALL].append(recall)
        scores[CONTROL_F1].append(2 * precision * recall / total if total > 0 else 0.0)
    return {key: np.asarray(values, dtype=np.float64) for key, values in scores.items()}


def edge_fidelity(images: np.ndarray, hints: np.ndarray, tolerance: float | None = None) -> dict[str, np.ndarray]:
    """`edge_scores` of the images' Canny edges against `hint_edges(hints)`; the tolerance defaults to
    `edge_tolerance` of the image size. Keys: control_precision, control_recall, control_f1."""
    _check_pair(images, hints)
    if tolerance is None:
        tolerance = edge_tolerance(*images.shape[1:3])
    return edge_scores(canny(images), hint_edges(hints), tolerance)


# ---------------------------------------------------------------------------------------------
# Structural similarity
# ---------------------------------------------------------------------------------------------


def _grey(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float64)


def _window_mean(image: np.ndarray) -> np.ndarray:
    """Gaussian-weighted local means at the positions where the whole SSIM window lies inside the image."""
    crop = SSIM_WINDOW // 2
    return cv2.GaussianBlur(image, (SSIM_WINDOW, SSIM_WINDOW), SSIM_SIGMA)[crop:-crop, crop:-crop]


def ssim(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """SSIM (Wang et al. 2004) of two batches (N, H, W, 3) uint8, per sample, on their grey values (BT.601 luma).

    With Gaussian-weighted local means mu, variances sigma^2 and covariance sigma_xy (11x11 window, sigma 1.5):

        SSIM(x, y) = (2 mu_x mu_y + C1) (2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1) (sigma_x^2 + sigma_y^2 + C2)),
        C1 = (0.01 * 255)^2, C2 = (0.03 * 255)^2,

    averaged over the positions where the window lies inside the image (the reference code's 'valid' filtering).
    1 for identical images; near 0 for unrelated ones.
    """
    _check_pair(first, second)
    if min(first.shape[1:3]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW} px a side, got {first.shape[1:3]}")
    values = []
    for a, b in zip(first, second):
        x, y = _grey(a), _grey(b)
        mu_x, mu_y = _window_mean(x), _window_mean(y)
        var_x, var_y = _window_mean(x * x) - mu_x**2, _window_mean(y * y) - mu_y**2
        cov = _window_mean(x * y) - mu_x * mu_y
        ssim_map = ((2 * mu_x * mu_y + SSIM_C1) * (2 * cov + SSIM_C2)
                    / ((mu_x**2 + mu_y**2 + SSIM_C1) * (var_x + var_y + SSIM_C2)))
        values.append(ssim_map.mean())
    return np.asarray(values, dtype=np.float64)


def detector_ssim(images: np.ndarray, hints: np.ndarray, detector: Detector) -> np.ndarray:
    """SSIM of each hint and `detector(image)` (the hint's own annotator, returning a uint8 (H, W, 3) map)."""
    _check_pair(images, hints)
    return ssim(np.stack([detector(image) for image in images]), hints)


# ---------------------------------------------------------------------------------------------
# Fill50K colours
# ---------------------------------------------------------------------------------------------


def region_margin(height: int, width: int) -> int:
    """Pixels kept clear of the outline on both sides when measuring colours: 1/64 of the short side, at least 3
    (the 2 px anti-aliased outline and the blur of a generated edge)."""
    return max(3, int(min(height, width) / 64 + 0.5))


def fit_circle(outline: np.ndarray) -> tuple[float, float, float] | None:
    """(x, y, radius) of the circle through the True pixels of an (H, W) mask, or None with fewer than 8 of them.

    Kasa's algebraic fit: the least-squares solution of x^2 + y^2 + D x + E y + F = 0 over the pixels gives the
    centre (-D/2, -E/2) and the radius sqrt(D^2/4 + E^2/4 - F). It also fits a circle that the image border cuts.
    """
    ys, xs = np.nonzero(outline)
    if len(xs) < MIN_OUTLINE_PIXELS:
        return None
    xs, ys = xs.astype(np.float64), ys.astype(np.float64)
    system = np.stack([xs, ys, np.ones_like(xs)], axis=1)
    (d, e, f), *_ = np.linalg.lstsq(system, -(xs**2 + ys**2), rcond=None)
    squared_radius = d * d / 4 + e * e / 4 - f
    return (-d / 2, -e / 2, float(np.sqrt(squared_radius))) if squared_radius > 0 else None


def circle_regions(hint: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(inside, outside) masks (H, W) bool of a Fill50K hint's circle, both `region_margin` px away from the
    outline; None when the hint holds no circle to fit."""
    circle = fit_circle(hint[..., 0] > BINARY_THRESHOLD)
    if circle is None:
        return None
    x, y, radius = circle
    height, width = hint.shape[:2]
    margin = region_margin(height, width)
    rows, columns = np.mgrid[:height, :width]
    distance = np.hypot(columns - x, rows - y)
    return distance <= radius - margin, distance >= radius + margin


def _lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (L in [0, 100]) of uint8 sRGB values of shape (..., 3), D65 white, as OpenCV converts float images."""
    flat = rgb.reshape(-1, 1, 3).astype(np.float32) / 255.0
    return cv2.cvtColor(flat, cv2.COLOR_RGB2Lab).reshape(rgb.shape).astype(np.float64)


def _delta_e(image_lab: np.ndarray, region: np.ndarray, colour: tuple[int, int, int]) -> float:
    """CIE76 colour difference of the region's mean CIELAB colour and a named colour; NaN for an empty region."""
    if not region.any():
        return float("nan")
    mean = image_lab[region].mean(axis=0)
    return float(np.linalg.norm(mean - _lab(np.asarray(colour, np.uint8))))


def colour_errors(images: np.ndarray, hints: np.ndarray, prompts: Sequence[str]) -> dict[str, np.ndarray]:
    """Fill50K prompt fidelity per sample: how far the circle's and the background's colours are from the prompt's.

    The prompt "<circle colour> circle with <background colour> background" names two colours of
    `cldm.data.fill50k.NAMED_COLOURS`; the circle is fitted to the hint's outline (`circle_regions`). Then

        circle_colour_error     = || mean Lab(image inside the circle)  - Lab(circle colour) ||       (CIE76 delta E)
        background_colour_error = || mean Lab(image outside the circle) - Lab(background colour) ||
        colour_error            = (circle_colour_error + background_colour_error) / 2

    0 for a perfectly coloured image; a delta E of about 2.3 is a just noticeable difference, and swapped colours
    give the distance between the two named colours. A prompt that is not a Fill50K prompt, or a hint without a
    circle, gives NaN (not an error), so the metric is simply absent for other data sets.
    """
    _check_pair(images, hints)
    if len(prompts) != len(images):
        raise ValueError(f"got {len(prompts)} prompts for {len(images)} images")
    errors = {CIRCLE_COLOUR_ERROR: [], BACKGROUND_COLOUR_ERROR: []}
    for image, hint, prompt in zip(images, hints, prompts):
        colours, regions = parse_prompt(prompt), circle_regions(hint)
        if colours is None or regions is None:
            errors[CIRCLE_COLOUR_ERROR].append(float("nan"))
            errors[BACKGROUND_COLOUR_ERROR].append(float("nan"))
            continue
        image_lab = _lab(image)
        for key, region, name in zip(errors, regions, colours):
            errors[key].append(_delta_e(image_lab, region, NAMED_COLOURS[name]))
    result = {key: np.asarray(values, dtype=np.float64) for key, values in errors.items()}
    result[COLOUR_ERROR] = (result[CIRCLE_COLOUR_ERROR] + result[BACKGROUND_COLOUR_ERROR]) / 2
    return result


# ---------------------------------------------------------------------------------------------
# All of them
# ---------------------------------------------------------------------------------------------


def control_metrics(images: np.ndarray, hints: np.ndarray, prompts: Sequence[str],
                    detector: Detector | None = None) -> dict[str, np.ndarray]:
    """Every metric per sample: edge fidelity, SSIM against `detector`'s output when one is given, and the Fill50K
    colour errors (NaN for other prompts). Values of shape (N,), keyed by the names logged as `val/<name>`."""
    metrics = edge_fidelity(images, hints)
    if detector is not None:
        metrics[CONTROL_SSIM] = detector_ssim(images, hints, detector)
    metrics.update(colour_errors(images, hints, prompts))
    return metrics
