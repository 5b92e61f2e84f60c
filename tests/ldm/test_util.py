"""ldm.util: config checks and instantiation errors, caption images."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from ldm.modules.diffusionmodules.model import Upsample
from ldm.modules.diffusionmodules.openaimodel import UNetConfig
from ldm.util import (
    TRUSTED_MODULES_VARIABLE, ConfigError, accepted_params, check_config, check_target_name, default,
    instantiate_from_config, log_txt_as_img, required_params, to_device,
)


VAE_LOSS = {"target": "torch.nn.Identity"}


def test_instantiate_from_config_builds_target_with_params():
    config = {"target": "ldm.modules.diffusionmodules.model.Upsample",
              "params": {"in_channels": 4, "with_conv": False}}
    layer = instantiate_from_config(config)
    assert isinstance(layer, Upsample) and not layer.with_conv
    assert isinstance(instantiate_from_config(VAE_LOSS), torch.nn.Identity)


@pytest.mark.parametrize("config, message", [
    ({"target": "ldm.no_such_module.Model"}, "'ldm.no_such_module.Model' cannot be imported"),
    ({"target": "ldm.util.NoSuchClass"}, "module 'ldm.util' has no attribute 'NoSuchClass'; fix the target"),
    ({"target": "ldm.util.os.system"}, "cannot import module 'ldm.util.os'"),
    ({"params": {}}, "no 'target' key"),
    ("os.system target", "no 'target' key"),
])
def test_instantiate_from_config_errors_name_the_problem(config, message):
    with pytest.raises((ValueError, KeyError), match=message):
        instantiate_from_config(config)


@pytest.mark.parametrize("target", [
    "os.system", "subprocess.call", "builtins.eval", "torch.load", "torch.nn.Linear", "no_such_package.Model",
    "ldm", "ldm..util", "cldmx.Model", "ldm.util.os system", 3, None,
])
def test_instantiate_from_config_refuses_targets_outside_the_project(target, tmp_path):
    marker = tmp_path / "ran"
    with pytest.raises(ConfigError, match="a target must be a class of this project"):
        instantiate_from_config({"target": target, "params": {"command": f"touch {marker}"}})
    assert not marker.exists()


@pytest.mark.parametrize("target", ["ldm.util.instantiate_from_config", "ldm.util.importlib", "ldm.util.torch"])
def test_instantiate_from_config_refuses_what_is_not_a_project_class(target):
    with pytest.raises(ConfigError, match=f"'{target}' is not a class of this project"):
        instantiate_from_config({"target": target, "params": {}})


def test_instantiate_from_config_names_an_unknown_param_and_the_closest_ones():
    config = {"target": "ldm.modules.diffusionmodules.model.Upsample", "params": {"in_chanels": 4, "with_conv": 0}}
    with pytest.raises(ConfigError, match=r"params.in_chanels is not a parameter of .*Upsample; did you mean "
                                          r"in_channels\?"):
        instantiate_from_config(config)
    with pytest.raises(ConfigError, match="params.bias is not a parameter of torch.nn.modules.linear.Identity; "
                                          "valid names: none"):
        instantiate_from_config({**VAE_LOSS, "params": {"bias": True}})


def test_modules_listed_in_the_trusted_variable_may_be_named(monkeypatch):
    target = "my_models.MyControlLDM"
    monkeypatch.delenv(TRUSTED_MODULES_VARIABLE, raising=False)
    with pytest.raises(ConfigError, match=f"for a model class of your own, list its module in "
                                          f"{TRUSTED_MODULES_VARIABLE}"):
        check_target_name(target, "model.target", "x.yaml")
    monkeypatch.setenv(TRUSTED_MODULES_VARIABLE, "other, my_models")
    check_target_name(target, "model.target", "x.yaml")
    with pytest.raises(ConfigError, match="which a config may not use"):
        check_target_name("os.system", "model.target", "x.yaml")


def test_accepted_params_follow_kwargs_to_the_parent_and_to_the_named_class():
    from cldm.cldm import ControlLDM, ControlledUnetModel, ControlNet
    from ldm.models.diffusion.ddpm import DDPM, LatentDiffusion

    assert {"control_key", "first_stage_config", "timesteps", "linear_start"} <= accepted_params(ControlLDM)
    assert accepted_params(LatentDiffusion) | {"control_stage_config", "control_key", "only_mid_control",
                                               "sd_locked", "optimizer_factory"} == accepted_params(ControlLDM)
    assert accepted_params(DDPM) < accepted_params(LatentDiffusion)
    unet_fields = {field.name for field in dataclasses.fields(UNetConfig)}
    assert accepted_params(ControlNet) == unet_fields | {"hint_channels"}
    assert accepted_params(ControlledUnetModel) == unet_fields | {"out_channels", "num_classes"}
    assert accepted_params(torch.nn.Identity) == set()


def test_check_config_checks_every_target_before_importing_any(tmp_path):
    marker = tmp_path / "ran"
    config = {"model": {"target": "ldm.no_such_module.Model", "params": {"inner": [
        {"target": "ldm.modules.diffusionmodules.model.Upsample"},
        {"deeper": {"target": "os.system", "params": {"command": f"touch {marker}"}}},
    ]}}}
    with pytest.raises(ConfigError, match=r"^config file 'x.yaml': model.params.inner\[1\].deeper.target names "
                                          r"'os.system', which a config may not use"):
        check_config(config, source="x.yaml")
    assert not marker.exists()


def test_check_config_names_the_key_path_of_a_nested_param():
    config = {"model": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
        "embed_dim": 4, "ddconfig": {"anything": 1}, "lossconfig": {**VAE_LOSS, "params": {"disc_start": 1}}}}}
    with pytest.raises(ConfigError, match="model.params.lossconfig.params.disc_start is not a parameter"):
        check_config(config, source="x.yaml")
    config["model"]["params"]["lossconfig"] = VAE_LOSS
    check_config(config, source="x.yaml")  # ddconfig is a plain mapping (no target): not a class's params
    with pytest.raises(ConfigError, match="model.params must be a mapping"):
        check_config({"model": {**VAE_LOSS, "params": [1, 2]}}, source="x.yaml")


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


def test_required_params_follow_the_constructors_that_take_the_kwargs() -> None:
    from ldm.models.diffusion.ddpm import LatentDiffusion
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    # UNetModel's own and those of the UNetConfig its kwargs_class builds.
    assert required_params(UNetModel) == {"out_channels", "in_channels", "model_channels", "num_res_blocks",
                                          "attention_resolutions"}
    # LatentDiffusion's own and DDPM's; conditioning_key has a default and LatentDiffusion passes it on.
    assert required_params(LatentDiffusion) == {"first_stage_config", "cond_stage_config", "unet_config"}


def test_instantiate_names_a_missing_required_param_before_calling_the_constructor() -> None:
    config = {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {"embed_dim": 4}}
    with pytest.raises(ConfigError, match=r"^ldm.models.autoencoder.AutoencoderKL needs ddconfig and lossconfig, "):
        instantiate_from_config(config)
    with pytest.raises(ConfigError, match=r"needs lossconfig,"):
        instantiate_from_config(config, ddconfig={})
