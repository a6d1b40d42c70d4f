"""The code stays lint-clean, formatted and type-checked; the public API stays listed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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


def test_mypy_is_green_on_the_package() -> None:
    result = run("mypy")
    assert result.returncode == 0, result.stdout + result.stderr


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
