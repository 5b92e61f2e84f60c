"""Shared test set-up: the repository root on sys.path, one thread per process, and the shared paths
(`tests.helpers.paths`) as fixtures."""
from __future__ import annotations

import os
import sys
from pathlib import Path

# One intra-op thread per test process: the suite starts training subprocesses (DDP ranks, kill/resume
# runs) beside the pytest process, and OpenMP threads oversubscribing 2 cores slow steps down 10-20x.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.helpers.paths import FIXTURES, HELPERS, TINY_CONFIG  # noqa: E402

# The test-only modules (tiny_training, the faulty and seeded ControlLDMs that test configs name as targets,
# trusted as a user trusts their own model classes; training subprocesses inherit the variable).
if str(HELPERS) not in sys.path:
    sys.path.insert(0, str(HELPERS))
os.environ.setdefault("CONTROLNET_TRUSTED_MODULES", "faulty_controlldm,seeded_controlldm")


@pytest.fixture
def repo_root() -> Path:
    """The repository root (scripts, models/, training/)."""
    return REPO_ROOT


@pytest.fixture
def fixtures_dir() -> Path:
    """tests/fixtures: key manifests and the tiny parity case."""
    return FIXTURES


@pytest.fixture
def tiny_config() -> Path:
    """models/cldm_tiny.yaml: the ControlLDM every CPU test trains and samples."""
    return TINY_CONFIG
