"""ImageLogger: rank 0 only, eval mode without gradients, random streams and training modes restored, failures
reported without ending training, grids written atomically."""
from __future__ import annotations

import logging
import os
import random
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cldm.logger import ImageLogger
from cldm.processes import ProcessIdentity


class Sampler(torch.nn.Module):
    """A module with `log_images`, as ControlLDM has; records how it was called and draws random numbers."""

    def __init__(self, fail: bool = False):
        super().__init__()
        self.frozen = torch.nn.Linear(2, 2)
        self.trained = torch.nn.Linear(2, 2)
        self.fail = fail
        self.seen: list[tuple[bool, bool, bool]] = []
        self.global_step, self.current_epoch = 5, 1

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def log_images(self, batch, split: str = "train", ddim_steps: int = 50):
        self.seen.append((self.training, self.frozen.training, torch.is_grad_enabled()))
        torch.randn(10), np.random.rand(10), random.random()
        self.train()
        if self.fail:
            raise RuntimeError("out of memory while sampling")
        return {"samples": torch.rand(6, 3, 8, 8) * 2 - 1, "txt": ["not", "an", "image"]}


def _trainer(tmp_path: Path, rank: int = 0) -> SimpleNamespace:
    return SimpleNamespace(global_rank=rank, precision_plugin=SimpleNamespace(forward_context=nullcontext),
                           logger=SimpleNamespace(save_dir=str(tmp_path)), default_root_dir=str(tmp_path))


def _random_states() -> tuple:
    return random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state()


def _train_mode_with_a_frozen_part(module: Sampler) -> None:
    module.train()
    module.frozen.eval()


@pytest.mark.parametrize("fail", [False, True], ids=["success", "failure"])
def test_logging_restores_modes_and_random_states(tmp_path: Path, caplog, fail: bool) -> None:
    module = Sampler(fail=fail)
    _train_mode_with_a_frozen_part(module)
    logger = ImageLogger(batch_frequency=1, max_images=4, log_images_kwargs={"ddim_steps": 2})
    before = _random_states()
    with caplog.at_level(logging.WARNING, logger="cldm.logger"):
        logger.on_train_batch_end(_trainer(tmp_path), module, None, {"txt": []}, batch_idx=0)
    assert module.seen == [(False, False, False)]  # eval mode, no gradients
    assert module.training and not module.frozen.training and module.trained.training
    after = _random_states()
    assert before[0] == after[0] and before[1] == after[1] and torch.equal(before[2], after[2])
    images = tmp_path / "image_log" / "train"
    if fail:
        assert not images.exists()
        assert "image logging failed at step 5 and was skipped" in caplog.text
        assert "out of memory while sampling" in caplog.text
    else:
        assert os.listdir(images) == ["samples_gs-000005_e-000001_b-000000.png"]  # 4 images, no temporary file


def test_only_rank_zero_samples(tmp_path: Path) -> None:
    module = Sampler()
    ImageLogger(batch_frequency=1).on_train_batch_end(_trainer(tmp_path, rank=1), module, None, {}, batch_idx=0)
    assert module.seen == [] and not (tmp_path / "image_log").exists()


def test_frequency_and_disabling(tmp_path: Path) -> None:
    module = Sampler()
    for batch_idx in range(7):
        ImageLogger(batch_frequency=3).on_train_batch_end(_trainer(tmp_path), module, None, {}, batch_idx)
    ImageLogger(batch_frequency=1, max_images=0).on_train_batch_end(_trainer(tmp_path), module, None, {}, 0)
    ImageLogger(batch_frequency=1, disabled=True).on_train_batch_end(_trainer(tmp_path), module, None, {}, 0)
    assert len(module.seen) == 3  # batches 0, 3 and 6


def test_training_start_removes_partial_grids_of_a_killed_run(tmp_path: Path) -> None:
    images = tmp_path / "image_log" / "train"
    images.mkdir(parents=True)
    dead = ProcessIdentity(2**22 + 1, 0, ProcessIdentity.current().host)  # above Linux's largest pid
    (images / f".samples_gs-000004_e-000000_b-000003.png.{dead.tag}.0a1b2c3d.tmp").write_bytes(b"half a png")
    (images / "samples_gs-000001_e-000000_b-000000.png").write_bytes(b"a png")
    ImageLogger().on_train_start(_trainer(tmp_path), Sampler())
    assert os.listdir(images) == ["samples_gs-000001_e-000000_b-000000.png"]
