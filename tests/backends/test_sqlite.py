"""SQLite under another process's write lock: leases that lapse behind it, and ``.delay()``;
and files made by an older version.

The lock is a real ``BEGIN IMMEDIATE`` on a connection of the test's own, as a
long transaction of the app, a migration or the ``sqlite3`` shell would hold
it. The worker is a real process running the app's embedded worker; its task
appends to a file, so the test counts how many times the job really ran.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from flask import Flask

import flask_errands
from flask_errands import EnqueueError, Errands, JobStatus
from flask_errands.backends import backend_from_url
from flask_errands.backends.base import JobRecord
from flask_errands.backends.sqlite import QUERIES, SCHEMA_VERSION
from flask_errands.worker import new_worker_id
from tests.helpers import wait_until

AppFactory = Callable[..., tuple[Flask, Errands]]

WORKER_PROCESS = textwrap.dedent(
    """
    import logging, os, sys, time
    from flask import Flask
    from flask_errands import Errands

    db, runs, lease = sys.argv[1], sys.argv[2], float(sys.argv[3])
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app = Flask("lock_app", instance_path=os.path.dirname(db))
    app.config.update(
        ERRANDS_URL="sqlite:///" + db, ERRANDS_LEASE_SECONDS=lease, ERRANDS_CONCURRENCY=2
    )
    errands = Errands(app)

    @errands.task(name="lock.record")
    def record(seconds):
        with open(runs, "a") as out:
            out.write("ran\\n")
        time.sleep(seconds)
        return "done"

    with app.app_context():
        errands.start_worker()
    open(runs + ".ready", "w").close()
    while True:
        time.sleep(0.05)
    """
)


class WorkerProcess:
    """One process running the app's worker on a SQLite file, and what its task recorded."""

    def __init__(self, tmp_path: Path, lease_seconds: float) -> None:
        self.lease_seconds = lease_seconds
        self.db = tmp_path / "errands.db"
        self.runs = tmp_path / "runs.txt"
        self.log = tmp_path / "worker.log"
        script = tmp_path / "worker_process.py"
        script.write_text(WORKER_PROCESS)
        env = dict(os.environ)
        package_root = str(Path(flask_errands.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(script), str(self.db), str(self.runs), str(lease_seconds)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until(
            lambda: Path(f"{self.runs}.ready").exists() or self.proc.poll() is not None,
            "the worker process to start",
        )
        assert self.proc.poll() is None, self.output()

    def run_count(self) -> int:
        return len(self.runs.read_text().split()) if self.runs.exists() else 0

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def pause(self) -> None:
        """Stop the process (SIGSTOP) and wait until the kernel says it is stopped."""
        self.proc.send_signal(signal.SIGSTOP)
        wait_until(lambda: _state(self.proc.pid) == "T", "the worker process to stop")

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def end(self) -> None:
        self.proc.send_signal(signal.SIGCONT)
        self.proc.kill()
        self.proc.wait()


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]


@pytest.fixture
def store(tmp_path: Path, make_app: AppFactory) -> Iterator[tuple[Path, Errands]]:
    """The test's own app on a SQLite file: it enqueues and looks, and never runs a job."""
    db = tmp_path / "errands.db"
    app, errands = make_app(ERRANDS_URL=f"sqlite:///{db}", ERRANDS_EMBEDDED_WORKER=False)

    @errands.task(name="lock.record")
    def record(seconds: float) -> str:
        raise AssertionError("jobs run in the worker process only")

    with app.app_context():
        errands.backend.counts()  # the tables exist before anyone locks the file
        yield db, errands


def _write_lock(db: Path) -> sqlite3.Connection:
    """Take the database's write lock on a connection of its own, as another program would."""
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    return holder


def _lock_through_lease_then_compete(
    db: Path, errands: Errands, worker: WorkerProcess, held: float, rival: str
) -> list[str]:
    """Hold the write lock for ``held`` seconds while the worker's job runs and finishes.

    At the release, worker ``rival`` on this host claims due work first: the
    worker process is stopped across the release so that it loses the race for
    the lock, as it does about half the time when both wait for it.
    """
    holder = _write_lock(db)
    try:
        time.sleep(held)
        worker.pause()
    finally:
        holder.execute("COMMIT")
        holder.close()
    try:
        claimed = errands.backend.reserve(None, 10, rival, worker.lease_seconds, time.time())
    finally:
        worker.resume()
    return [record.id for record in claimed]


def test_a_job_finished_behind_a_lock_longer_than_its_lease_runs_once(
    tmp_path: Path, store: tuple[Path, Errands]
) -> None:
    db, errands = store
    worker = WorkerProcess(tmp_path, lease_seconds=2.0)
    try:
        job = errands.tasks["lock.record"].delay(1.0)
        wait_until(lambda: worker.run_count() == 1, "the job to start")

        # The job ends a second into a 4 s lock, and its 2 s lease lapses behind it.
        taken_over = _lock_through_lease_then_compete(
            db, errands, worker, held=4.0, rival=new_worker_id()
        )

        assert taken_over == [], "another worker took over the job its live worker had finished"
        assert job.result(timeout=30) == "done"
        job.refresh()
        assert (job.status, job.attempts) == (JobStatus.SUCCEEDED, 1)
        assert worker.run_count() == 1
    finally:
        worker.end()


def test_a_job_taken_over_after_its_lease_and_grace_lapsed_is_reported_by_its_worker(
    tmp_path: Path, store: tuple[Path, Errands]
) -> None:
    db, errands = store
    # A 0.3 s lease lapses for good well within the 4 s lock (1.5 s: itself and 4 more).
    worker = WorkerProcess(tmp_path, lease_seconds=0.3)
    try:
        job = errands.tasks["lock.record"].delay(1.0)
        wait_until(lambda: worker.run_count() == 1, "the job to start")

        rival = new_worker_id()
        taken_over = _lock_through_lease_then_compete(db, errands, worker, held=4.0, rival=rival)

        assert taken_over == [job.id]
        warning = wait_until(
            lambda: [
                line
                for line in worker.output().splitlines()
                if job.id in line and "outcome is dropped" in line
            ],
            "the worker to log that its job was taken over",
        )
        lapsed = [line for line in worker.output().splitlines() if "lapsed before" in line]
        assert job.id in " ".join(lapsed)  # it said so already, when the lease lapsed
        assert warning == [
            f"WARNING flask_errands: lock.record {job.id}: this attempt ended succeeded, but "
            f"its lease had lapsed (was {db} locked for longer than the lease?) and worker "
            f"{rival} took the job over: it runs again (attempt 2), and "
            "this outcome is dropped"
        ]
        assert job.refresh().status == JobStatus.RUNNING
    finally:
        worker.end()


def test_delay_on_a_locked_store_raises_enqueue_error_and_stores_nothing(
    store: tuple[Path, Errands],
) -> None:
    db, errands = store
    task = errands.tasks["lock.record"]
    holder = _write_lock(db)
    try:
        with pytest.raises(EnqueueError, match="locked") as single:
            task.delay(0)
        with pytest.raises(EnqueueError, match="locked"):
            task.delay_many([(0,), (1,)])
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert "nothing was stored" in str(single.value)
    assert errands.backend.counts() == {}
    assert errands.backend.list_jobs() == []


#: The three-status partial indexes as schema version 2 made them, with IN lists.
VERSION_2_INDEXES = (
    "CREATE UNIQUE INDEX errands_jobs_unique ON errands_jobs (unique_key)"
    " WHERE unique_key IS NOT NULL AND status IN ('queued', 'scheduled', 'running')",
    "CREATE INDEX errands_jobs_finished ON errands_jobs (finished_at)"
    " WHERE status IN ('succeeded', 'failed', 'cancelled')",
)


def test_a_file_of_schema_version_2_keeps_its_jobs_unique_keys_and_pruning(
    tmp_path: Path,
) -> None:
    path = tmp_path / "v2.db"
    old = sqlite3.connect(path)
    old.execute(QUERIES["create_jobs"])
    old.execute(QUERIES["migrate_2_lost_leases"])
    for statement in VERSION_2_INDEXES:
        old.execute(statement)
    columns = "id, task, payload, queue, priority, status, attempts, max_attempts, retry_delay"
    for job_id, status, unique_key, finished_at in [
        ("waiting", "queued", "k", None),
        ("done", "succeeded", "k", 5.0),
    ]:
        old.execute(
            f"INSERT INTO errands_jobs ({columns}, unique_key, eta, enqueued_at, finished_at)"
            " VALUES (?, 'noop', '{}', 'default', 0, ?, 0, 1, 1.0, ?, 0, 0, ?)",
            (job_id, status, unique_key, finished_at),
        )
    old.execute("PRAGMA user_version = 2")
    old.commit()
    old.close()

    backend = backend_from_url(f"sqlite:///{path}", instance_path=str(tmp_path))
    try:
        [kept] = backend.enqueue(
            [JobRecord(id="again", task="noop", payload="{}", unique_key="k")]
        )
        assert kept.id == "waiting"  # the live job holds its key across the upgrade
        assert backend.get("again") is None
        assert backend.prune(finished_before=10.0) == 1
        assert backend.get("done") is None
        [claimed] = backend.reserve(None, 5, "w", 30, 1.0)
        assert (claimed.id, claimed.status) == ("waiting", JobStatus.RUNNING)
    finally:
        backend.close()
    reopened = sqlite3.connect(path)
    assert reopened.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    indexes = [
        sql
        for (sql,) in reopened.execute("SELECT sql FROM sqlite_master WHERE type = 'index'")
        if sql
    ]
    in_lists = ("IN ('queued', 'scheduled', 'running')", "IN ('succeeded', 'failed', 'cancelled')")
    assert not [sql for sql in indexes if any(in_list in sql for in_list in in_lists)]
    reopened.close()


def test_a_file_of_schema_version_8_keeps_numbering_its_limits_starts(tmp_path: Path) -> None:
    """Version 9 logs starts in the claim's statement, after those version 8 logged itself."""
    from flask_errands.limits import Limit, encode
    from tests.backends.test_limits import check_upgraded_limits

    path = tmp_path / "v8.db"
    limits = encode([Limit.of("task:noop", "5/m", 1)])
    backend = backend_from_url(f"sqlite:///{path}", instance_path=str(tmp_path))
    backend.expect_limits()
    try:
        jobs = [JobRecord(id=f"j{i}", task="noop", payload="{}", limits=limits) for i in range(3)]
        backend.enqueue(jobs)
        [running] = backend.reserve(None, 1, "w", 30, 1.0)
    finally:
        backend.close()
    # Back to version 8, whose claims logged their starts from Python.
    old = sqlite3.connect(path)
    old.execute("DROP TRIGGER errands_limit_starts_log")
    old.execute("INSERT INTO errands_limit_starts (key, n, at) VALUES ('task:noop', 1, 1.5)")
    old.execute("PRAGMA user_version = 8")
    old.commit()
    old.close()

    check_upgraded_limits(f"sqlite:///{path}", running, limits)
    reopened = sqlite3.connect(path)
    starts = reopened.execute("SELECT n, at FROM errands_limit_starts ORDER BY n").fetchall()
    assert reopened.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    reopened.close()
    assert starts == [(0, 1.0), (1, 1.5), (2, 4.0)]
