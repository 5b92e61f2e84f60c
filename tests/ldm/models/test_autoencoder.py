"""AutoencoderKL: the SD VAE's state-dict layout, a tiny round trip, checkpoint loading, parity with the original."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from ldm.models.autoencoder import AutoencoderKL, IdentityFirstStage
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import count_params, instantiate_from_config

IDENTITY_LOSS = {"target": "torch.nn.Identity"}
SD_DDCONFIG = dict(
    double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
    num_res_blocks=2, attn_resolutions=[], dropout=0.0,
)
TINY_DDCONFIG = dict(SD_DDCONFIG, resolution=64, ch=32, ch_mult=[1, 2, 2, 2], num_res_blocks=1)
SCALE_FACTOR = 0.18215  # cldm_tiny.yaml / cldm_v15.yaml
PARITY_TOLERANCE = 1e-5  # relative to max |reference|, the bar of tests/fixtures/tiny_parity


def _tiny_vae(**overrides) -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(ddconfig=dict(TINY_DDCONFIG, **overrides), lossconfig=IDENTITY_LOSS, embed_dim=4)


def test_sd_vae_matches_original_state_dict(fixtures_dir: Path) -> None:
    with open(fixtures_dir / "keys_cldm_v15.json") as f:
        reference = {
            key.removeprefix("first_stage_model."): (shape, dtype)
            for key, (shape, dtype) in json.load(f).items()
            if key.startswith("first_stage_model.")
        }
    with torch.device("meta"):
        vae = AutoencoderKL(ddconfig=SD_DDCONFIG, lossconfig=IDENTITY_LOSS, embed_dim=4, monitor="val/rec_loss")
    got = {key: (list(t.shape), str(t.dtype).removeprefix("torch.")) for key, t in vae.state_dict().items()}
    assert list(got) == list(reference)  # same keys in the same order
    assert got == reference
    assert count_params(vae) == 83_653_863
    assert isinstance(vae.loss, nn.Identity)


def test_tiny_vae_round_trip_shapes() -> None:
    vae = _tiny_vae(attn_resolutions=[16])
    image = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        posterior = vae.encode(image)
        assert isinstance(posterior, DiagonalGaussianDistribution)
        assert posterior.mean.shape == posterior.logvar.shape == (2, 4, 8, 8)
        assert vae.decode(posterior.mode()).shape == (2, 3, 64, 64)
        reconstruction, forward_posterior = vae(image, sample_posterior=False)
        torch.testing.assert_close(reconstruction, vae.decode(posterior.mean))
        torch.testing.assert_close(forward_posterior.mean, posterior.mean)
        torch.manual_seed(3)
        sampled, _ = vae(image)
        torch.manual_seed(3)
        torch.testing.assert_close(sampled, vae.decode(posterior.sample()))


def test_sdpa_and_math_attention_agree_in_tiny_vae() -> None:
    vae_sdpa = _tiny_vae(attn_resolutions=[16])
    vae_math = _tiny_vae(attn_resolutions=[16], attn_backend="math")
    vae_math.load_state_dict(vae_sdpa.state_dict())
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        reconstruction_sdpa, posterior_sdpa = vae_sdpa(image, sample_posterior=False)
        reconstruction_math, posterior_math = vae_math(image, sample_posterior=False)
    torch.testing.assert_close(posterior_sdpa.mean, posterior_math.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reconstruction_sdpa, reconstruction_math, rtol=1e-5, atol=1e-5)


def test_built_from_yaml_config() -> None:
    config = OmegaConf.create({
        "target": "ldm.models.autoencoder.AutoencoderKL",
        "params": {"embed_dim": 4, "monitor": "val/rec_loss", "ddconfig": TINY_DDCONFIG, "lossconfig": IDENTITY_LOSS},
    })
    vae = instantiate_from_config(config)
    assert isinstance(vae, AutoencoderKL) and vae.monitor == "val/rec_loss"
    assert set(vae.state_dict()) == set(_tiny_vae().state_dict())


def test_ckpt_path_loads_weights_and_drops_ignored_keys(tmp_path: Path) -> None:
    source = _tiny_vae()
    with torch.no_grad():
        for param in source.parameters():
            param.add_(1.0)
    path = tmp_path / "vae.ckpt"
    torch.save({"state_dict": source.state_dict()}, path)

    fresh = _tiny_vae()
    torch.manual_seed(0)  # the same initial weights as `fresh`
    loaded = AutoencoderKL(TINY_DDCONFIG, IDENTITY_LOSS, embed_dim=4, ckpt_path=str(path), ignore_keys=["decoder."])
    for key, value in loaded.state_dict().items():
        expected = fresh.state_dict()[key] if key.startswith("decoder.") else source.state_dict()[key]
        torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=key)


def test_user_errors() -> None:
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        AutoencoderKL(TINY_DDCONFIG, IDENTITY_LOSS, embed_dim=4, ckpt_path="missing.ckpt")
    with pytest.raises(ValueError, match="double_z"):
        AutoencoderKL(dict(TINY_DDCONFIG, double_z=False), IDENTITY_LOSS, embed_dim=4)
    with pytest.raises(ValueError, match="ema_decay"):
        AutoencoderKL(TINY_DDCONFIG, IDENTITY_LOSS, embed_dim=4, ema_decay=0.999)


def test_identity_first_stage() -> None:
    x = torch.randn(1, 3, 4, 4)
    stage = IdentityFirstStage()
    assert stage.encode(x) is x and stage.decode(x) is x and stage(x) is x and stage.quantize(x) is x
    assert IdentityFirstStage(vq_interface=True).quantize(x) == (x, None, [None, None, None])


# ---------------------------------------------------------------------------------------------
# Parity with the original implementation (tests/fixtures/tiny_parity, produced by lllyasviel/ControlNet)
# ---------------------------------------------------------------------------------------------


def _load_fixture_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _relative_error(got: torch.Tensor, reference: torch.Tensor) -> float:
    return float((got.double() - reference.double()).abs().max() / reference.double().abs().max())


def test_tiny_vae_matches_original(fixtures_dir: Path) -> None:
    parity_dir = fixtures_dir / "tiny_parity"
    detweights = _load_fixture_module(parity_dir / "detweights.py")
    first_stage = OmegaConf.load(parity_dir / "cldm_tiny.yaml").model.params.first_stage_config
    holder = nn.Module()  # gives the VAE its ControlLDM key prefix, which seeds the deterministic weights
    holder.first_stage_model = instantiate_from_config(first_stage).eval()
    assert detweights.fill_(holder) == len(holder.state_dict())
    vae = holder.first_stage_model

    case = torch.load(parity_dir / "tiny_parity.pt", weights_only=True)
    inputs, reference = case["inputs"], case["outputs"]
    with torch.no_grad():
        posterior = vae.encode(inputs["image"])
        decoded = vae.decode(inputs["z_decode"] / SCALE_FACTOR)  # LatentDiffusion.decode_first_stage
        torch.manual_seed(7)
        encoding = SCALE_FACTOR * posterior.sample()  # LatentDiffusion.get_first_stage_encoding
    assert _relative_error(posterior.mean, reference["posterior_mean"]) < PARITY_TOLERANCE
    assert _relative_error(posterior.logvar, reference["posterior_logvar"]) < PARITY_TOLERANCE
    assert _relative_error(decoded, reference["decode"]) < PARITY_TOLERANCE
    assert _relative_error(encoding, reference["encoding_seeded"]) < PARITY_TOLERANCE


# -- training ------------------------------------------------------------------------------


def test_training_step_lowers_the_reconstruction_loss_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    vae = AutoencoderKL(ddconfig=dict(TINY_DDCONFIG, resolution=16, ch_mult=[1, 2]), embed_dim=4, image_key="jpg",
                        lossconfig={"target": "ldm.modules.losses.ReconstructionKLLoss"}, learning_rate=1e-3)
    batch = {"jpg": torch.rand(2, 16, 16, 3) * 2 - 1}  # NHWC in [-1, 1], as the data set yields
    optimizer = vae.configure_optimizers()
    losses = []
    for _ in range(30):
        loss = vae.training_step(batch, 0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_configure_optimizers_is_the_originals_adam() -> None:
    vae = _tiny_vae()
    optimizer = vae.configure_optimizers()
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.defaults["betas"] == (0.5, 0.9)
    assert optimizer.defaults["lr"] == vae.learning_rate
    optimized = {id(param) for group in optimizer.param_groups for param in group["params"]}
    assert optimized == {id(param) for param in vae.parameters()}


def test_identity_loss_cannot_train() -> None:
    with pytest.raises(ValueError, match="lossconfig is torch.nn.Identity, which cannot train it"):
        _tiny_vae().training_step({"image": torch.zeros(1, 64, 64, 3)}, 0)
