"""What the PostgreSQL backend adds to the conformance suite: outages, processes, schemas.

Tests marked ``ON_POSTGRES`` get a fresh schema on the shared server through
the ``backend_url`` fixture. Tests that stop a server start their own, on a
free loopback port, from the PostgreSQL binaries installed on the machine.
"""

from __future__ import annotations

import collections
import glob
import multiprocessing
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.helpers import MakeApp, app_command, create_database, free_port, require, wait_until

psycopg = require("psycopg")

from flask_errands import BackendUnavailable, ConfigurationError, EnqueueError  # noqa: E402
from flask_errands.backends import JobRecord, backend_from_url  # noqa: E402
from flask_errands.backends.postgres import SCHEMA_VERSION  # noqa: E402

T = TypeVar("T")

ON_POSTGRES = pytest.mark.parametrize("backend_url", ["postgres"], indirect=True)
DEADLINE = 30.0


def job(**fields: Any) -> JobRecord:
    defaults: dict[str, Any] = {
        "id": uuid.uuid4().hex,
        "task": "tests.noop",
        "payload": '{"args":[],"kwargs":{}}',
        "eta": 0.0,
        "enqueued_at": time.time(),
    }
    defaults.update(fields)
    return JobRecord(**defaults)


def schema_of(url: str) -> str:
    return url.rsplit("search_path%3D", 1)[1]


# -- settings and failures -----------------------------------------------------


def test_the_url_password_is_hidden_and_pool_options_are_checked() -> None:
    from flask_errands.backends.postgres import PostgresBackend

    backend = PostgresBackend("postgresql://ada:s3cret@127.0.0.1:1/db?password=other")
    assert "s3cret" not in backend.url and "other" not in backend.url
    with pytest.raises(ConfigurationError, match="pool_timeout"):
        PostgresBackend("postgresql://127.0.0.1/db?pool_timeout=0")
    with pytest.raises(ConfigurationError, match="pool_max_size"):
        PostgresBackend("postgresql://127.0.0.1/db?pool_max_size=many")
    for bad in ("0", "-1", "inf", "soon"):
        with pytest.raises(ConfigurationError, match="timeout in ERRANDS_URL"):
            PostgresBackend(f"postgresql://127.0.0.1/db?timeout={bad}")


@ON_POSTGRES
def test_pool_options_in_the_url_are_not_passed_to_the_server(backend_url: str) -> None:
    url = f"{backend_url}&pool_max_size=2&pool_timeout=3&timeout=4"
    backend = backend_from_url(url, instance_path="")
    try:
        backend.enqueue([job()])
        assert backend.counts() == {("default", "queued"): 1}
        with backend._connection() as conn:  # type: ignore[attr-defined]
            settings = conn.execute("SHOW statement_timeout").fetchone()
        assert settings == {"statement_timeout": "3600ms"}  # a little under timeout=4
    finally:
        backend.close()


def test_an_app_starts_while_the_server_is_down_and_says_why_jobs_fail(
    make_app: MakeApp,
) -> None:
    port = free_port()
    url = f"postgresql://ada:s3cret@127.0.0.1:{port}/db?pool_timeout=1"
    app, errands = make_app(ERRANDS_URL=url)

    @errands.task
    def noop() -> None: ...

    with app.app_context():
        with pytest.raises(EnqueueError) as enqueue:
            noop.delay()
        with pytest.raises(BackendUnavailable) as lookup:
            errands.job("some-id")
    for message in (str(enqueue.value), str(lookup.value)):
        assert f"127.0.0.1:{port}" in message
        assert "s3cret" not in message
        assert "\n" not in message
        assert "refused" in message.lower()
    assert str(enqueue.value).startswith("job not enqueued")
    assert not isinstance(lookup.value, EnqueueError)


@ON_POSTGRES
def test_the_suite_creates_the_database_its_url_names(backend_url: str) -> None:
    """What lets the suite run on a fresh server with nothing created by hand."""
    server = backend_url.split("?")[0]
    name = f"errands_created_{uuid.uuid4().hex[:8]}"
    url = psycopg.conninfo.make_conninfo(server, dbname=name)
    try:
        assert create_database(url) is True
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == (name,)
        assert create_database(url) is False
    finally:
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}"')


# -- schemas -------------------------------------------------------------------


