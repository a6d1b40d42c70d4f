"""Named SQL queries kept in ``.sql`` files beside the backends that run them."""

from __future__ import annotations

import re
from importlib import resources

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def load_queries(filename: str) -> dict[str, str]:
    """Return ``{name: sql}`` for each ``-- name: x`` block of a file in this package."""
    text = resources.files(__package__).joinpath(filename).read_text(encoding="utf-8")
    parts = _NAME.split(text)
    return {name: sql.strip() for name, sql in zip(parts[1::2], parts[2::2], strict=True)}
