"""Backends, chosen by one URL; optional drivers are imported only when chosen."""

from __future__ import annotations

import importlib
import os
from collections.abc import Collection, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from ..exceptions import ConfigurationError
from .base import Backend, JobRecord
from .urls import hide_password

__all__ = ["Backend", "JobRecord", "backend_from_url", "hide_password"]

#: The Redis family's schemes: the module that serves each, its backend class, and the
#: name of the URL query parameters that class accepts. All need the ``redis`` extra.
_ONE_SERVER = ("redis", "RedisBackend", "URL_OPTIONS")
_CLUSTER = ("redis_cluster", "RedisClusterBackend", "CLUSTER_URL_OPTIONS")
_SENTINEL = ("redis_sentinel", "RedisSentinelBackend", "SENTINEL_URL_OPTIONS")
REDIS_SCHEMES: dict[str, tuple[str, str, str]] = {
    "redis": _ONE_SERVER,
    "rediss": _ONE_SERVER,
    "unix": _ONE_SERVER,
    "redis+cluster": _CLUSTER,
    "rediss+cluster": _CLUSTER,
    "redis+sentinel": _SENTINEL,
    "rediss+sentinel": _SENTINEL,
}


def backend_from_url(
    url: str, *, instance_path: str, options: Mapping[str, Any] | None = None
) -> Backend:
    """Build the backend ``url`` names; relative SQLite paths are inside ``instance_path``.

    ``options`` carries settings from the app's config that some backends use
    (``prefix`` and ``result_ttl`` for Redis); the others ignore them. A query
    parameter the chosen backend does not know raises :class:`ConfigurationError`
    listing those it does, so a typo (``?prefx=``) is not silently ignored.
    """
    options = options or {}
    broker_url = options.get("broker_url")
    if broker_url:
        return _brokered(url, broker_url, instance_path, options)
    scheme = urlsplit(url).scheme
    if scheme == "memory":
        from .memory import MemoryBackend

        check_query(url, ())
        return MemoryBackend(url)
    if scheme == "sqlite":
        from .sqlite import SQLiteBackend

        check_query(url, ())
        path = url[len("sqlite://") :]
        if path in ("", "/", "/:memory:"):
            raise ConfigurationError(
                "ERRANDS_URL sqlite:// needs a file path (sqlite:///errands.db); "
                "for an in-process queue use memory://"
            )
        path = path[1:] if path.startswith("/") else path
        return SQLiteBackend(path if os.path.isabs(path) else os.path.join(instance_path, path))
    if scheme in REDIS_SCHEMES:
        module_name, class_name, options_name = REDIS_SCHEMES[scheme]
        try:
            module = importlib.import_module(f".{module_name}", __name__)
        except ImportError as exc:
            raise _missing("redis", exc) from exc
        check_query(url, getattr(module, options_name))
        backend: Backend = getattr(module, class_name)(
            url, prefix=options.get("prefix"), result_ttl=options.get("result_ttl")
        )
        return backend
    if scheme in ("postgresql", "postgres"):
        try:
            from .postgres import PostgresBackend  # type: ignore[import-not-found,unused-ignore]
        except ImportError as exc:
            raise _missing("postgres", exc) from exc
        check_query(url, _postgres_options())
        return PostgresBackend(url)  # type: ignore[no-any-return,unused-ignore]
    raise ConfigurationError(
        f"ERRANDS_URL {hide_password(url)!r} names no known backend; use memory://, "
        "sqlite:///path, redis://host, redis+cluster://host:port,host:port, "
        "redis+sentinel://host:port/name or postgresql://host/db"
    )


def _brokered(
    url: str, broker_url: str, instance_path: str, options: Mapping[str, Any]
) -> Backend:
    """The store ``url`` names, with RabbitMQ at ``broker_url`` carrying its jobs."""
    if urlsplit(broker_url).scheme not in ("amqp", "amqps"):
        raise ConfigurationError(
            f"ERRANDS_BROKER_URL {hide_password(broker_url)!r} is not a RabbitMQ URL; "
            "use amqp://user:password@host:5672/vhost"
        )
    if urlsplit(url).scheme == "memory":
        raise ConfigurationError(
            "ERRANDS_BROKER_URL needs a store every worker shares: set ERRANDS_URL to "
            "postgresql://, redis:// or sqlite:///, not memory://"
        )
    try:
        from .brokered import BrokeredBackend  # type: ignore[import-not-found,unused-ignore]
    except ImportError as exc:
        raise _missing("rabbitmq", exc) from exc
    store = backend_from_url(
        url, instance_path=instance_path, options={**options, "broker_url": None}
    )
    backend: Backend = BrokeredBackend(store, broker_url)
    return backend


def check_query(url: str, known: Collection[str]) -> None:
    """Raise :class:`ConfigurationError` for a query parameter of ``url`` not in ``known``."""
    query = urlsplit(url).query
    if not query:
        return
    unknown = sorted({key for key, _ in parse_qsl(query, keep_blank_values=True)} - set(known))
    if not unknown:
        return
    scheme = urlsplit(url).scheme
    accepted = f"accepts {', '.join(sorted(known))}" if known else "takes no query parameters"
    raise ConfigurationError(
        f"ERRANDS_URL has unknown query parameter(s) {', '.join(map(repr, unknown))}; "
        f"a {scheme}:// URL {accepted}"
    )


def _postgres_options() -> frozenset[str]:
    """The pool's own settings, ``timeout``, and every parameter this libpq knows."""
    from psycopg import pq

    from .postgres import POOL_OPTIONS

    libpq = {option.keyword.decode() for option in pq.Conninfo.get_defaults()}
    return frozenset({*POOL_OPTIONS, "timeout", *libpq})


def _missing(extra: str, exc: ImportError) -> ConfigurationError:
    return ConfigurationError(
        f"the {extra} backend needs its driver ({exc.name or exc}); "
        f"pip install 'flask-errands[{extra}]'"
    )
