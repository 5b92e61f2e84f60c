"""tool_sample.py and cldm/sampling.py on the tiny config: same images as driving ControlLDM + DDIM by hand."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from einops import rearrange
from PIL import Image
from pytorch_lightning import seed_everything

import tool_sample
from cldm.checkpoints.kinds import CONTROL_PREFIX
from cldm.checkpoints.saving import save_state_dict
from cldm.cli import run
from cldm.ddim_hacked import DDIMSampler
from cldm.sampling import SampleSettings, hwc3, load_control_ldm, prepare_hint, read_image, resize_image, sample_images
from tests.helpers.random_weights import model_without_zero_layers
from tests.helpers.paths import TINY_CONFIG


TINY = str(TINY_CONFIG)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A tiny ControlLDM checkpoint with every zero-initialised weight made random, its split, and a hint."""
    folder = tmp_path_factory.mktemp("tiny")
    model = model_without_zero_layers(TINY)
    state_dict = model.state_dict()
    save_state_dict(state_dict, folder / "full.safetensors")
    control = {k: t for k, t in state_dict.items() if k.startswith(CONTROL_PREFIX)}
    save_state_dict(control, folder / "control.safetensors")
    save_state_dict({k: t for k, t in state_dict.items() if k not in control}, folder / "base.safetensors")
    hint = np.zeros((48, 100, 3), dtype=np.uint8)  # BGR on disk: a red ring on black
    cv2.circle(hint, (50, 24), 16, (0, 0, 255), 3)
    cv2.imwrite(str(folder / "hint.png"), hint)
    paths = {name: folder / f"{name}.safetensors" for name in ("full", "control", "base")}
    return {**paths, "hint": folder / "hint.png"}


@pytest.fixture(scope="module")
def model(files):
    return load_control_ldm(TINY, ckpt=files["full"])


