"""A task that kills its own worker: re-delivered after each lost lease, failed after a few.

Real ``flask errands worker --processes 2`` processes on each shared store, whose
child dies (``os._exit``) in the middle of the job, and the schema migrations that
gave the stores the count of lost leases.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

import flask_errands
from flask_errands import ConfigurationError
from flask_errands.backends import backend_from_url
from flask_errands.backends.sqlite import QUERIES as SQLITE_QUERIES
from flask_errands.backends.sqlite import SCHEMA_VERSION as SQLITE_SCHEMA_VERSION
from tests.apps import worker_app
from tests.helpers import wait_until
from tests.processes import client_of

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def client(shared_backend_url: str, tmp_path: Path) -> Iterator[Flask]:
    """An app in the test process that enqueues to the workers' store and runs nothing."""
    with client_of(worker_app.errands, shared_backend_url, tmp_path, name="poison_client") as app:
        yield app


def start_workers(url: str, tmp_path: Path, log: Path) -> subprocess.Popen[bytes]:
    """``flask errands worker --processes 2 -c 1`` on ``url``, with one-second leases."""
    package_root = str(Path(flask_errands.__file__).resolve().parent.parent)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
        "FLASK_ERRANDS_URL": url,
        "FLASK_ERRANDS_LEASE_SECONDS": "1",
        "WORKER_APP_INSTANCE": str(tmp_path),
        "PYTHONUNBUFFERED": "1",
    }
    command = [sys.executable, "-m", "flask", "--app", "tests.apps.worker_app", "errands"]
    with open(log, "wb") as out:
        return subprocess.Popen(
            [*command, "worker", "--processes", "2", "-c", "1"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def job_of(app: Flask, job_id: str) -> Any:
    with app.app_context():
        return worker_app.errands.job(job_id)


def enqueue(app: Flask, task: Any, *args: Any) -> str:
    with app.app_context():
        return str(task.delay(*args).id)


def test_a_task_that_kills_its_worker_fails_after_three_lost_leases_and_work_goes_on(
    shared_backend_url: str, tmp_path: Path, client: Flask
) -> None:
    runs, log = tmp_path / "runs.txt", tmp_path / "worker.log"
    proc = start_workers(shared_backend_url, tmp_path, log)
    try:
        poison = enqueue(client, worker_app.die, str(runs))
        job = wait_until(
            lambda: (j := job_of(client, poison)).status == "failed" and j,
            "the poison job to fail",
        )
        after = enqueue(client, worker_app.noop)
        wait_until(lambda: job_of(client, after).status == "succeeded", "the next job to run")
        starts = [line.split() for line in runs.read_text().splitlines()]
        assert [attempt for attempt, _ in starts] == ["1", "2", "3"]
        assert job.attempts == 3
        last_pid = starts[-1][1]
        assert job.error.startswith("WorkerLost: worker ")
        assert f":{last_pid}:" in job.error  # the worker id says which process died
        assert "died while running attempt 3" in job.error
        assert "lost 3 leases in a row" in job.error
        assert job.traceback is None
        assert proc.poll() is None, log.read_text()
        assert f"die {poison} failed (attempt 3): WorkerLost" in log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()


OLD_JOB = (
    "INSERT INTO errands_jobs (id, task, payload, queue, priority, status, attempts,"
    " max_attempts, retry_delay, eta, enqueued_at)"
    " VALUES ('old', 'noop', '{\"args\":[],\"kwargs\":{}}', 'default', 0, 'queued', 0,"
    " 1, 1.0, 0, 0)"
)


def lose_the_old_job(url: str, instance_path: str) -> None:
    """Open the migrated store, run the old job and lose its lease once, at a limit of 1."""
    backend = backend_from_url(url, instance_path=instance_path)
    try:
        [claimed] = backend.reserve(None, 1, "w", 30, 1.0)
        assert (claimed.id, claimed.lost_leases) == ("old", 0)
        assert backend.reserve(None, 1, "w", 30, 32.0, max_lost_leases=1) == []
        failed = backend.get("old")
        assert failed is not None and (failed.status, failed.lost_leases) == ("failed", 1)
        assert failed.error is not None and failed.error.startswith("WorkerLost: worker w ")
    finally:
        backend.close()


def test_a_sqlite_file_of_schema_version_1_gains_the_lost_lease_count(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.execute(SQLITE_QUERIES["create_jobs"])  # as version 1 made it, with no version set
    old.execute(OLD_JOB)
    old.commit()
    assert "lost_leases" not in [row[1] for row in old.execute("PRAGMA table_info(errands_jobs)")]
    old.close()
    lose_the_old_job(f"sqlite:///{path}", str(tmp_path))
    reopened = sqlite3.connect(path)
    assert reopened.execute("PRAGMA user_version").fetchone()[0] == SQLITE_SCHEMA_VERSION
    reopened.close()


@pytest.mark.parametrize("backend_url", ["postgres"], indirect=True)
def test_postgres_tables_of_schema_version_1_gain_the_lost_lease_count(
    backend_url: str, tmp_path: Path
) -> None:
    psycopg = pytest.importorskip("psycopg")
    from flask_errands.backends.postgres import MIGRATIONS
    from flask_errands.backends.postgres import QUERIES as POSTGRES_QUERIES
    from flask_errands.backends.postgres import SCHEMA_VERSION as POSTGRES_SCHEMA_VERSION

    with psycopg.connect(backend_url, autocommit=True) as old:
        for statement in MIGRATIONS[1]:
            old.execute(statement)
        old.execute(POSTGRES_QUERIES["set_schema_version"], (1,))
        old.execute(OLD_JOB)
    lose_the_old_job(backend_url, str(tmp_path))
    with psycopg.connect(backend_url, autocommit=True) as new:
        version = new.execute("SELECT max(version) FROM errands_schema").fetchone()
        assert version == (POSTGRES_SCHEMA_VERSION,)


def claim_and_die(errands: Any, task: Any) -> str:
    """Enqueue a job and claim it as a worker would that dies at once: its lease lapses."""
    job_id = str(task.delay().id)
    [claimed] = errands.backend.reserve(None, 1, "dead-worker", 0.001, time.time())
    assert claimed.id == job_id
    time.sleep(0.01)
    return job_id


@pytest.mark.parametrize("limit", [1, 2])
def test_errands_max_lost_leases_rules_drain_and_the_embedded_worker(
    make_app: Callable[..., tuple[Flask, Any]], tmp_path: Path, limit: int
) -> None:
    app, errands = make_app(
        ERRANDS_URL=f"sqlite:///{tmp_path}/jobs.db",
        ERRANDS_EMBEDDED_WORKER=False,
        ERRANDS_MAX_LOST_LEASES=limit,
    )
    task = errands.task(name="poison.noop")(lambda: None)
    with app.app_context():
        drained = claim_and_die(errands, task)
        assert errands.drain() == (0 if limit == 1 else 1)
        job = errands.job(drained)
        assert job.status == ("failed" if limit == 1 else "succeeded")
        embedded = claim_and_die(errands, task)
        errands.start_worker()
        job = wait_until(
            lambda: (j := errands.job(embedded)).status.finished and j, "the worker to settle it"
        )
        assert job.status == ("failed" if limit == 1 else "succeeded")
        if limit == 1:
            assert job.error.startswith("WorkerLost: worker dead-worker died while running")


@pytest.mark.parametrize("value", [0, -1, 1.5, "three", True])
def test_errands_max_lost_leases_must_be_a_whole_number_of_at_least_1(
    make_app: Callable[..., tuple[Flask, Any]], value: object
) -> None:
    with pytest.raises(ConfigurationError, match="ERRANDS_MAX_LOST_LEASES"):
        make_app(ERRANDS_MAX_LOST_LEASES=value)
