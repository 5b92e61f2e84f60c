"""Paths every test file shares: the repository root, the model configs and the fixture folders."""
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
MODELS = REPO_ROOT / "models"
TINY_CONFIG = MODELS / "cldm_tiny.yaml"
V15_CONFIG = MODELS / "cldm_v15.yaml"
V21_CONFIG = MODELS / "cldm_v21.yaml"
FIXTURES = REPO_ROOT / "tests" / "fixtures"
PARITY_DIR = FIXTURES / "tiny_parity"
HELPERS = REPO_ROOT / "tests" / "helpers"
