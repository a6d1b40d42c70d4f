"""The code stays lint-clean, formatted and type-checked; the public API stays listed."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

import flask_errands

ROOT = Path(__file__).resolve().parent.parent


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True, check=False
    )


def test_ruff_lint_is_clean() -> None:
    result = run("ruff", "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_clean() -> None:
    result = run("ruff", "format", "--check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_is_green_on_the_package_and_the_tests() -> None:
    result = run("mypy", "src/flask_errands", "tests")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_checks_run_the_ruff_and_mypy_that_the_dev_extra_pins() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pins = dict(spec.split("==") for spec in dev["dev"] if "==" in spec)
    assert set(pins) == {"ruff", "mypy"}
    for tool, pinned in pins.items():
        installed = importlib.metadata.version(tool)
        assert installed == pinned, f"{tool} {installed} installed: pip install -e '.[dev]'"


def test_every_public_name_is_exported_and_sorted() -> None:
    public = {
        name
        for name, value in vars(flask_errands).items()
        if not name.startswith("_")
        and getattr(value, "__module__", "").startswith("flask_errands")
    }
    assert set(flask_errands.__all__) >= public - {"annotations"}
    assert flask_errands.__all__ == sorted(flask_errands.__all__)
    for name in flask_errands.__all__:
        assert hasattr(flask_errands, name), name
