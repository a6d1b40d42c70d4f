"""RabbitMQ as the transport, with real worker processes and a real broker.

The store is PostgreSQL; RabbitMQ carries the jobs. Workers are
``flask errands worker`` processes of ``tests/apps/worker_app.py``, whose
``record`` task writes a line when a run starts and one when it ends, with the
job's id, attempt and the worker's pid, so a test can count runs and see
whether two ever overlapped. The broker that gets restarted is a server of
the test's own (``tests/rabbit_server.py``); the shared one is only connected to.
"""

from __future__ import annotations

import collections
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from flask_errands import Errands, JobStatus
from flask_errands.backends import JobRecord, backend_from_url
from flask_errands.backends.base import SCHEDULED
from tests.conftest import BACKENDS, RABBITMQ_URL, rabbitmq_url
from tests.helpers import free_port, wait_until
from tests.processes import Served
from tests.proxy import Proxy
from tests.rabbit_server import RabbitServer

AppFactory = Callable[..., tuple[Flask, Errands]]
pytest.importorskip("pika")


@pytest.fixture
def store_url(tmp_path: Path) -> Iterator[str]:
    yield from BACKENDS["postgres"](str(tmp_path))


@pytest.fixture
def prefix() -> str:
    return f"errands-test-{uuid.uuid4().hex[:8]}."


class Deployment:
    """Worker processes on one store and broker, an app that enqueues, and what ran."""

    def __init__(self, tmp_path: Path, store: str, broker: str, make_app: AppFactory) -> None:
        self.tmp_path, self.store, self.broker = tmp_path, store, broker
        self.runs = tmp_path / "runs.txt"
        self.workers: list[Served] = []
        self.app, self.errands = make_app(
            ERRANDS_URL=store, ERRANDS_BROKER_URL=broker, ERRANDS_EMBEDDED_WORKER=False
        )

        @self.errands.task(name="record")
        def record(path: str, seconds: float = 0.0, label: str = "-") -> int:
            raise AssertionError("jobs run in the worker processes only")

        self.record = record

    def start_worker(self, broker: str | None = None, concurrency: int = 4) -> Served:
        served = Served(
            self.tmp_path,
            self.store,
            ERRANDS_BROKER_URL=broker or self.broker,
            ERRANDS_LEASE_SECONDS=2,
        )
        served.flask("tests.apps.worker_app", "errands", "worker", "-c", str(concurrency))
        self.workers.append(served)
        return served

    def enqueue(self, n: int, seconds: float = 0.0) -> list[str]:
        with self.app.app_context():
            return [self.record.delay(str(self.runs), seconds, str(i)).id for i in range(n)]

    def statuses(self, ids: list[str]) -> collections.Counter[JobStatus]:
        with self.app.app_context():
            return collections.Counter(self.errands.job(i).status for i in ids)  # type: ignore[union-attr]

    def wait_done(self, ids: list[str], timeout: float = 60.0) -> None:
        wait_until(
            lambda: self.statuses(ids)[JobStatus.SUCCEEDED] == len(ids),
            f"{len(ids)} jobs to succeed ({self.statuses(ids)})\n{self.output()}",
            timeout=timeout,
        )

    def starts(self) -> list[tuple[str, str, int]]:
        """Each run as ``(event, job id, pid)``, in the order they were written."""
        if not self.runs.exists():
            return []
        rows = [line.split() for line in self.runs.read_text().splitlines()]
        return [(row[0], row[2], int(row[4])) for row in rows]

    def assert_never_twice_at_once(self, dead: int | None = None) -> collections.Counter[str]:
        """Fail if a job started while a run of it had not ended; return runs per job.

        A run in the process ``dead`` (killed by the test) ended with it.
        """
        open_runs: dict[str, int] = {}
        runs: collections.Counter[str] = collections.Counter()
        for event, job_id, pid in self.starts():
            if event == "start":
                alive = open_runs.get(job_id, dead) != dead
                assert not alive, f"job {job_id} ran twice at once"
                open_runs[job_id] = pid
                runs[job_id] += 1
            else:
                del open_runs[job_id]
        return runs

    def output(self) -> str:
        return "\n".join(w.output()[-3000:] for w in self.workers)

    def close(self) -> None:
        for served in self.workers:
            served.close()


@pytest.fixture
def deployment(
    tmp_path: Path, store_url: str, prefix: str, make_app: AppFactory
) -> Iterator[Deployment]:
    made = Deployment(tmp_path, store_url, rabbitmq_url(prefix), make_app)
    yield made
    made.close()


