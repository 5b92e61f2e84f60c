"""Imports point down: ldm <- cldm <- scripts. Read from the source (ast), so nothing is imported to check it."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.helpers.paths import REPO_ROOT

# Top-level modules that are command lines or compatibility names, never libraries.
SCRIPT_PREFIXES = ("tutorial_", "tool_")
SCRIPT_NAMES = ("share", "config")
PACKAGES = ("ldm", "cldm", "benchmarks")


def imported_modules(path: Path) -> set[str]:
    """Every module an `import` or `from ... import` in `path` names (relative imports resolved to their package)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts[:-1])
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            modules.add(base)
            modules.update(f"{base}.{alias.name}" for alias in node.names)  # `from cldm import training`
    return modules


def is_script(module: str) -> bool:
    top = module.split(".")[0]
    return top.startswith(SCRIPT_PREFIXES) or top in SCRIPT_NAMES


def package_modules(package: str) -> list[Path]:
    return sorted((REPO_ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", package_modules("ldm"), ids=lambda path: str(path.relative_to(REPO_ROOT)))
def test_ldm_never_imports_cldm(path):
    upward = sorted(module for module in imported_modules(path) if module.split(".")[0] == "cldm")
    assert not upward, f"{path.relative_to(REPO_ROOT)} imports {upward}; the ldm core must not depend on cldm"


@pytest.mark.parametrize("path", [path for package in PACKAGES for path in package_modules(package)],
                         ids=lambda path: str(path.relative_to(REPO_ROOT)))
def test_packages_never_import_scripts(path):
    scripts = sorted(module for module in imported_modules(path) if is_script(module))
    assert not scripts, f"{path.relative_to(REPO_ROOT)} imports the top-level scripts {scripts}"


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The reader finds absolute, relative and `from package import module` imports (so the tests above can fail)."""
    module = REPO_ROOT / "ldm" / "modules" / "example.py"
    monkeypatch.setattr(Path, "read_text", lambda self, *args, **kwargs: (
        "import tool_sample\nfrom cldm import training\nfrom ..util import instantiate_from_config\n"))
    modules = imported_modules(module)
    assert {"tool_sample", "cldm", "cldm.training", "ldm.util", "ldm.util.instantiate_from_config"} <= modules
    assert is_script("tool_sample") and is_script("config") and not is_script("cldm.model")
