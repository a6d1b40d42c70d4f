"""Fixtures shared by the suite: apps, and one backend URL per real store.

``backend_url`` is parametrised over every backend. A backend whose server
or driver is missing is skipped on a developer machine and fails under CI
(CI=true), so a green CI run always means every backend was tested for real.
The PostgreSQL database that the test URL names is created if it is missing.
"""

from __future__ import annotations

import contextlib
import functools
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from flask import Flask

from flask_errands import Errands
from flask_errands.backends import Backend, backend_from_url
from tests.cluster import Cluster
from tests.helpers import create_database, require, unavailable, worker_ports

REDIS_URL = os.environ.get("ERRANDS_TEST_REDIS", "redis://127.0.0.1:6379/0")
#: This process's 20 Redis ports (7100-7119 without xdist): the session's cluster on the
#: first 3, the Sentinel test's servers on the next 3, the failover test's cluster from the 11th.
REDIS_PORTS = worker_ports(7100, 20)
POSTGRES_URL = os.environ.get("ERRANDS_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
RABBITMQ_URL = os.environ.get("ERRANDS_TEST_RABBITMQ", "amqp://guest:guest@127.0.0.1:5672/%2F")

#: The RabbitMQ URL to pair with a store URL a brokered backend fixture made, by store URL.
BROKERS: dict[str, str] = {}


def _memory(tmp_path: str) -> Iterator[str]:
    yield "memory://"


def _sqlite(tmp_path: str) -> Iterator[str]:
    yield f"sqlite:///{tmp_path}/errands.db"


def _redis(tmp_path: str) -> Iterator[str]:
    redis = require("redis")
    prefix = f"errands-test-{uuid.uuid4().hex[:8]}:"
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.RedisError as exc:
        unavailable(f"no Redis server at {REDIS_URL}: {exc}")
    yield f"{REDIS_URL}?prefix={prefix}"
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


#: The session's Redis Cluster (3 masters on REDIS_PORTS[0:3]), started when a test first needs it.
_CLUSTERS: list[Cluster] = []


def shared_cluster() -> Cluster:
    """The session's Redis Cluster, started on first use."""
    if not _CLUSTERS:
        _CLUSTERS.append(Cluster(REDIS_PORTS[0]).start())
    return _CLUSTERS[0]


def _redis_cluster(tmp_path: str) -> Iterator[str]:
    redis = require("redis")
    prefix = f"errands-test-{uuid.uuid4().hex[:8]}:"
    cluster = shared_cluster()
    yield f"{cluster.url}?prefix={prefix}"
    tagged = f"{{{prefix[:-1]}}}:"
    # Every key of the store is in the tag's slot: delete them on the master that holds it.
    with redis.Redis(port=cluster.master_of(tagged)) as node:
        keys = list(node.scan_iter(match=f"{tagged}*", count=1000))
        for start in range(0, len(keys), 1000):
            node.delete(*keys[start : start + 1000])


@pytest.fixture(scope="session", autouse=True)
def _stop_redis_cluster() -> Iterator[None]:
    """Stop the session's Redis Cluster, if a test started it."""
    yield
    while _CLUSTERS:
        _CLUSTERS.pop().stop()


@functools.cache
def _create_postgres_database() -> None:
    """Create the test URL's database once a session; if that fails, connecting says why."""
    psycopg = require("psycopg")
    with contextlib.suppress(psycopg.Error):
        create_database(POSTGRES_URL)


def _postgres(tmp_path: str) -> Iterator[str]:
    psycopg = require("psycopg")
    _create_postgres_database()
    schema = f"errands_test_{uuid.uuid4().hex[:8]}"
    try:
        admin = psycopg.connect(POSTGRES_URL, autocommit=True)
    except psycopg.Error as exc:
        unavailable(f"no PostgreSQL server at {POSTGRES_URL}: {exc}")
    admin.execute(f"CREATE SCHEMA {schema}")
    yield f"{POSTGRES_URL}?options=-csearch_path%3D{schema}"
    admin.execute(f"DROP SCHEMA {schema} CASCADE")
    admin.close()


def rabbitmq_url(prefix: str) -> str:
    """The test broker's URL with its own queue ``prefix``; skips if RabbitMQ is not there."""
    pika = require("pika")
    try:
        pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL)).close()
    except (pika.exceptions.AMQPError, OSError) as exc:
        unavailable(f"no RabbitMQ at {RABBITMQ_URL}: {exc!r}")
    separator = "&" if "?" in RABBITMQ_URL else "?"
    return f"{RABBITMQ_URL}{separator}prefix={prefix}"


def _brokered(store: Callable[[str], Iterator[str]]) -> Callable[[str], Iterator[str]]:
    """A store fixture whose URL is paired with RabbitMQ, under queues of the test's own."""

    def fixture(tmp_path: str) -> Iterator[str]:
        prefix = f"errands-test-{uuid.uuid4().hex[:8]}."
        broker = rabbitmq_url(prefix)
        for url in store(tmp_path):
            BROKERS[url] = broker
            yield url
            del BROKERS[url]
            _delete_queues(url, prefix, tmp_path)

    return fixture