def test_a_worker_killed_mid_job_has_its_jobs_run_again_and_only_those(
    deployment: Deployment,
) -> None:
    doomed = deployment.start_worker(concurrency=2)
    ids = deployment.enqueue(6, seconds=1.0)
    wait_until(
        lambda: any(pid == doomed.proc.pid for _, _, pid in deployment.starts()),  # type: ignore[union-attr]
        "the first worker to start a job",
    )
    deployment.start_worker(concurrency=2)
    doomed.signal_group(signal.SIGKILL)
    assert doomed.proc is not None
    doomed.proc.wait(timeout=30)
    in_flight = {
        job_id
        for event, job_id, pid in deployment.starts()
        if event == "start" and pid == doomed.proc.pid
    } - {job_id for event, job_id, _ in deployment.starts() if event == "end"}
    assert in_flight

    deployment.wait_done(ids)
    runs = deployment.assert_never_twice_at_once(dead=doomed.proc.pid)
    with deployment.app.app_context():
        attempts = {i: deployment.errands.backend.get(i).attempts for i in ids}  # type: ignore[union-attr]
    assert {i for i, n in runs.items() if n == 2} == in_flight
    assert {i for i, n in attempts.items() if n == 2} == in_flight
    assert set(runs.values()) <= {1, 2} and set(attempts.values()) <= {1, 2}


