"""What Redis Cluster and Sentinel add: one hash slot per store, failovers losing nothing.

The conformance suite runs on the session's 3-master cluster (``redis-cluster``
in ``BACKENDS``). The failover test starts a cluster of its own, with a replica
for each master, on ports 7110-7115, and kills a master under real workers;
the Sentinel test starts a master, a replica and a sentinel on ports 7103-7105
(each pytest-xdist worker has ports of its own: ``REDIS_PORTS``).
"""

from __future__ import annotations

import functools
import gc
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import Cluster, Sentinels
from tests.conftest import REDIS_PORTS, shared_cluster
from tests.helpers import MakeApp, app_command, require, wait_until

redis = require("redis")

from flask_errands import EnqueueError, Job  # noqa: E402
from flask_errands.backends import backend_from_url  # noqa: E402
from flask_errands.backends.redis_cluster import tagged  # noqa: E402
from flask_errands.exceptions import BackendUnavailable, ConfigurationError  # noqa: E402
from tests.backends.test_redis import register_tasks  # noqa: E402

ON_CLUSTER = pytest.mark.parametrize("backend_url", ["redis-cluster"], indirect=True)
FAILOVER_PORT = REDIS_PORTS[10]
SENTINEL_PORT = REDIS_PORTS[3]
LEASE = 2.0


def test_a_prefix_gets_a_hash_tag_unless_it_has_one() -> None:
    assert tagged("errands:") == "{errands}:"
    assert tagged("shop") == "{shop}"
    assert tagged("{shop}:jobs:") == "{shop}:jobs:"


SCHEMES = ["redis+cluster://127.0.0.1:7100,127.0.0.1:7101/", "redis+sentinel://127.0.0.1:7105/m"]


@pytest.mark.parametrize("base", SCHEMES)
@pytest.mark.parametrize("replicas", ["-1", "two"])
def test_a_bad_replica_count_is_refused(base: str, replicas: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="replicas"):
        backend_from_url(f"{base}?replicas={replicas}", instance_path=str(tmp_path))


@pytest.mark.parametrize("base", SCHEMES)
def test_an_unknown_url_parameter_is_refused_listing_replicas(base: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"'prefx'.*prefix.*replicas"):
        backend_from_url(f"{base}?prefx=a:", instance_path=str(tmp_path))


@ON_CLUSTER
def test_every_key_of_a_store_is_in_one_slot(backend_url: str, make_app: MakeApp) -> None:
    app, errands = make_app(ERRANDS_URL=backend_url)
    add = register_tasks(errands)["add"]
    with app.app_context():
        add.options(queue="a", unique_key="k").delay(1, 2)
        add.options(queue="b", priority=3).delay_many([(1, 1), (2, 2)])
        errands.drain()
        prefix = errands.backend.prefix  # type: ignore[attr-defined]
    client = redis.RedisCluster(host="127.0.0.1", port=REDIS_PORTS[0])
    keys = list(client.scan_iter(match=f"{prefix}*"))
    assert len(keys) > 10
    assert {client.keyslot(key) for key in keys} == {client.keyslot(prefix)}
    client.close()


@ON_CLUSTER
def test_the_store_follows_its_slot_to_another_master(backend_url: str, make_app: MakeApp) -> None:
    app, errands = make_app(ERRANDS_URL=backend_url)
    add = register_tasks(errands)["add"]
    with app.app_context():
        before = add.delay(1, 1)
        prefix = errands.backend.prefix  # type: ignore[attr-defined]
        source, target = shared_cluster().move_slot(prefix)
        after = add.delay(2, 2)  # MOVED: the client learns where the slot went
        errands.drain()
        assert (before.result(), after.result()) == (2, 4)
    assert shared_cluster().master_of(prefix) == target != source


@pytest.fixture
def failover_cluster() -> Iterator[Cluster]:
    cluster = Cluster(FAILOVER_PORT, masters=3, replicas=1).start()
    yield cluster
    cluster.stop()


