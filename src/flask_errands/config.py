"""Every ``ERRANDS_*`` key with its default, and the typed settings read from them.

Values may come from code (real booleans and numbers) or from environment
variables, as text: boolean keys take ``true/false``, ``1/0``, ``yes/no`` and
``on/off`` in any case, number keys take digit strings, and keys in seconds
take durations such as ``"30s"`` or ``"7d"``. Anything else raises
:class:`ConfigurationError` naming the key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from .durations import parse_duration
from .exceptions import ConfigurationError
from .limits import Limit, queue_limits

DEFAULTS: dict[str, Any] = {
    "ERRANDS_URL": None,  # sqlite:///<instance_path>/errands.db
    "ERRANDS_EMBEDDED_WORKER": None,  # on for memory:// and sqlite://
    "ERRANDS_CONCURRENCY": 4,
    "ERRANDS_ASYNC_CONCURRENCY": 100,  # async def jobs at once on each process's event loop
    "ERRANDS_QUEUES": None,  # all queues
    "ERRANDS_LEASE_SECONDS": 30,
    "ERRANDS_MAX_LOST_LEASES": 3,  # a job whose worker died this many times in a row fails
    "ERRANDS_RESULT_TTL": dt.timedelta(days=7),
    "ERRANDS_MAX_PAYLOAD": 1024 * 1024,
    "ERRANDS_EAGER": False,
    "ERRANDS_SCHEDULE": [],
    "ERRANDS_SCHEDULER": True,
    "ERRANDS_SHUTDOWN_GRACE": 25,  # seconds the embedded worker's jobs get when the process ends
    "ERRANDS_REDIS_PREFIX": "errands:",  # a ?prefix= in a redis:// ERRANDS_URL wins
    "ERRANDS_OUTBOX_URL": None,  # the app's database (SQLAlchemy URL), for the outbox
    "ERRANDS_BROKER_URL": None,  # amqp://: RabbitMQ delivers the jobs, ERRANDS_URL keeps them
    "ERRANDS_TRACING": False,  # OpenTelemetry spans of enqueues and attempts
    "ERRANDS_QUEUE_LIMITS": {},  # {"emails": {"rate_limit": "100/m", "concurrency": 5}}
}

EMBEDDED_SCHEMES = ("memory", "sqlite")

_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


@dataclasses.dataclass(frozen=True)
class Settings:
    """The validated configuration of one app."""

    url: str
    embedded_worker: bool
    concurrency: int
    queues: tuple[str, ...] | None
    lease_seconds: float
    max_lost_leases: int
    result_ttl: float
    max_payload: int
    eager: bool
    schedule: tuple[Mapping[str, Any], ...]
    scheduler: bool
    shutdown_grace: float = 25.0
    outbox_url: str | None = None
    async_concurrency: int = 100
    broker_url: str | None = None
    tracing: bool = False
    #: ``ERRANDS_QUEUE_LIMITS``, checked: the limits of each queue that has some.
    queue_limits: Mapping[str, Limit] = dataclasses.field(default_factory=dict)

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
            embedded_worker=boolean(embedded, "ERRANDS_EMBEDDED_WORKER"),
            concurrency=_positive_int(config, "ERRANDS_CONCURRENCY"),
            queues=parse_queues(config["ERRANDS_QUEUES"]),
            lease_seconds=seconds(config["ERRANDS_LEASE_SECONDS"], "ERRANDS_LEASE_SECONDS"),
            max_lost_leases=_positive_int(config, "ERRANDS_MAX_LOST_LEASES"),
            result_ttl=seconds(config["ERRANDS_RESULT_TTL"], "ERRANDS_RESULT_TTL"),
            max_payload=_positive_int(config, "ERRANDS_MAX_PAYLOAD"),
            eager=boolean(config["ERRANDS_EAGER"], "ERRANDS_EAGER"),
            schedule=tuple(config["ERRANDS_SCHEDULE"] or ()),
            scheduler=boolean(config["ERRANDS_SCHEDULER"], "ERRANDS_SCHEDULER"),
            shutdown_grace=seconds(config["ERRANDS_SHUTDOWN_GRACE"], "ERRANDS_SHUTDOWN_GRACE"),
            outbox_url=config["ERRANDS_OUTBOX_URL"] or None,
            async_concurrency=_positive_int(config, "ERRANDS_ASYNC_CONCURRENCY"),
            broker_url=config["ERRANDS_BROKER_URL"] or None,
            tracing=boolean(config["ERRANDS_TRACING"], "ERRANDS_TRACING"),
            queue_limits=_queue_limits(config.get("ERRANDS_QUEUE_LIMITS")),
        )


def boolean(value: Any, name: str) -> bool:
    """Return ``value`` (a bool, 0/1, or a word such as ``"off"``) as a bool."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ConfigurationError(
        f"{name} must be True or False (or one of 'true/false', '1/0', 'yes/no', "
        f"'on/off'), not {value!r}"
    )


def seconds(value: Any, name: str) -> float:
    """Return ``value`` (seconds, a timedelta or a duration like ``"7d"``) as positive seconds."""
    if isinstance(value, dt.timedelta):
        value = value.total_seconds()
    elif isinstance(value, str):
        with contextlib.suppress(ValueError):  # the message below says what is accepted
            value = parse_duration(value)
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < math.inf:
        raise ConfigurationError(
            f"{name} must be a positive, finite number of seconds, a timedelta or a duration "
            f"such as '30s', '15m', '12h' or '7d'; not {value!r}"
        )
    return float(value)


def parse_queues(value: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """Return queue names from a list or a comma-separated string; None means all queues."""
    if value is None:
        return None
    names = value.split(",") if isinstance(value, str) else value
    queues = tuple(name.strip() for name in names if name.strip())
    return queues or None


def _queue_limits(value: Any) -> dict[str, Limit]:
    if value is not None and not isinstance(value, Mapping):
        raise ConfigurationError(f"ERRANDS_QUEUE_LIMITS must be a dict of queues, not {value!r}")
    try:
        return queue_limits(value)
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None


def _positive_int(config: Mapping[str, Any], name: str) -> int:
    value = config[name]
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{name} must be a whole number of at least 1, not {value!r}")
    return value
