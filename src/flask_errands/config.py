"""Every ``ERRANDS_*`` key with its default, and the typed settings read from them."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
from collections.abc import Mapping, Sequence
from typing import Any

from .exceptions import ConfigurationError

DEFAULTS: dict[str, Any] = {
    "ERRANDS_URL": None,  # sqlite:///<instance_path>/errands.db
    "ERRANDS_EMBEDDED_WORKER": None,  # on for memory:// and sqlite://
    "ERRANDS_CONCURRENCY": 4,
    "ERRANDS_QUEUES": None,  # all queues
    "ERRANDS_LEASE_SECONDS": 30,
    "ERRANDS_RESULT_TTL": dt.timedelta(days=7),
    "ERRANDS_MAX_PAYLOAD": 1024 * 1024,
    "ERRANDS_EAGER": False,
    "ERRANDS_SCHEDULE": [],
    "ERRANDS_SCHEDULER": True,
    "ERRANDS_SHUTDOWN_GRACE": 25,  # seconds the embedded worker's jobs get when the process ends
    "ERRANDS_REDIS_PREFIX": "errands:",  # a ?prefix= in a redis:// ERRANDS_URL wins
}

EMBEDDED_SCHEMES = ("memory", "sqlite")


@dataclasses.dataclass(frozen=True)
class Settings:
    """The validated configuration of one app."""

    url: str
    embedded_worker: bool
    concurrency: int
    queues: tuple[str, ...] | None
    lease_seconds: float
    result_ttl: float
    max_payload: int
    eager: bool
    schedule: tuple[Mapping[str, Any], ...]
    scheduler: bool
    shutdown_grace: float = 25.0

    @classmethod
    def from_config(
        cls, config: Mapping[str, Any], instance_path: str, *, url: str | None = None
    ) -> Settings:
        """Read and check every key; ``url`` names a store given as an object instead."""
        url = (
            url
            or config["ERRANDS_URL"]
            or "sqlite:///" + os.path.join(instance_path, "errands.db")
        )
        embedded = config["ERRANDS_EMBEDDED_WORKER"]
        if embedded is None:
            embedded = url.split(":", 1)[0] in EMBEDDED_SCHEMES
        return cls(
            url=url,
            embedded_worker=bool(embedded),
            concurrency=_positive_int(config, "ERRANDS_CONCURRENCY"),
            queues=parse_queues(config["ERRANDS_QUEUES"]),
            lease_seconds=seconds(config["ERRANDS_LEASE_SECONDS"], "ERRANDS_LEASE_SECONDS"),
            result_ttl=seconds(config["ERRANDS_RESULT_TTL"], "ERRANDS_RESULT_TTL"),
            max_payload=_positive_int(config, "ERRANDS_MAX_PAYLOAD"),
            eager=bool(config["ERRANDS_EAGER"]),
            schedule=tuple(config["ERRANDS_SCHEDULE"] or ()),
            scheduler=bool(config["ERRANDS_SCHEDULER"]),
            shutdown_grace=seconds(config["ERRANDS_SHUTDOWN_GRACE"], "ERRANDS_SHUTDOWN_GRACE"),
        )


def seconds(value: Any, name: str) -> float:
    """Return ``value`` (seconds or a timedelta) as a positive float of seconds."""
    if isinstance(value, dt.timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigurationError(f"{name} must be a positive number of seconds or a timedelta")
    return float(value)


def parse_queues(value: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """Return queue names from a list or a comma-separated string; None means all queues."""
    if value is None:
        return None
    names = value.split(",") if isinstance(value, str) else value
    queues = tuple(name.strip() for name in names if name.strip())
    return queues or None


def _positive_int(config: Mapping[str, Any], name: str) -> int:
    value = config[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{name} must be a whole number of at least 1, not {value!r}")
    return value