# redis-py's cluster client can drop a socket to a node it replaced in its map without
# closing it; collected here (not at the end of the session), its ResourceWarning is ignored.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.slow  # a failover soak: on a loaded machine the new replica's sync takes a while
def test_a_master_killed_mid_drain_loses_no_acknowledged_job(
    failover_cluster: Cluster, make_app: MakeApp, tmp_path: Path
) -> None:
    url = f"{failover_cluster.url}?prefix=failover:&replicas=1"
    app, errands = make_app(ERRANDS_URL=url, ERRANDS_LEASE_SECONDS=LEASE)
    add = register_tasks(errands)["add"]
    workers = [
        subprocess.Popen(app_command("redis_worker", url, str(tmp_path), str(LEASE)))
        for _ in range(2)
    ]
    try:
        with app.app_context():
            acknowledged: list[Job] = []
            for start in range(0, 2000, 500):
                acknowledged += add.delay_many([(n, 1) for n in range(start, start + 500)])
            counts = wait_until(
                lambda: (
                    (c := errands.backend.counts()).get(("default", "succeeded"), 0) >= 100 and c
                ),
                "the workers to start draining",
            )
            master = failover_cluster.master_of("{failover}:")
            failover_cluster.kill(master)
            refused = 0
            while (promoted := _promoted(failover_cluster, master)) is None:
                try:  # while no master holds the slot, .delay() raises instead of answering
                    acknowledged.append(add.delay(len(acknowledged), 1))
                except EnqueueError:
                    refused += 1
            failover_cluster.run(master)  # the dead master comes back as the new one's replica
            wait_until(
                functools.partial(failover_cluster.replicating, master),
                f"node {master} to come back as a replica in sync",
            )
            wait_until(
                lambda: _enqueued(add, acknowledged),
                "enqueues confirmed by the new replica",
                timeout=90,
            )
            assert promoted != master
            wait_until(
                lambda: all(_finished(job) for job in acknowledged),
                "every acknowledged job to finish",
                timeout=60,
            )
            assert [job.result() for job in acknowledged] == [
                job.args[0] + 1 for job in acknowledged
            ]
            errands.backend.close()
            gc.collect()
    finally:
        for worker in workers:
            worker.kill()
            worker.wait()
    assert counts.get(("default", "queued"), 0) > 0, "the drain was over before the kill"
    assert refused > 0, "no .delay() met the failover"


def _promoted(cluster: Cluster, dead: int) -> int | None:
    try:
        port = cluster.master_of("{failover}:")
    except LookupError:
        return None
    return None if port == dead else port


def _enqueued(add: object, into: list[Job]) -> bool:
    try:
        into.append(add.delay(len(into), 1))  # type: ignore[attr-defined]
    except EnqueueError:
        return False
    return True


def _finished(job: Job) -> bool:
    try:
        return job.refresh().status == "succeeded"
    except BackendUnavailable:
        return False


@pytest.fixture
def sentinels() -> Iterator[Sentinels]:
    group = Sentinels(SENTINEL_PORT).start()
    yield group
    group.stop()


def test_behind_sentinel_a_killed_master_loses_no_acknowledged_job(
    sentinels: Sentinels, make_app: MakeApp
) -> None:
    url = f"{sentinels.url}?prefix=sentinel:&replicas=1"
    app, errands = make_app(ERRANDS_URL=url, ERRANDS_LEASE_SECONDS=LEASE)
    add = register_tasks(errands)["add"]
    with app.app_context():
        acknowledged = add.delay_many([(n, 1) for n in range(100)])
        sentinels.kill(sentinels.master)
        wait_until(lambda: sentinels.master_port() == sentinels.replica, "the sentinel's failover")
        with pytest.raises(EnqueueError, match="0 of 1 replica"):
            add.delay(0, 0)  # stored on the new master, which has no replica to confirm it
        errands.drain()
        assert [job.result() for job in acknowledged] == [n + 1 for n in range(100)]
