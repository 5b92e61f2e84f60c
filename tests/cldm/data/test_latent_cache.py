"""The latent and text-embedding cache on the tiny config: the same loss and gradients as encoding every step, the same
batches with any number of DataLoader workers, and its files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, default_collate

import tool_cache_latents
from cldm.data.data_order import ResumableRandomSampler
from cldm.data.latent_cache import (
    EMBEDDINGS_NAME,
    MOMENTS_NAME,
    VAE_ENCODER_PREFIXES,
    LatentCache,
    read_manifest,
    weights_fingerprint,
)
from cldm.data.dataset import MyDataset
from cldm.model import create_model, load_state_dict, load_weights
from cldm.training.job import collate_same_size
from tiny_training import TINY_CONFIG, config_with_model, make_data, make_initial_weights

# bfloat16 keeps 8 significant bits: each stored moment and embedding is off by at most 2^-9 of its value, and the loss
# and the gradients, smooth functions of them, by about as much relative to their size (measured: 8e-6 and 1e-3).
# Gradients are compared over all parameters at once: a few (biases just before a GroupNorm) are zero up to float
# rounding (1e-9), so their own relative difference is rounding noise either way.
BF16_RELATIVE_TOLERANCE = 2.0**-8


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """Tiny initial weights, 8 items of 64 px, and their caches in float32 and bfloat16."""
    tmp = tmp_path_factory.mktemp("cache")
    initial = make_initial_weights(tmp / "control_tiny_ini.ckpt")
    data = make_data(tmp / "fill8", 8)
    caches = {}
    for dtype in ("float32", "bfloat16"):
        caches[dtype] = tmp / f"cache_{dtype}"
        argv = ["--config", str(TINY_CONFIG), "--resume_path", str(initial), "--data_root", str(data),
                "--dtype", dtype, "--batch_size", "4", "--device", "cpu", "--out", str(caches[dtype])]
        assert tool_cache_latents.main(argv) == 0
    return dict(initial=initial, data=data, caches=caches)


def _model(initial: Path) -> torch.nn.Module:
    """The tiny ControlLDM with the initial weights, its zero convolutions made non-zero (so every gradient is)."""
    model = create_model(TINY_CONFIG)
    load_weights(model, load_state_dict(initial), source=initial)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.control_model.parameters():
            if not param.any():
                param.copy_(0.05 * torch.randn(param.shape, generator=generator))
    return model.train()


def _loss_and_gradients(model: torch.nn.Module, batch: dict, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the posterior sample, the timesteps and the noise
    loss, _ = model.shared_step(batch)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def _batch(data: Path, cache: LatentCache | None, indices: range) -> dict:
    data_set = MyDataset(root=str(data), latent_cache=cache)
    return default_collate([data_set[index] for index in indices])


def _differences(setup: dict, dtype: str) -> tuple[float, float]:
    """(|loss difference| / |loss|, max |gradient difference| / max |gradient| over all parameters) of the cache
    against encoding the batch, for one batch with the same seed."""
    model = _model(setup["initial"])
    cache = LatentCache.open(setup["caches"][dtype])
    # Items 0-3: the tool encoded them as one batch of 4 too, so the float32 moments are the very same numbers.
    loss, gradients = _loss_and_gradients(model, _batch(setup["data"], None, range(4)), seed=5)
    cached_loss, cached_gradients = _loss_and_gradients(model, _batch(setup["data"], cache, range(4)), seed=5)
    assert cached_gradients.keys() == gradients.keys() and len(gradients) > 10
    difference = max(float((cached_gradients[name] - g).abs().max()) for name, g in gradients.items())
    largest = max(float(g.abs().max()) for g in gradients.values())
    return float((cached_loss - loss).abs() / loss.abs()), difference / largest


def test_float32_cache_gives_the_loss_and_gradients_of_encoding_every_step(setup) -> None:
    loss_difference, gradient_difference = _differences(setup, "float32")
    print(f"\nfloat32 cache vs no cache: loss {loss_difference:.3g}, gradients {gradient_difference:.3g} (relative)")
    assert loss_difference == 0.0 and gradient_difference == 0.0  # bitwise


def test_bfloat16_cache_is_within_bfloat16_rounding(setup) -> None:
    loss_difference, gradient_difference = _differences(setup, "bfloat16")
    print(f"\nbfloat16 cache vs no cache: loss {loss_difference:.3g}, gradients {gradient_difference:.3g} (relative)")
    assert 0.0 < loss_difference <= BF16_RELATIVE_TOLERANCE
    assert gradient_difference <= BF16_RELATIVE_TOLERANCE


def test_the_cached_moments_are_the_encoder_posterior_and_dropped_prompts_the_empty_embedding(setup) -> None:
    model = _model(setup["initial"]).eval()
    cache = LatentCache.open(setup["caches"]["float32"])
    batch = _batch(setup["data"], None, range(4))
    x = batch["jpg"].permute(0, 3, 1, 2).contiguous()
    torch.testing.assert_close(torch.from_numpy(np.array(cache.arrays()[MOMENTS_NAME][:4])),
                               model.encode_first_stage(x).parameters, rtol=0, atol=0)
    prompts = batch["txt"]
    cached = torch.stack([cache.item(index, prompt)["txt_embedding"] for index, prompt in enumerate(prompts)])
    torch.testing.assert_close(cached, model.get_learned_conditioning(list(prompts)), rtol=0, atol=1e-5)
    torch.testing.assert_close(cache.item(0, "")["txt_embedding"], model.get_learned_conditioning([""])[0],
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(cache.null_text_embedding(), model.get_learned_conditioning([""])[0], rtol=0, atol=1e-5)


def test_manifest_and_bfloat16_storage(setup) -> None:
    manifest = read_manifest(setup["caches"]["bfloat16"])
    assert manifest["dtype"] == "bfloat16" and manifest["resolution"] is None
    assert manifest["moments_shape"] == [8, 8, 8, 8]  # 64 px, 4 latent channels: mean and log-variance
    assert manifest["prompts"][0] == "" and len(manifest["item_prompt_rows"]) == 8
    records = MyDataset(root=str(setup["data"])).data
    assert [manifest["prompts"][row] for row in manifest["item_prompt_rows"]] == [r["prompt"] for r in records]
    stored = np.load(setup["caches"]["bfloat16"] / MOMENTS_NAME, mmap_mode="r")
    assert stored.dtype == np.uint16  # bfloat16 bit patterns
    as_float32 = torch.from_numpy(np.load(setup["caches"]["float32"] / MOMENTS_NAME))
    bf16 = LatentCache.open(setup["caches"]["bfloat16"]).item(3, "x")["latent_moments"]
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16, as_float32[3].bfloat16())
    assert np.load(setup["caches"]["bfloat16"] / EMBEDDINGS_NAME, mmap_mode="r").shape == (9, 77, 32)
    assert manifest["resize"] == "crop" and manifest["crop"] == "center"


def test_a_manifest_without_a_resize_mode_was_stretched(setup) -> None:
    folder = setup["caches"]["bfloat16"]
    manifest = {key: value for key, value in read_manifest(folder).items() if key not in ("resize", "crop")}
    cache = LatentCache(folder, {**manifest, "resolution": 64})
    records = MyDataset(root=str(setup["data"])).data
    cache.check_data_set(setup["data"], records, 64, "stretch")
    with pytest.raises(ValueError, match="it was made with --resize stretch and this run has --resize crop"):
        cache.check_data_set(setup["data"], records, 64, "crop")
    LatentCache(folder, manifest).check_data_set(setup["data"], records, None, "crop")  # no resizing, no mode


def test_workers_draw_the_same_batches_as_the_main_process(setup) -> None:
    def batches(num_workers: int) -> list[dict]:
        data_set = MyDataset(root=str(setup["data"]), prompt_dropout=0.5, seed=3,
                             latent_cache=LatentCache.open(setup["caches"]["bfloat16"]))
        loader = DataLoader(data_set, batch_size=2, sampler=ResumableRandomSampler(len(data_set), seed=3),
                            num_workers=num_workers, collate_fn=collate_same_size)
        return list(loader)

    main, workers = batches(0), batches(2)
    assert len(main) == len(workers) == 4
    assert any("" in batch["txt"] for batch in main)  # some prompts dropped, with the empty prompt's embedding
    for a, b in zip(main, workers):
        assert a["txt"] == b["txt"] and a.keys() == b.keys() == {"txt", "hint", "latent_moments", "txt_embedding"}
        assert all(torch.equal(a[key], b[key]) for key in ("hint", "latent_moments", "txt_embedding"))


def test_weights_fingerprint_tells_other_weights_but_not_their_bfloat16_copy(setup) -> None:
    weights = load_state_dict(setup["initial"])
    fingerprint = weights_fingerprint(weights, VAE_ENCODER_PREFIXES)
    as_bfloat16 = {key: value.bfloat16() if value.is_floating_point() else value for key, value in weights.items()}
    assert weights_fingerprint(as_bfloat16, VAE_ENCODER_PREFIXES) == fingerprint  # --frozen_dtype bfloat16 checkpoints
    key = "first_stage_model.encoder.conv_in.weight"
    changed = {**weights, key: weights[key] * 1.01}
    assert weights_fingerprint(changed, VAE_ENCODER_PREFIXES) != fingerprint
    unrelated = {**weights, "first_stage_model.decoder.conv_in.weight": torch.zeros(1)}
    assert weights_fingerprint(unrelated, VAE_ENCODER_PREFIXES) == fingerprint


def test_scale_by_std_measures_the_same_latents_from_the_cache(setup, tmp_path) -> None:
    config = config_with_model(tmp_path, "cldm.cldm.ControlLDM", scale_by_std=True)
    scales = []
    for cache in (None, LatentCache.open(setup["caches"]["float32"])):
        model = create_model(config)
        missing = model.load_state_dict(load_state_dict(setup["initial"]), strict=False).missing_keys
        assert missing == ["scale_factor"]
        torch.manual_seed(5)
        model.on_train_batch_start(_batch(setup["data"], cache, range(4)), 0)
        scales.append(model.scale_factor)
    assert float(scales[0]) != 0.18215 and torch.equal(scales[0], scales[1])


def test_the_writer_reads_only_the_target_images(setup, tmp_path, monkeypatch) -> None:
    read = []
    original = MyDataset._read_rgb
    monkeypatch.setattr(MyDataset, "_read_rgb", lambda self, path, *rest: read.append(path) or original(self, path, *rest))
    argv = ["--config", str(TINY_CONFIG), "--resume_path", str(setup["initial"]), "--data_root", str(setup["data"]),
            "--dtype", "float32", "--batch_size", "4", "--device", "cpu", "--out", str(tmp_path / "cache")]
    assert tool_cache_latents.main(argv) == 0
    targets = [record["target"] for record in MyDataset(str(setup["data"])).data]
    assert sorted(read) == sorted(targets)
    stored = np.load(tmp_path / "cache" / MOMENTS_NAME)
    np.testing.assert_array_equal(stored, np.load(setup["caches"]["float32"] / MOMENTS_NAME))
