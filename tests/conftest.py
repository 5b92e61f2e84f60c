"""Shared test set-up: the repository root on sys.path, fixture paths, small helpers."""
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
FIXTURES = Path(__file__).resolve().parent / "fixtures"

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES
