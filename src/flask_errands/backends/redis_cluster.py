"""``redis+cluster://host:port,host:port/``: the Redis backend on a Redis Cluster.

Every key of one store carries one hash tag (the prefix, ``{errands}:`` by
default), so the whole store sits in one hash slot and every script stays one
atomic step, exactly as on a single server. The price is scale: one master
holds the store and runs every script, and the cluster adds failover (a
replica takes over a dead master), not write throughput. Stores with other
prefixes hash elsewhere, so several apps or deployments spread over the masters.

redis-py's :class:`~redis.cluster.RedisCluster` finds the slot's master, follows
MOVED and ASK redirections and refreshes its map of the cluster after a
failover; the backend's own retries (as for one server) cover the seconds a
failover takes. Wake-ups travel on a sharded pub/sub channel (SPUBLISH and
SSUBSCRIBE, Redis 7) in the store's slot, so they reach only that slot's
nodes instead of every node of the cluster.

Replication is asynchronous: a master killed right after an enqueue may not
have passed the jobs on to its replica. With ``?replicas=N``, ``.delay()``
returns only once N replicas have the jobs (``WAIT``), and raises
:class:`~flask_errands.exceptions.EnqueueError` when they do not confirm in time.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import ClusterError, RedisClusterException, TryAgainError
from redis.retry import Retry

from ..exceptions import ConfigurationError
from .redis import CLIENT_DEFAULTS, DEFAULT_PREFIX, SCRIPTS, URL_OPTIONS, RedisBackend, _ReplyLost
from .redis import _Script as Script

#: Query parameters a redis+cluster:// URL may carry: those of redis://, and ``replicas``.
CLUSTER_URL_OPTIONS = frozenset({*URL_OPTIONS, "replicas"} - {"db"})
#: How long an acknowledged enqueue waits for its replicas to confirm, in milliseconds.
REPLICA_WAIT_MS = 1000
#: The scripts, publishing wake-ups on the sharded channel of the store's slot.
SHARDED_SCRIPTS = {
    name: Script(name, script.text.replace("'PUBLISH'", "'SPUBLISH'"))
    for name, script in SCRIPTS.items()
}
_TEXTS = {script.sha: script.text for script in SHARDED_SCRIPTS.values()}
_ACKNOWLEDGED = {SHARDED_SCRIPTS["enqueue"].sha}


def tagged(prefix: str) -> str:
    """``prefix`` with a hash tag, so every key under it hashes to one slot.

    A prefix that has a tag (``{app}:jobs:``) is kept; ``errands:`` becomes ``{errands}:``.
    """
    if re.search(r"\{[^{}]+\}", prefix):
        return prefix
    stem = prefix.rstrip(":")
    return "{" + (stem or "errands") + "}" + prefix[len(stem) :]


def replica_count(url: str) -> int:
    """The ``?replicas=`` of ``url`` (0 if absent); a bad value raises ConfigurationError."""
    query = parse_qsl(urlsplit(url).query, keep_blank_values=True)
    text = next((value for key, value in query if key == "replicas"), "0")
    if not text.isdigit():
        raise ConfigurationError(
            f"ERRANDS_URL ?replicas={text!r} must be a whole number, 0 or more"
        )
    return int(text)


def acknowledged(client: Any, command: tuple[Any, ...], replicas: int, text: str) -> Any:
    """Run a script, then WAIT on the same connection until ``replicas`` replicas have its writes.

    Fewer confirmations raise :class:`_ReplyLost`: the write may or may not
    survive a failover, as when a reply is lost.
    """
    for attempt in (1, 2):
        pipe = client.pipeline(transaction=False)
        pipe.execute_command(*command)
        pipe.execute_command("WAIT", replicas, REPLICA_WAIT_MS)
        try:
            reply, confirmed = pipe.execute()
        except redis.exceptions.NoScriptError:
            if attempt == 2:
                raise
            client.script_load(text)
            continue
        if int(confirmed) < replicas:
            raise _ReplyLost(
                f"stored on the master, but {confirmed} of {replicas} replica(s) "
                f"confirmed it within {REPLICA_WAIT_MS} ms"
            )
        return reply
    raise AssertionError("unreachable")  # pragma: no cover


class _Unsettled(redis.ConnectionError):
    """The cluster has no master for the store's slot just now (a failover is under way)."""


class RedisClusterBackend(RedisBackend):
    """Jobs in one hash slot of a Redis Cluster, shared by every process using the same prefix."""

    def __init__(
        self, url: str, *, prefix: str | None = None, result_ttl: float | None = None
    ) -> None:
        self._replicas = replica_count(url)
        super().__init__(url, prefix=prefix, result_ttl=result_ttl)
        self.prefix = tagged(self.prefix or DEFAULT_PREFIX)
        self._scripts = SHARDED_SCRIPTS

    def _open(self, url: str) -> _LazyCluster:
        return _LazyCluster(url)

    def _evalsha(self, sha: str, args: Sequence[Any]) -> Any:
        command = ("EVALSHA", sha, 1, self.prefix, self.prefix, *args)
        try:
            if self._replicas and sha in _ACKNOWLEDGED:
                return self._acknowledged(command)
            try:
                return self._client.execute_command(*command)
            except redis.exceptions.NoScriptError:
                # A replica promoted after a failover may not have the script yet.
                return self._client.execute_command("EVAL", _TEXTS[sha], *command[2:])
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            if isinstance(exc, _ReplyLost | _Unsettled):
                raise
            # The cluster client may have sent the script before the connection failed.
            raise _ReplyLost(f"no reply ({type(exc).__name__}: {exc})") from exc

    def _acknowledged(self, command: tuple[Any, ...]) -> Any:
        cluster = self._client.get()
        client = cluster.get_redis_connection(cluster.get_node_from_key(self.prefix))
        try:
            return acknowledged(client, command, self._replicas, _TEXTS[command[1]])
        except redis.ResponseError as exc:
            if str(exc).startswith(("MOVED", "ASK", "CLUSTERDOWN")):
                self._client.refresh()
                raise _Unsettled(f"the store's slot is moving ({exc})") from exc
            raise
        except (redis.ConnectionError, redis.TimeoutError):
            self._client.refresh()
            raise

    def _subscribe(self) -> tuple[Any, Callable[[float], Any]]:
        """Listen on the store's sharded channel, at the master that holds its slot."""
        cluster = self._client.get()
        channel = self._key("wake")
        try:
            node = cluster.get_node_from_key(channel)
            pubsub = cluster.get_redis_connection(node).pubsub()
        except Exception:
            self._client.refresh()
            raise
        try:
            pubsub.ssubscribe(channel)
        except BaseException:
            pubsub.close()
            self._client.refresh()  # the node may be gone: learn who holds the slot now
            raise

        def receive(timeout: float) -> Any:
            message = pubsub.get_sharded_message(timeout=timeout)
            if message is None or message["type"] == "ssubscribe":
                return None
            if message["type"] == "sunsubscribe":  # the slot moved to another master
                self._client.refresh()
                raise _Unsettled("the wake channel's slot moved")
            return message

        return pubsub, receive


class _LazyCluster:
    """A :class:`RedisCluster` made on first use, so an app starts while the cluster is down.

    Its errors are redis-py's connection errors, which the backend retries.
    """

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        userinfo, _, hosts = parts.netloc.rpartition("@")
        nodes = []
        for item in hosts.split(","):
            where = urlsplit("//" + item)
            if not where.hostname:
                raise ConfigurationError(f"ERRANDS_URL names no cluster node in {item!r}")
            nodes.append((where.hostname, where.port or 6379))
        scheme = "rediss" if parts.scheme.startswith("rediss") else "redis"
        query = urlencode(
            [(key, value) for key, value in parse_qsl(parts.query) if key != "replicas"]
        )
        first = f"{scheme}://{userinfo + '@' if userinfo else ''}{nodes[0][0]}:{nodes[0][1]}/"
        self._url = first + (f"?{query}" if query else "")
        self._nodes = nodes
        self._cluster: RedisCluster | None = None
        self._lock = threading.Lock()

    def get(self) -> RedisCluster:
        cluster = self._cluster
        if cluster is not None:
            return cluster
        with self._lock:
            if self._cluster is None:
                try:
                    self._cluster = RedisCluster(
                        url=self._url,
                        startup_nodes=[
                            ClusterNode(host, port)  # type: ignore[no-untyped-call]
                            for host, port in self._nodes[1:]
                        ],
                        # One quick retry on a fresh map of the cluster; the backend's own
                        # retries, with back-off, cover a failover.
                        retry=Retry(ExponentialBackoff(cap=0.05, base=0.01), 1),
                        **CLIENT_DEFAULTS,
                    )
                except RedisClusterException as exc:
                    raise _Unsettled(str(exc)) from exc
            return self._cluster

    def refresh(self) -> None:
        """Read the cluster's map again, after a node went away or a slot moved."""
        if self._cluster is not None:
            with contextlib.suppress(Exception):
                self._cluster.nodes_manager.initialize()

    def execute_command(self, *args: Any) -> Any:
        try:
            return self.get().execute_command(*args)  # type: ignore[no-untyped-call]
        except (RedisClusterException, ClusterError, TryAgainError) as exc:
            # No master serves the slot just now, or it is moving: a failover is under way.
            raise _Unsettled(f"{type(exc).__name__}: {exc}") from exc

    def script_load(self, text: str) -> Any:
        return self.execute_command("SCRIPT", "LOAD", text)

    def close(self) -> None:
        with self._lock:
            cluster, self._cluster = self._cluster, None
        if cluster is not None:
            manager = cluster.nodes_manager
            nodes = [*manager.nodes_cache.values(), *manager.startup_nodes.values()]
            cluster.close()
            for node in nodes:  # close() leaves the pools of nodes it no longer maps open
                if node.redis_connection is not None:
                    node.redis_connection.connection_pool.disconnect()
