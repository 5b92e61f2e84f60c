"""ldm.util: config instantiation errors and caption images."""
from __future__ import annotations

import pytest
import torch

from ldm.util import default, instantiate_from_config, log_txt_as_img, to_device


def test_instantiate_from_config_builds_target_with_params():
    layer = instantiate_from_config({"target": "torch.nn.Linear", "params": {"in_features": 2, "out_features": 3}})
    assert isinstance(layer, torch.nn.Linear) and layer.out_features == 3
    assert isinstance(instantiate_from_config({"target": "torch.nn.Identity"}), torch.nn.Identity)


@pytest.mark.parametrize("config, message", [
    ({"target": "no_such_package.Model"}, "cannot import module 'no_such_package'"),
    ({"target": "torch.nn.NoSuchLayer"}, "has no attribute 'NoSuchLayer'"),
    ({"params": {}}, "no 'target' key"),
])
def test_instantiate_from_config_errors_name_the_problem(config, message):
    with pytest.raises((ImportError, KeyError), match=message):
        instantiate_from_config(config)


def test_special_targets_mean_no_module():
    assert instantiate_from_config("__is_unconditional__") is None


def test_default_calls_a_fallback_function_only_when_needed():
    assert default(3, lambda: 1 / 0) == 3
    assert default(None, lambda: 5) == 5


def test_caption_images_are_white_canvases_with_dark_text():
    images = log_txt_as_img((256, 128), ["burly wood circle with orange background", ""], size=12)
    assert images.shape == (2, 3, 128, 256)
    assert images.min() >= -1 and images.max() <= 1
    assert images[0].min() < 0 and torch.all(images[1] == 1)  # text drawn on the first, blank second


def test_to_device_keeps_values_and_casts_on_the_host():
    noise = torch.randn(2, 3, generator=torch.Generator().manual_seed(0))
    moved = to_device(noise, torch.device("cpu"), torch.bfloat16)
    assert moved.dtype == torch.bfloat16 and torch.equal(moved, noise.to(torch.bfloat16))
    assert to_device(noise, torch.device("cpu")) is noise  # nothing to copy