@ON_POSTGRES
def test_processes_starting_together_create_the_tables_once(backend_url: str) -> None:
    start = time.time() + 1.5
    procs = [
        subprocess.Popen(
            app_command("create_tables", backend_url, str(start)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    outputs = [proc.communicate(timeout=60) for proc in procs]
    for proc, (out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
        assert out.strip() == "{}"
    with psycopg.connect(backend_url) as conn:
        versions = conn.execute("SELECT version FROM errands_schema ORDER BY version").fetchall()
    assert versions == [(n,) for n in range(1, SCHEMA_VERSION + 1)]  # each migration ran once


@ON_POSTGRES
def test_tables_from_a_newer_release_are_refused(backend_url: str) -> None:
    first = backend_from_url(backend_url, instance_path="")
    first.counts()
    first.close()
    with psycopg.connect(backend_url, autocommit=True) as conn:
        conn.execute("INSERT INTO errands_schema (version) VALUES (99)")
    newer = backend_from_url(backend_url, instance_path="")
    try:
        with pytest.raises(ConfigurationError, match=r"version 99.*upgrade flask-errands"):
            newer.counts()
    finally:
        newer.close()


@ON_POSTGRES
def test_a_schema_of_version_7_counts_its_running_limited_jobs(backend_url: str) -> None:
    """Version 8 fills the counts a limited claim with headroom reads from the jobs as they are."""
    from flask_errands.limits import Limit, encode
    from tests.backends.test_limits import check_upgraded_limits

    limits = encode([Limit.of("task:tests.noop", "5/m", 1)])
    first = backend_from_url(backend_url, instance_path="")
    first.expect_limits()
    try:
        first.enqueue([job(limits=limits) for _ in range(3)])
        [running] = first.reserve(None, 1, "w", 30, 1.0)
    finally:
        first.close()
    # Back to version 7, which had no counts: its starts were logged by the claim itself.
    with psycopg.connect(backend_url, autocommit=True) as conn:
        conn.execute("DROP TRIGGER errands_limit_bookkeeping ON errands_jobs")
        conn.execute("DROP TABLE errands_limit_counts")
        conn.execute("INSERT INTO errands_limit_starts VALUES ('task:tests.noop', 1, 1.5)")
        conn.execute("DROP INDEX errands_jobs_waiting_free")
        conn.execute("DELETE FROM errands_schema WHERE version >= 8")
    check_upgraded_limits(backend_url, running, limits)
    with psycopg.connect(backend_url) as conn:
        counts = conn.execute("SELECT key, running, starts FROM errands_limit_counts").fetchall()
        starts = conn.execute("SELECT n, at FROM errands_limit_starts ORDER BY n").fetchall()
    assert counts == [("task:tests.noop", 1, 3)]
    assert starts == [(0, 1.0), (1, 1.5), (2, 4.0)]


# -- wake-ups ------------------------------------------------------------------


@ON_POSTGRES
def test_a_dropped_listen_connection_reconnects_and_wakes_watchers_again(
    backend_url: str,
) -> None:
    listener = backend_from_url(backend_url, instance_path="")
    writer = backend_from_url(backend_url, instance_path="")
    woken = threading.Event()
    try:
        listener.watch(woken.set)
        assert woken.wait(DEADLINE), "the listener never said it was listening"
        woken.clear()
        writer.enqueue([job()])
        assert woken.wait(DEADLINE), "an enqueue by another backend woke nobody"

        woken.clear()
        with psycopg.connect(backend_url.split("?")[0], autocommit=True) as admin:
            [(ended,)] = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE query LIKE 'LISTEN %%' AND query LIKE %s",
                (f"%{schema_of(backend_url)}%",),
            ).fetchall()
        assert ended == 1
        assert woken.wait(DEADLINE), "the listener did not reconnect"
        woken.clear()
        writer.enqueue([job()])
        assert woken.wait(DEADLINE), "an enqueue after the reconnect woke nobody"
    finally:
        listener.close()
        writer.close()


# -- processes -----------------------------------------------------------------


@ON_POSTGRES
def test_a_forked_child_uses_connections_of_its_own(backend_url: str) -> None:
    # Sessions are named so that any left stuck by a shared socket can be ended below.
    name = f"errands-fork-{uuid.uuid4().hex[:8]}"
    backend = backend_from_url(f"{backend_url}&application_name={name}", instance_path="")
    parent_jobs = [job() for _ in range(200)]
    child_jobs = [job() for _ in range(200)]
    backend.enqueue(parent_jobs[:1])  # the parent's pool is open before the fork
    errors: list[Exception] = []

    def use(records: list[JobRecord]) -> None:
        for record in records:
            backend.enqueue([record])
            assert backend.get(record.id) is not None

    def in_parent() -> None:
        try:
            use(parent_jobs[1:])
        except Exception as exc:
            errors.append(exc)

    context = multiprocessing.get_context("fork")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads, on 3.12+
        process = context.Process(target=use, args=(child_jobs,))
        process.start()
    parent = threading.Thread(target=in_parent, daemon=True)
    parent.start()
    try:
        parent.join(DEADLINE)
        process.join(DEADLINE)
        hung = [who for who, t in (("parent", parent), ("child", process)) if t.is_alive()]
    finally:
        with psycopg.connect(backend_url, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = %s",
                (name,),
            )
        process.kill()
        backend.close()
    assert not hung, f"{' and '.join(hung)} hung on a connection shared through fork()"
    assert not errors
    assert process.exitcode == 0
    with psycopg.connect(backend_url) as conn:
        [(stored,)] = conn.execute("SELECT count(*) FROM errands_jobs").fetchall()
    assert stored == 400


@ON_POSTGRES
def test_two_worker_processes_run_2000_jobs_each_exactly_once(
    backend_url: str, make_app: MakeApp, tmp_path: Path
) -> None:
    logs = [tmp_path / f"ran-{n}.txt" for n in range(2)]
    workers = [
        subprocess.Popen(
            app_command("pg_worker", backend_url, str(log), str(tmp_path)),
            stdout=subprocess.PIPE,
            text=True,
        )
        for log in logs
    ]
    try:
        for worker in workers:
            assert worker.stdout is not None and worker.stdout.readline().strip() == "ready"
        app, errands = make_app(ERRANDS_URL=backend_url)

        @errands.task(name="tests.pg.record")
        def record(n: int) -> int:
            return n

        with app.app_context():
            jobs = []
            for start in range(0, 2000, 250):
                jobs += record.delay_many(range(start, start + 250))
            backend = errands.backend

            wait_until(
                lambda: backend.counts() == {("default", "succeeded"): 2000},
                "2,000 jobs succeeding",
            )
            assert {j.attempts for j in backend.list_jobs(limit=3000)} == {1}
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        for worker in workers:
            worker.communicate(timeout=DEADLINE)
    assert [worker.returncode for worker in workers] == [0, 0]
    runs = [log.read_text().split() for log in logs]
    assert all(runs), "one worker process did all the work"
    counted = collections.Counter(job_id for run in runs for job_id in run)
    assert set(counted) == {j.id for j in jobs}
    assert set(counted.values()) == {1}


# -- a server of the test's own, stopped and started -----------------------------


class PrivateServer:
    """A throwaway PostgreSQL cluster on a free loopback port, run by the postgres user if root."""

    def __init__(self, bindir: str, directory: str) -> None:
        self.bindir = bindir
        self.directory = directory
        self.data = os.path.join(directory, "data")
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._as_owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self._run("initdb", "-D", self.data, "-U", "postgres", "-A", "trust", "--no-sync")

    def _run(self, tool: str, *args: str, check: bool = True) -> None:
        command = [*self._as_owner, os.path.join(self.bindir, tool), *args]
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
        if check:
            assert done.returncode == 0, f"{tool} failed: {done.stdout}{done.stderr}"

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.directory}"
        log = os.path.join(self.directory, "server.log")
        self._run("pg_ctl", "start", "-D", self.data, "-w", "-t", "30", "-l", log, "-o", options)

    def stop(self, mode: str = "fast", *, check: bool = True) -> None:
        self._run("pg_ctl", "stop", "-D", self.data, "-m", mode, "-w", "-t", "30", check=check)


def _postgres_bindir() -> str | None:
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda path: int(path.split("/")[4])
    )
    initdb = found[-1] if found else shutil.which("initdb")
    return os.path.dirname(initdb) if initdb else None


@pytest.fixture
def private_server() -> Iterator[PrivateServer]:
    bindir = _postgres_bindir()
    if bindir is None or (os.geteuid() == 0 and shutil.which("runuser") is None):
        reason = "needs PostgreSQL's initdb and pg_ctl (and runuser when run as root)"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the outage test: {reason}")
        pytest.skip(reason)
    directory = tempfile.mkdtemp(prefix="errands-pg-")
    if os.geteuid() == 0:
        shutil.chown(directory, "postgres")
    try:
        server = PrivateServer(bindir, directory)
        server.start()
        yield server
        server.stop(mode="immediate", check=False)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def test_a_server_restart_fails_enqueues_then_the_worker_carries_on(
    private_server: PrivateServer, make_app: MakeApp
) -> None:
    app, errands = make_app(ERRANDS_URL=f"{private_server.url}?pool_timeout=2")

    @errands.task
    def double(n: int) -> int:
        return 2 * n

    def delay_when_possible() -> Any:
        try:
            return double.delay(5)
        except EnqueueError:
            return None

    with app.app_context():
        errands.start_worker()
        assert double.delay(21).result(timeout=DEADLINE) == 42
        private_server.stop()
        with pytest.raises(EnqueueError, match=f"127.0.0.1:{private_server.port}"):
            double.delay(1)
        private_server.start()
        job = wait_until(delay_when_possible, "an enqueue after the restart")
        assert job.result(timeout=DEADLINE) == 10
        assert errands.backend.counts() == {("default", "succeeded"): 2}