def _delete_queues(url: str, prefix: str, tmp_path: str) -> None:
    """Delete the test's RabbitMQ queues: those its store has jobs in, and ``default``."""
    pika = require("pika")
    from flask_errands.backends.rabbitmq import amqp_queue

    store = backend_from_url(url, instance_path=tmp_path)
    names = {"default"} | {queue for queue, _ in store.counts()}
    store.close()
    with contextlib.suppress(pika.exceptions.AMQPError, OSError):
        connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
        channel = connection.channel()
        for name in names:
            channel.queue_delete(amqp_queue(prefix, name))
        connection.close()


#: Every backend the suite knows, by name; a backend joins the conformance suite here.
BACKENDS: dict[str, Callable[[str], Iterator[str]]] = {
    "memory": _memory,
    "sqlite": _sqlite,
    "redis": _redis,
    "redis-cluster": _redis_cluster,
    "postgres": _postgres,
}

#: The backends every ``backend_url`` test runs on. The Redis Cluster runs the same
#: scripts as Redis, so it runs the store's own suite (tests/backends/conftest.py
#: widens the fixtures there) and its failover test, not every feature's tests again.
SUITE_BACKENDS = [name for name in BACKENDS if name != "redis-cluster"]

#: Stores with RabbitMQ as their transport (ERRANDS_BROKER_URL), for the suites that run them.
BROKERED: dict[str, Callable[[str], Iterator[str]]] = {
    "rabbitmq+postgres": _brokered(_postgres),
    "rabbitmq+redis": _brokered(_redis),
}

#: Backends whose store outlives a process, for the crash and multi-process tests.
SHARED_BACKENDS = [name for name in SUITE_BACKENDS if name != "memory"]


def _url_fixture(request: pytest.FixtureRequest, tmp_path: object) -> Iterator[str]:
    yield from {**BACKENDS, **BROKERED}[request.param](str(tmp_path))


@pytest.fixture(params=SUITE_BACKENDS)
def backend_url(request: pytest.FixtureRequest, tmp_path: object) -> Iterator[str]:
    """A fresh, empty store of each backend, as an ERRANDS_URL."""
    yield from _url_fixture(request, tmp_path)


@pytest.fixture(params=SHARED_BACKENDS)
def shared_backend_url(request: pytest.FixtureRequest, tmp_path: object) -> Iterator[str]:
    """A fresh store that several processes can share (not memory://)."""
    yield from _url_fixture(request, tmp_path)


def brokered_too(
    *, shared: bool = False, slow: tuple[str, ...] = (), stores: Sequence[str] = SUITE_BACKENDS
) -> Any:
    """A ``backend_url`` (or, ``shared``, ``shared_backend_url``) fixture that also runs
    the stores with RabbitMQ as their transport; a module opts in by assigning it.

    ``stores`` are the plain stores it runs on; the brokered backends named in ``slow``
    run only with the slow tests (``-m slow``).
    """
    brokered = [
        pytest.param(name, marks=pytest.mark.slow) if name in slow else name for name in BROKERED
    ]

    plain = [name for name in stores if not shared or name != "memory"]

    @pytest.fixture(params=[*plain, *brokered])
    def url(request: pytest.FixtureRequest, tmp_path: object) -> Iterator[str]:
        yield from _url_fixture(request, tmp_path)

    return url


@pytest.fixture
def sqlite_url(tmp_path: object) -> str:
    """A SQLite store in the test's folder, for tests that run real worker processes on it."""
    return f"sqlite:///{tmp_path}/jobs.db"


@pytest.fixture
def backend(backend_url: str, tmp_path: object) -> Iterator[Backend]:
    options = {"broker_url": BROKERS.get(backend_url)}
    store = backend_from_url(backend_url, instance_path=str(tmp_path), options=options)
    yield store
    store.close()


@pytest.fixture
def make_app(
    request: pytest.FixtureRequest, tmp_path: object
) -> Iterator[Callable[..., tuple[Flask, Errands]]]:
    """Build apps with their own instance folder; their workers are stopped afterwards.

    A store the test also asks for is set up first, so it is torn down only
    after these apps' workers have stopped using it.
    """
    for store in ("backend_url", "shared_backend_url"):
        if store in request.fixturenames:
            request.getfixturevalue(store)
    made: list[tuple[Flask, Errands]] = []

    def make(**config: object) -> tuple[Flask, Errands]:
        app = Flask("errands_test_app", instance_path=str(tmp_path))
        app.config.update(ERRANDS_URL="memory://", ERRANDS_LEASE_SECONDS=30)
        app.config.update(config)
        if app.config["ERRANDS_URL"] in BROKERS:
            app.config.setdefault("ERRANDS_BROKER_URL", BROKERS[app.config["ERRANDS_URL"]])
        errands = Errands(app)
        made.append((app, errands))
        return app, errands

    yield make
    for app, errands in made:
        with app.app_context():
            errands.stop_worker(grace=5)
            errands.backend.close()