def png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def sample_by_hand(model, hint_path: Path, prompt: str, seed: int, n: int, steps: int, strength: float) -> np.ndarray:
    """The gradio apps' steps (reference spec 1.6), written out with ControlLDM and the hacked DDIM sampler."""
    img = cv2.cvtColor(cv2.imread(str(hint_path)), cv2.COLOR_BGR2RGB)  # 48 x 100 RGB: HWC3 is the identity
    k = 64 / 48
    h, w = int(np.round(48 * k / 64.0)) * 64, int(np.round(100 * k / 64.0)) * 64
    img = cv2.resize(img, (w, h), interpolation=cv2.INTER_LANCZOS4)
    control = torch.from_numpy(img.copy()).float() / 255.0
    control = rearrange(torch.stack([control for _ in range(n)], dim=0), "b h w c -> b c h w").clone()
    seed_everything(seed)
    a_prompt = "best quality, extremely detailed"
    n_prompt = ("longbody, lowres, bad anatomy, bad hands, missing fingers, extra digit, fewer digits, cropped, "
                "worst quality, low quality")
    cond = {"c_concat": [control], "c_crossattn": [model.get_learned_conditioning([prompt + ", " + a_prompt] * n)]}
    un_cond = {"c_concat": [control], "c_crossattn": [model.get_learned_conditioning([n_prompt] * n)]}
    model.control_scales = [strength] * 5
    with torch.no_grad():
        samples, _ = DDIMSampler(model).sample(steps, n, (4, h // 8, w // 8), cond, verbose=False, eta=0.0,
                                               unconditional_guidance_scale=9.0, unconditional_conditioning=un_cond)
        x = model.decode_first_stage(samples)
    return (rearrange(x, "b c h w -> b h w c") * 127.5 + 127.5).cpu().numpy().clip(0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------


def test_cli_writes_grid_and_images_equal_to_driving_the_model_by_hand(tmp_path, files, model) -> None:
    out = tmp_path / "samples.png"
    argv = ["--config", TINY, "--ckpt", str(files["full"]), "--hint", str(files["hint"]), "--prompt", "a red ring",
            "--resolution", "64", "--num_samples", "2", "--ddim_steps", "8", "--strength", "0.7", "--seed", "42",
            "--out", str(out)]
    assert tool_sample.main(argv) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.png", "samples_0.png", "samples_1.png",
                                                          "samples_hint.png"]
    expected = sample_by_hand(model, files["hint"], "a red ring", seed=42, n=2, steps=8, strength=0.7)
    assert expected.shape == (2, 64, 128, 3)
    np.testing.assert_array_equal(png(tmp_path / "samples_0.png"), expected[0])
    np.testing.assert_array_equal(png(tmp_path / "samples_1.png"), expected[1])
    hint = png(tmp_path / "samples_hint.png")
    np.testing.assert_array_equal(png(out), np.concatenate([hint, expected[0], expected[1]], axis=1))


def test_base_plus_control_gives_the_same_images_as_the_full_checkpoint(tmp_path, files) -> None:
    common = ["--config", TINY, "--hint", str(files["hint"]), "--resolution", "64", "--ddim_steps", "3",
              "--seed", "7"]
    assert tool_sample.main([*common, "--ckpt", str(files["full"]), "--out", str(tmp_path / "full.png")]) == 0
    assert tool_sample.main([*common, "--base", str(files["base"]), "--control", str(files["control"]),
                             "--out", str(tmp_path / "split.png")]) == 0
    np.testing.assert_array_equal(png(tmp_path / "full_0.png"), png(tmp_path / "split_0.png"))


# ---------------------------------------------------------------------------------------------
# Seeds, strength, guess mode, precision
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hint(files) -> np.ndarray:
    return prepare_hint(read_image(files["hint"]), 64)


def _sample(model, hint, **changes) -> np.ndarray:
    return sample_images(model, hint, SampleSettings(prompt="a ring", ddim_steps=3, **changes), verbose=False)


def test_same_seed_same_images_other_seed_other_images(model, hint) -> None:
    first = _sample(model, hint, seed=1, num_samples=2)
    np.testing.assert_array_equal(first, _sample(model, hint, seed=1, num_samples=2))
    assert not np.array_equal(first, _sample(model, hint, seed=2, num_samples=2))


def test_strength_zero_ignores_the_hint_and_guess_mode_changes_the_result(model, hint) -> None:
    other_hint = 255 - hint
    assert not np.array_equal(_sample(model, hint, seed=3), _sample(model, other_hint, seed=3))
    np.testing.assert_array_equal(_sample(model, hint, seed=3, strength=0.0),
                                  _sample(model, other_hint, seed=3, strength=0.0))
    assert not np.array_equal(_sample(model, hint, seed=3), _sample(model, hint, seed=3, guess_mode=True))
    assert model.control_scales[-1] == 1.0 and model.control_scales[0] == pytest.approx(0.825**4)


def test_bf16_autocast_runs_on_cpu(model, hint) -> None:
    images = _sample(model, hint, seed=4, precision="bf16")
    assert images.shape == (1, 64, 128, 3) and images.dtype == np.uint8


# ---------------------------------------------------------------------------------------------
# Hint preprocessing (the apps' HWC3 and resize_image)
# ---------------------------------------------------------------------------------------------


def test_hwc3() -> None:
    gray = np.full((2, 3), 7, dtype=np.uint8)
    assert hwc3(gray).shape == (2, 3, 3) and (hwc3(gray) == 7).all()
    rgba = np.zeros((1, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (0, 0, 0, 255)  # opaque black stays black, transparent black becomes white
    np.testing.assert_array_equal(hwc3(rgba)[0], [[0, 0, 0], [255, 255, 255]])
    with pytest.raises(TypeError):
        hwc3(np.zeros((2, 2, 3), dtype=np.float32))


def test_resize_image_rounds_to_multiples_of_64() -> None:
    assert resize_image(np.zeros((480, 640, 3), np.uint8), 512).shape == (512, 704, 3)  # 682.7 -> 704
    assert resize_image(np.zeros((48, 100, 3), np.uint8), 64).shape == (64, 128, 3)  # 133.3 -> 128
    assert resize_image(np.zeros((1000, 1000, 3), np.uint8), 256).shape == (256, 256, 3)


# ---------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------


def _fails(argv: list[str], capsys) -> str:
    assert run(tool_sample.main, argv) == 2
    return capsys.readouterr().err


def test_bad_inputs_give_a_clear_message_and_write_nothing(tmp_path, files, capsys) -> None:
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")
    wider = yaml.safe_load(Path(TINY).read_text())
    for part in ("control_stage_config", "unet_config"):
        wider["model"]["params"][part]["params"]["model_channels"] = 64
    wider_config = tmp_path / "wider.yaml"
    wider_config.write_text(yaml.safe_dump(wider))
    taken = tmp_path / "taken.png"
    (tmp_path / "taken_0.png").write_bytes(b"keep")
    before = sorted(tmp_path.iterdir())
    ckpt = ["--ckpt", str(files["full"])]
    base = ["--config", TINY, "--hint", str(files["hint"]), "--out", str(tmp_path / "new.png"), "--resolution", "64",
            "--ddim_steps", "2"]

    assert "already exists" in _fails([*base, *ckpt, "--out", str(taken)], capsys)
    assert "does not exist" in _fails([*base, "--ckpt", str(tmp_path / "missing.ckpt")], capsys)
    assert "hint image" in _fails([*base, *ckpt, "--hint", str(not_an_image)], capsys)
    assert "does not exist" in _fails([*base, *ckpt, "--hint", str(tmp_path / "missing.png")], capsys)
    assert "does not fit config" in _fails([*base, *ckpt, "--config", str(wider_config)], capsys)
    assert "--base and --control go together" in _fails([*base, "--base", str(files["base"])], capsys)
    assert "give either --ckpt" in _fails(base, capsys)
    assert "looks like" in _fails([*base, "--base", str(files["base"]), "--control", str(files["full"])], capsys)
    assert "not supported on cpu" in _fails([*base, *ckpt, "--precision", "16", "--device", "cpu"], capsys)
    assert "argument --ddim_steps: must be a whole number between 1 and 1000, got 0" in _fails(
        [*base, *ckpt, "--ddim_steps", "0"], capsys)
    assert "must be a .png file" in _fails([*base, *ckpt, "--out", str(tmp_path / "x.jpg")], capsys)
    assert sorted(tmp_path.iterdir()) == before
    assert (tmp_path / "taken_0.png").read_bytes() == b"keep"


def test_read_image_bounds_the_aspect_ratio_and_the_pixels(tmp_path) -> None:
    for name, (height, width) in {"tall.png": (256, 64), "wide.png": (64, 256)}.items():
        assert cv2.imwrite(str(tmp_path / name), np.zeros((height, width), np.uint8))
        assert read_image(tmp_path / name).shape == (height, width)  # 4:1 is accepted
    assert cv2.imwrite(str(tmp_path / "thin.png"), np.zeros((257, 64), np.uint8))
    with pytest.raises(ValueError, match="is 64x257 px, one side more than 4 times the other"):
        read_image(tmp_path / "thin.png")
    with pytest.raises(ValueError, match="is 64x256 px, more than the 16383 pixels allowed"):
        read_image(tmp_path / "tall.png", max_pixels=16383)
