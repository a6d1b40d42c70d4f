"""What the Redis backend adds to the conformance suite: outages, restarts, crashes, races.

Tests marked ``ON_REDIS`` get a key prefix of their own on the shared server
through the ``backend_url`` fixture. Tests that stop or restart a server start
their own ``redis-server`` on a free loopback port.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.helpers import MakeApp, app_command, free_port, require, unavailable, wait_until

redis = require("redis")

from flask_errands import EnqueueError, Errands, Job, current_job  # noqa: E402
from flask_errands.backends import JobRecord, backend_from_url  # noqa: E402
from flask_errands.backends.redis import RedisBackend  # noqa: E402

T = TypeVar("T")

ON_REDIS = pytest.mark.parametrize("backend_url", ["redis"], indirect=True)
DEADLINE = 30.0
LEASE = 2.0


def register_tasks(errands: Errands) -> dict[str, Any]:
    """The tasks of ``tests/apps/redis_worker.py``, so this process can enqueue and run them."""

    @errands.task(name="tests.hang_first")
    def hang_first(seconds: float) -> int:
        if current_job.attempt == 1:
            time.sleep(seconds)
        return current_job.attempt

    @errands.task(name="tests.add")
    def add(a: int, b: int) -> int:
        return a + b

    return {"hang_first": hang_first, "add": add}


def settled(jobs: list[Job], status: str = "succeeded") -> list[Job] | None:
    """The jobs, once every one of them has reached ``status``; else None."""
    return jobs if all(job.refresh().status == status for job in jobs) else None


class RedisServer:
    """A ``redis-server`` of the test's own, append-only, fsync on every write."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [
            "redis-server",
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.directory),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            "--logfile", str(self.directory / "redis.log"),
        ]  # fmt: skip
        self.process = subprocess.Popen(command)
        client = redis.Redis(port=self.port, socket_connect_timeout=1)

        def answers() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        wait_until(answers, f"redis-server on port {self.port} to answer")
        client.close()

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        unavailable("redis-server is not installed")
    server = RedisServer(tmp_path)
    server.start()
    yield server
    if server.process is not None and server.process.poll() is None:
        server.kill()


@pytest.fixture
def start_worker_process(tmp_path: Path) -> Iterator[Callable[[str], subprocess.Popen[bytes]]]:
    """Start ``tests/apps/redis_worker.py`` against a URL; killed afterwards."""
    started: list[subprocess.Popen[bytes]] = []

    def start(url: str) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(app_command("redis_worker", url, str(tmp_path), str(LEASE)))
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait()


# -- failure handling ---------------------------------------------------------


def test_delay_against_a_dead_server_raises_enqueue_error(make_app: Callable[..., Any]) -> None:
    app, errands = make_app(ERRANDS_URL=f"redis://127.0.0.1:{free_port()}/0")
    add = register_tasks(errands)["add"]
    with app.app_context():
        with pytest.raises(EnqueueError, match="nothing was stored") as caught:
            add.delay(1, 2)
        with pytest.raises(EnqueueError):
            add.delay_many([(1, 2), (3, 4)])
    assert "127.0.0.1" in str(caught.value)


def test_restarted_server_loses_nothing_acknowledged_and_workers_carry_on(
    own_redis: RedisServer,
    make_app: Callable[..., Any],
    start_worker_process: Callable[[str], subprocess.Popen[bytes]],
) -> None:
    app, errands = make_app(ERRANDS_URL=own_redis.url, ERRANDS_LEASE_SECONDS=LEASE)
    add = register_tasks(errands)["add"]
    start_worker_process(own_redis.url)
    with app.app_context():
        done = [add.delay(n, 1) for n in range(20)]
        wait_until(lambda: settled(done), "the first jobs to run")
        later = add.options(delay=600).delay(0, 0)
        waiting = add.delay_many([(n, 2) for n in range(200)])
        own_redis.kill()  # mid-run: the worker is draining the batch
        with pytest.raises(EnqueueError):
            add.delay(0, 0)
        own_redis.start()
        after = add.delay(100, 1)  # the web side reconnects, the server reloads the scripts
        every = [*done, *waiting, after]
        wait_until(lambda: settled(every), "the worker to reconnect and run every job")
        assert [job.result() for job in every] == [n + 1 for n in range(20)] + [
            n + 2 for n in range(200)
        ] + [101]
        assert later.refresh().status == "scheduled"


@ON_REDIS
def test_sigkilled_worker_jobs_run_again_after_the_lease(
    backend_url: str,
    make_app: Callable[..., Any],
    start_worker_process: Callable[[str], subprocess.Popen[bytes]],
) -> None:
    app, errands = make_app(ERRANDS_URL=backend_url, ERRANDS_LEASE_SECONDS=LEASE)
    tasks = register_tasks(errands)
    with app.app_context():
        in_flight = [tasks["hang_first"].delay(60) for _ in range(4)]  # the default concurrency
        queued = [tasks["add"].delay(n, n) for n in range(6)]
        worker = start_worker_process(backend_url)
        wait_until(lambda: settled(in_flight, "running"), "the worker to take four jobs")
        worker.send_signal(signal.SIGKILL)
        worker.wait()
        errands.start_worker()
        wait_until(lambda: settled(in_flight + queued), "every job to complete after the lease")
    assert [job.attempts for job in in_flight] == [2, 2, 2, 2]
    assert [job.result() for job in in_flight] == [2, 2, 2, 2]
    assert [job.attempts for job in queued] == [1] * 6
    assert [job.result() for job in queued] == [0, 2, 4, 6, 8, 10]


# -- semantics under concurrency ----------------------------------------------


@ON_REDIS
@pytest.mark.slow  # a soak: CI runs it with the slow tests
def test_ten_processes_drain_twenty_thousand_jobs_each_exactly_once(
    backend_url: str,
    make_app: Callable[..., Any],
    start_worker_process: Callable[[str], subprocess.Popen[bytes]],
) -> None:
    app, errands = make_app(ERRANDS_URL=backend_url)
    mark = errands.task(name="tests.mark")(lambda: None)
    with app.app_context():
        ids = [job.id for _ in range(20) for job in mark.delay_many([()] * 1000)]
        for _ in range(10):
            start_worker_process(backend_url)
        every = {("default", "succeeded"): 20_000}
        wait_until(lambda: errands.backend.counts() == every, "the drain", 180)
        assert {job.attempts for job in errands.backend.list_jobs(limit=20_000)} == {1}
    client = redis.Redis.from_url(backend_url.split("?")[0])
    runs = [run.decode() for run in client.lrange(backend_url.split("prefix=")[1] + "runs", 0, -1)]
    client.close()
    assert len(runs) == 20_000
    assert sorted(runs) == sorted(ids)


@ON_REDIS
def test_delayed_job_longer_than_the_lease_runs_once_at_its_time(
    backend_url: str, make_app: MakeApp
) -> None:
    client = redis.Redis.from_url(backend_url.split("?")[0])
    prefix = backend_url.split("prefix=")[1]
    apps = [make_app(ERRANDS_URL=backend_url, ERRANDS_LEASE_SECONDS=1) for _ in range(2)]
    for _, errands in apps:

        @errands.task(name="tests.count_runs")
        def count_runs() -> int:
            return int(client.incr(f"{prefix}runs:{current_job.id}"))

    app, errands = apps[0]
    with app.app_context():
        job = errands.tasks["tests.count_runs"].options(delay=3).delay()
    for other_app, other in apps:
        with other_app.app_context():
            other.start_worker()
    wait_until(lambda: settled([job]), "the delayed job to run")
    assert job.attempts == 1
    assert job.result() == 1
    assert job.started_at is not None and job.started_at >= job.scheduled_for
    assert int(client.get(f"{prefix}runs:{job.id}") or 0) == 1
    client.close()


@ON_REDIS
def test_three_concurrent_delays_with_one_unique_key_make_one_job(
    backend_url: str, make_app: Callable[..., Any]
) -> None:
    app, errands = make_app(ERRANDS_URL=backend_url)
    add = register_tasks(errands)["add"]
    start = threading.Barrier(3)
    ids: list[str] = []

    def enqueue() -> None:
        with app.app_context():
            start.wait()
            ids.append(add.options(unique_key="report-7").delay(1, 2).id)

    threads = [threading.Thread(target=enqueue) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(ids) == 3 and len(set(ids)) == 1
    with app.app_context():
        assert [job.id for job in errands.backend.list_jobs()] == ids[:1]


# -- records written by hand --------------------------------------------------


@ON_REDIS
@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("payload", "not json", "InvalidJob: "),
        ("payload", '{"args": "rm -rf /"}', "InvalidJob: "),
        ("eta", "soon", "InvalidJob: "),
        ("payload", b"\xff\xfe", "InvalidJob: "),
        ("task", "os.system", "UnknownTask: "),
    ],
)
def test_a_record_changed_by_hand_fails_cleanly_and_never_runs(
    backend_url: str, make_app: MakeApp, field: str, value: Any, error: str
) -> None:
    app, errands = make_app(ERRANDS_URL=backend_url)
    runs: list[int] = []

    @errands.task(name="tests.spy")
    def spy(*args: Any, **kwargs: Any) -> None:
        runs.append(1)

    client = redis.Redis.from_url(backend_url.split("?")[0])
    prefix = backend_url.split("prefix=")[1]
    with app.app_context():
        job = spy.delay()
        client.hset(f"{prefix}job:{job.id}", field, value)
        errands.drain()
        failed = job.refresh()
        assert failed.status == "failed"
        assert failed.error is not None and failed.error.startswith(error)
        assert runs == []
        assert errands.drain() == 0
    client.close()


# -- keys, expiry and wake-ups ------------------------------------------------


@ON_REDIS
def test_finished_jobs_expire_and_prune_leaves_no_index_behind(backend_url: str) -> None:
    backend = backend_from_url(backend_url, instance_path="/tmp", options={"result_ttl": 3600})
    assert isinstance(backend, RedisBackend)
    client = redis.Redis.from_url(backend_url.split("?")[0])
    # Mid-minute, so that prune(now + 1) below never reaches into the next minute.
    now = time.time() // 60 * 60 + 30

    def record(**fields: Any) -> JobRecord:
        return JobRecord(id=uuid.uuid4().hex, task="t", payload="{}", enqueued_at=now, **fields)

    first = record(queue="q2", unique_key="u", priority=3)
    backend.enqueue([first, record(queue="q2", unique_key="u"), record(), record(eta=now - 5)])
    assert backend.fire_tick("nightly", now - 60, record(queue="q3"), now)
    for claimed in backend.reserve(None, 10, "w", 30, now):
        backend.finish(claimed.id, claimed.lease_token or "", "succeeded", now, result="2")
    assert 3600 < client.ttl(f"{backend.prefix}job:{first.id}") <= 3600 + 86400
    assert backend.prune(now + 1) == 4
    assert backend.counts() == {}
    assert backend.list_jobs() == []
    keys = {key.decode()[len(backend.prefix) :] for key in client.scan_iter(f"{backend.prefix}*")}
    # This minute's count of finished attempts stays until prune or a depth sample folds it
    # into minute 0: it never expires, nor do the figures since the start, which metrics read.
    minute = f"finished:{int(now // 60)}"
    assert client.ttl(backend.prefix + minute) == -1
    keys -= {minute, "finishedminutes", "enqueued", "timings"}
    assert keys == {"seq", "schedules", "ticks:nightly", "tickfired:nightly", "tickjob:nightly"}
    backend.close()
    client.close()


@ON_REDIS
def test_the_prefix_comes_from_the_url_else_from_config(
    backend_url: str, make_app: Callable[..., Any]
) -> None:
    prefix = backend_url.split("prefix=")[1]
    app, errands = make_app(ERRANDS_URL=backend_url, ERRANDS_REDIS_PREFIX="ignored:")
    with app.app_context():
        assert isinstance(errands.backend, RedisBackend)
        assert errands.backend.prefix == prefix
    bare = backend_url.split("?")[0]
    app, errands = make_app(ERRANDS_URL=bare, ERRANDS_REDIS_PREFIX=prefix + "cfg:")
    add = register_tasks(errands)["add"]
    client = redis.Redis.from_url(bare)
    with app.app_context():
        job = add.delay(1, 2)
        assert client.exists(f"{prefix}cfg:job:{job.id}") == 1
        assert client.exists(f"errands:job:{job.id}") == 0
    client.close()


@ON_REDIS
def test_an_enqueue_from_another_process_wakes_the_watchers(backend_url: str) -> None:
    listener = backend_from_url(backend_url, instance_path="/tmp")
    woken = threading.Event()
    listener.watch(woken.set)
    wait_until(lambda: woken.wait(0.1), "the watcher to subscribe")
    woken.clear()  # from here on, only a message through Redis can wake it
    subprocess.run(app_command("enqueue_one", backend_url), check=True)
    wait_until(woken.is_set, "the wake-up from the other process")
    listener.close()


EMPTY_CALL = '{"args":[],"kwargs":{}}'


@ON_REDIS
def test_a_reserve_retried_after_a_lost_reply_claims_nothing_more(backend_url: str) -> None:
    backend = backend_from_url(backend_url, instance_path="/tmp")
    assert isinstance(backend, RedisBackend)
    now = time.time()
    jobs = [
        JobRecord(id=uuid.uuid4().hex, task="t", payload=EMPTY_CALL, eta=now, enqueued_at=now)
        for _ in range(3)
    ]
    backend.enqueue(jobs)
    call = [now, now + 30, "w", 2, "retried-token:", 3]  # the arguments reserve() sends
    first = backend._run("reserve", [*call, 0])
    again = backend._run("reserve", [*call, 1])  # what its retry sends when the reply was lost
    assert again == first
    claimed = [backend.get(jobs[i].id) for i in range(2)]
    assert [(j.status, j.attempts) for j in claimed if j] == [("running", 1), ("running", 1)]
    left = backend.get(jobs[2].id)
    assert left is not None and left.status == "queued"
    fresh = backend.reserve(None, 5, "w", 30, now)  # a new call claims what is left
    assert [j.id for j in fresh] == [jobs[2].id]
    backend.close()


@ON_REDIS
def test_a_tasks_running_set_holds_its_claimed_jobs_until_they_end(backend_url: str) -> None:
    from flask_errands.limits import Limit, encode

    backend = backend_from_url(backend_url, instance_path="/tmp")
    assert isinstance(backend, RedisBackend)
    limits = encode([Limit.of("task:t", None, 3)])
    now = time.time()
    jobs = [
        JobRecord(
            id=uuid.uuid4().hex,
            task="t",
            payload=EMPTY_CALL,
            eta=now,
            enqueued_at=now,
            limits=limits,
        )
        for _ in range(3)
    ]
    backend.enqueue(jobs)
    client = backend._client
    running = backend.prefix + "limit:running:task:t"
    claimed = backend.reserve(None, 3, "w", 30, now)
    assert client.zcard(running) == 3
    backend.finish(claimed[0].id, claimed[0].lease_token or "", "succeeded", now, result="1")
    backend.release(claimed[1].id, claimed[1].lease_token or "", now)
    backend.finish(claimed[2].id, claimed[2].lease_token or "", "scheduled", now, eta=now + 60)
    assert client.zcard(running) == 0
    again = backend.reserve(None, 3, "w", 30, now)  # the released job, under a new lease
    assert [job.id for job in again] == [claimed[1].id]
    assert client.zscore(running, claimed[1].id) == pytest.approx(now + 30)
    backend.close()
