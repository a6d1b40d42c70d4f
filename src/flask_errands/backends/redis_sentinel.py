"""``redis+sentinel://host:26379,host:26380/mymaster``: the Redis backend behind Redis Sentinel.

The URL lists sentinels and names the master they watch (then ``/db`` if not
0). Every new connection asks the sentinels where the master is, so after a
failover the backend's retries reach the promoted replica; a connection still
open to a demoted master fails on its first write (``READONLY``) and is
replaced. Keys, scripts and wake-ups are those of one Redis server.
``?replicas=N`` makes ``.delay()`` wait for N replicas, as on a cluster.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.connection import parse_url
from redis.retry import Retry
from redis.sentinel import Sentinel

from ..exceptions import ConfigurationError
from .redis import CLIENT_DEFAULTS, SCRIPTS, URL_OPTIONS, RedisBackend, _ReplyLost
from .redis_cluster import acknowledged, replica_count

#: Query parameters a redis+sentinel:// URL may carry: those of redis://, and ``replicas``.
SENTINEL_URL_OPTIONS = frozenset({*URL_OPTIONS, "replicas"})
_ENQUEUE = SCRIPTS["enqueue"]


class RedisSentinelBackend(RedisBackend):
    """Jobs in the Redis master that a group of sentinels names, found again after a failover."""

    def __init__(
        self, url: str, *, prefix: str | None = None, result_ttl: float | None = None
    ) -> None:
        self._replicas = replica_count(url)
        super().__init__(url, prefix=prefix, result_ttl=result_ttl)

    def _open(self, url: str) -> Any:
        parts = urlsplit(url)
        userinfo, _, hosts = parts.netloc.rpartition("@")
        sentinels = []
        for item in hosts.split(","):
            where = urlsplit("//" + item)
            if not where.hostname:
                raise ConfigurationError(f"ERRANDS_URL names no sentinel in {item!r}")
            sentinels.append((where.hostname, where.port or 26379))
        service, _, db = parts.path.strip("/").partition("/")
        if not service:
            raise ConfigurationError(
                "ERRANDS_URL redis+sentinel:// needs the master's name as its path "
                "(redis+sentinel://host:26379/mymaster)"
            )
        query = urlencode(
            [(key, value) for key, value in parse_qsl(parts.query) if key != "replicas"]
        )
        scheme = "rediss" if parts.scheme.startswith("rediss") else "redis"
        at = f"{userinfo}@" if userinfo else ""
        single = f"{scheme}://{at}localhost/{db or 0}" + (f"?{query}" if query else "")
        options = parse_url(single)  # type: ignore[no-untyped-call]
        for name in ("host", "port"):
            options.pop(name, None)
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            sentinels,
            sentinel_kwargs={"socket_timeout": CLIENT_DEFAULTS["socket_connect_timeout"]},
        )
        client = sentinel.master_for(  # type: ignore[no-untyped-call]
            service,
            # Retries are ours: a script is only run again where that is safe.
            retry=Retry(NoBackoff(), 0),
            **{**CLIENT_DEFAULTS, **options},
        )
        return client

    def _evalsha(self, sha: str, args: Sequence[Any]) -> Any:
        # Through redis-py's pool, whose connections ask the sentinels for the master:
        # the backend's own connections would connect to the configured address instead.
        command = ("EVALSHA", sha, 1, self.prefix, self.prefix, *args)
        try:
            if self._replicas and sha == _ENQUEUE.sha:
                return acknowledged(self._client, command, self._replicas, _ENQUEUE.text)
            return self._client.execute_command(*command)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if isinstance(exc, _ReplyLost):
                raise
            raise _ReplyLost(f"no reply ({type(exc).__name__}: {exc})") from exc
