"""Backends, chosen by one URL; optional drivers are imported only when chosen."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from ..exceptions import ConfigurationError
from .base import Backend, JobRecord
from .urls import hide_password

__all__ = ["Backend", "JobRecord", "backend_from_url", "hide_password"]


def backend_from_url(
    url: str, *, instance_path: str, options: Mapping[str, Any] | None = None
) -> Backend:
    """Build the backend ``url`` names; relative SQLite paths are inside ``instance_path``.

    ``options`` carries settings from the app's config that some backends use
    (``prefix`` and ``result_ttl`` for Redis); the others ignore them.
    """
    options = options or {}
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        from .memory import MemoryBackend

        return MemoryBackend(url)
    if scheme == "sqlite":
        from .sqlite import SQLiteBackend

        path = url[len("sqlite://") :]
        if path in ("", "/", "/:memory:"):
            raise ConfigurationError(
                "ERRANDS_URL sqlite:// needs a file path (sqlite:///errands.db); "
                "for an in-process queue use memory://"
            )
        path = path[1:] if path.startswith("/") else path
        return SQLiteBackend(path if os.path.isabs(path) else os.path.join(instance_path, path))
    if scheme in ("redis", "rediss", "unix"):
        try:
            from .redis import RedisBackend  # type: ignore[import-not-found,unused-ignore]
        except ImportError as exc:
            raise _missing("redis", exc) from exc
        backend: Backend = RedisBackend(
            url, prefix=options.get("prefix"), result_ttl=options.get("result_ttl")
        )
        return backend
    if scheme in ("postgresql", "postgres"):
        try:
            from .postgres import PostgresBackend  # type: ignore[import-not-found,unused-ignore]
        except ImportError as exc:
            raise _missing("postgres", exc) from exc
        backend = PostgresBackend(url)
        return backend
    raise ConfigurationError(
        f"ERRANDS_URL {hide_password(url)!r} names no known backend; use memory://, "
        "sqlite:///path, redis://host or postgresql://host/db"
    )


def _missing(extra: str, exc: ImportError) -> ConfigurationError:
    return ConfigurationError(
        f"the {extra} backend needs its driver ({exc.name or exc}); "
        f"pip install 'flask-errands[{extra}]'"
    )