def test_every_message_is_acked_once_its_job_is_done_even_when_acks_are_batched(
    deployment: Deployment, prefix: str
) -> None:
    """Acks go out several at a time (one covering a run of deliveries): a wrong one
    would close the channel, and one never sent would leave its message unacked."""
    from flask_errands.backends.rabbitmq import amqp_queue

    rabbitmqctl = shutil.which("rabbitmqctl")
    if rabbitmqctl is None:
        pytest.skip("rabbitmqctl is needed to see unacked messages")
    name = amqp_queue(prefix, "default")

    def waiting() -> tuple[int, int] | None:
        """The queue's ready and unacked messages, as RabbitMQ counts them."""
        columns = ["name", "messages_ready", "messages_unacknowledged"]
        listed = subprocess.run(
            [rabbitmqctl, "list_queues", "-q", *columns],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        rows = [line.split("\t") for line in listed.splitlines()]
        return next(((int(r[1]), int(r[2])) for r in rows if r[0] == name), None)

    worker = deployment.start_worker(concurrency=4)
    ids = deployment.enqueue(300)
    deployment.wait_done(ids)
    wait_until(lambda: waiting() == (0, 0), f"every message acked ({waiting()})")
    assert "lost RabbitMQ" not in worker.output() and "consumer error" not in worker.output()
    assert set(deployment.assert_never_twice_at_once().values()) == {1}


def test_workers_reconnect_by_themselves_after_their_connection_went_silent(
    deployment: Deployment, prefix: str
) -> None:
    pika_port = int(rabbitmq_url(prefix).split("@127.0.0.1:")[1].split("/")[0])
    proxy = Proxy(pika_port)
    try:
        worker = deployment.start_worker(
            proxy.url("amqp://guest:guest@", f"/%2F?prefix={prefix}&heartbeat=1")
        )
        first = deployment.enqueue(100)
        deployment.wait_done(first)
        proxy.set_mode("silent")
        second = deployment.enqueue(100)  # acknowledged by the broker directly: never lost
        wait_until(lambda: "lost RabbitMQ" in worker.output(), "the worker to see the cut")
        proxy.set_mode("forward")
        wait_until(lambda: "is back" in worker.output(), "the worker to reconnect", timeout=60)
        third = deployment.enqueue(100)
        deployment.wait_done(second + third)
        runs = deployment.assert_never_twice_at_once()
        assert set(runs.values()) == {1} and len(runs) == 300
    finally:
        proxy.close()


def _drain_through_a_broker_restart(
    tmp_path: Path, store_url: str, make_app: AppFactory, jobs: int
) -> None:
    server = RabbitServer(tmp_path / "rabbitmq")
    server.start()
    try:
        made = Deployment(tmp_path, store_url, server.url, make_app)
        try:
            for _ in range(2):
                made.start_worker()
            before = made.enqueue(jobs)
            server.stop()
            while_down = made.enqueue(1)  # stored, not published: the store poll finds it
            server.start()
            wait_until(
                lambda: all("is back" in w.output() for w in made.workers),
                "both workers to reconnect",
                timeout=60,
            )
            after = made.enqueue(jobs)
            made.wait_done(before + while_down + after, timeout=120)
            runs = made.assert_never_twice_at_once()
            assert set(runs.values()) == {1} and len(runs) == 2 * jobs + 1
            with made.app.app_context():
                assert [
                    j.id
                    for j in made.errands.backend.list_jobs(limit=10 * jobs)
                    if j.id not in set(before + while_down + after)
                ] == []
        finally:
            made.close()
    finally:
        server.stop()


@pytest.mark.slow  # two starts of a broker of its own: CI runs it with the slow tests
def test_5000_jobs_drain_through_a_broker_restart_none_lost_none_twice(
    tmp_path: Path, store_url: str, make_app: AppFactory
) -> None:
    _drain_through_a_broker_restart(tmp_path, store_url, make_app, jobs=2500)


def test_delay_with_the_broker_down_stores_the_job_and_a_worker_runs_it_from_the_store(
    tmp_path: Path, store_url: str, make_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """The store is the source of truth: a message is only a worker's early word of a job."""
    down = f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F"
    made = Deployment(tmp_path, store_url, down, make_app)
    try:
        ids = made.enqueue(3)
        assert made.statuses(ids) == {JobStatus.QUEUED: 3}
        said = [r.getMessage() for r in caplog.records if "could not publish" in r.getMessage()]
        assert len(said) == 1, said  # an outage is said once, not once per job
        made.start_worker(broker=down)
        made.wait_done(ids)
        assert set(made.assert_never_twice_at_once().values()) == {1}
    finally:
        made.close()


def test_a_publisher_connection_dropped_while_idle_is_replaced_without_error_logs(
    prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """RabbitMQ drops a connection silent for two heartbeats; the next publish reconnects."""
    import pika

    from flask_errands.backends.rabbitmq import Publisher, amqp_queue

    publisher = Publisher(rabbitmq_url(prefix) + "&heartbeat=1")
    connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
    channel = connection.channel()
    name = amqp_queue(prefix, "default")
    try:
        publisher.publish([("default", "first", 0)])
        time.sleep(3.5)  # no heartbeat sent meanwhile: RabbitMQ closes the link
        publisher.publish([("default", "second", 0)])
        publisher.close()
        bodies = []
        while (got := channel.basic_get(name, auto_ack=True))[0] is not None:
            bodies.append(got[2])
        assert bodies == [b"first", b"second"]
        assert [r.getMessage() for r in caplog.records if r.name.startswith("pika")] == []
    finally:
        publisher.close()
        channel.queue_delete(name)
        connection.close()


def test_jobs_falling_due_are_published_once_however_many_workers_run(
    store_url: str, prefix: str, tmp_path: Path
) -> None:
    """Three workers' backends compete to lead; the jobs of a queue none of them consumes
    show what the leader publishes: one message per job, not one per worker."""
    import pika

    from flask_errands.backends.rabbitmq import amqp_queue

    broker = rabbitmq_url(prefix)
    backends = [
        backend_from_url(store_url, instance_path=str(tmp_path), options={"broker_url": broker})
        for _ in range(3)
    ]
    connection = pika.BlockingConnection(pika.URLParameters(RABBITMQ_URL))
    channel = connection.channel()

    def waiting_in_later() -> int:
        name = amqp_queue(prefix, "later")
        declared = channel.queue_declare(name, passive=True, durable=True)
        return int(declared.method.message_count)

    try:
        for backend in backends:  # each starts consuming "default", as a worker does
            backend.reserve(["default"], 1, "worker", 30.0, time.time())
        now = time.time()
        jobs = [
            JobRecord(uuid.uuid4().hex, "t", "{}", queue="later", status=SCHEDULED, eta=now + 0.5)
            for _ in range(5)
        ]
        backends[0].enqueue(jobs)
        wait_until(lambda: _declared(channel, amqp_queue(prefix, "later")), "the leader")
        wait_until(lambda: waiting_in_later() == 5, "the five jobs to be published")
        time.sleep(1.0)  # five turns of the leader: none publishes them again
        assert waiting_in_later() == 5
    finally:
        for backend in backends:
            backend.close()
        channel.queue_delete(amqp_queue(prefix, "later"))
        channel.queue_delete(amqp_queue(prefix, "default"))
        connection.close()


def _declared(channel: Any, name: str) -> bool:
    """Whether queue ``name`` exists (a passive declare of a missing one closes the channel)."""
    import pika

    probe = channel.connection.channel()
    try:
        probe.queue_declare(name, passive=True)
    except pika.exceptions.ChannelClosedByBroker:
        return False
    probe.close()
    return True
