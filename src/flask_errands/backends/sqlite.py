"""``sqlite:///path``: the embedded default, durable, with no server to run.

One connection per process, in WAL mode, behind a lock: SQLite lets one writer
in at a time anyway, and a single connection per process means threads never
wait on each other through SQLite's busy handler. Every change takes the write
lock up front (``BEGIN IMMEDIATE``, or one statement in autocommit mode, which
does the same), so several processes on one host share the file safely.
Workers in other processes are woken through Unix sockets (``wakeup.py``)
after each commit that adds work, with a slow ``PRAGMA data_version`` poll as
a backstop.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from ..exceptions import BackendUnavailable, ConfigurationError, DuplicateJob, EnqueueError
from .base import (
    DEFAULT_MAX_LOST_LEASES,
    FIELD_NAMES,
    SCHEDULED,
    WORKER_LOST_ERROR,
    Backend,
    JobRecord,
    JobStatus,
    claimed_only,
)
from .queries import load_queries
from .wakeup import SocketWakeup

T = TypeVar("T")

QUERIES = load_queries("sqlite.sql")
SCHEMA = tuple(QUERIES[name] for name in QUERIES if name.startswith("create_"))
#: The schema's version, kept in ``PRAGMA user_version`` (0 in files made before it was).
SCHEMA_VERSION = 2
#: The statements that bring the tables from the version before to each version.
MIGRATIONS = {2: (QUERIES["migrate_2_lost_leases"],)}

#: How long one operation keeps retrying a locked database before it gives up.
LOCK_PATIENCE = 30.0
#: How often the watcher checks for commits it was not told about.
BACKSTOP_INTERVAL = 0.25


class SQLiteBackend(Backend):
    """Jobs in one SQLite file, shared by every process on the host that opens it."""

    def __init__(self, path: str, *, synchronous: str = "NORMAL") -> None:
        super().__init__()
        self.path = path
        self.url = f"sqlite:///{path}"
        self._synchronous = synchronous
        self._lock = threading.RLock()
        _hold_lock_across_fork(self)
        self._pid = -1
        self._connection: sqlite3.Connection | None = None
        self._closed = threading.Event()
        self._wakeup = SocketWakeup(path)
        try:
            directory = os.path.dirname(path)
            if directory:
                os.makedirs(directory, exist_ok=True)
            self._transaction(self._create_schema)
        except (OSError, sqlite3.Error) as exc:
            raise ConfigurationError(
                f"cannot open the SQLite job database at {path!r} ({exc}); "
                "set ERRANDS_URL to a writable location, e.g. sqlite:////var/lib/myapp/errands.db"
            ) from exc

    def _create_schema(self, db: sqlite3.Connection) -> None:
        """Create the tables, or bring those of an older flask-errands up to this version.

        Runs in one ``BEGIN IMMEDIATE`` transaction, so processes opening the
        file at once migrate it once. Tables made before versions were kept
        are version 1.
        """
        for statement in SCHEMA:
            db.execute(statement)
        stored = db.execute("PRAGMA user_version").fetchone()[0]
        if stored == SCHEMA_VERSION:
            return
        version = max(stored, 1)
        if version > SCHEMA_VERSION:
            raise ConfigurationError(
                f"the job database {self.path} is at schema version {version}, newer than "
                f"this flask-errands knows ({SCHEMA_VERSION}); upgrade flask-errands"
            )
        for target in range(version + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[target]:
                db.execute(statement)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION:d}")

    # -- connection and transactions -----------------------------------------

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=LOCK_PATIENCE
        )
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode = WAL")
        db.execute(f"PRAGMA synchronous = {self._synchronous}")
        return db

    def _db(self) -> sqlite3.Connection:
        if self._connection is None or self._pid != os.getpid():
            # A connection inherited through fork() must never be used by the child.
            self._connection = self._connect()
            self._pid = os.getpid()
        return self._connection

    @contextmanager
    def _locked(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._db()

    def _transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``work`` in ``BEGIN IMMEDIATE``; retry while another process holds the lock."""
        return self._retrying(work, explicit=True)

    def _statement(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``work``, which executes one write statement, as its own transaction.

        A lone ``INSERT``/``UPDATE``/``DELETE`` in autocommit mode takes the write
        lock before it reads anything (as ``BEGIN IMMEDIATE`` does), so it is as
        safe between processes; it saves the ``BEGIN`` and ``COMMIT`` calls, and
        with them two hand-offs of the GIL while this process's lock is held.
        ``work`` must consume every row a ``RETURNING`` clause yields: the
        statement commits when its last row has been read.
        """
        return self._retrying(work, explicit=False)

    def _retrying(self, work: Callable[[sqlite3.Connection], T], *, explicit: bool) -> T:
        deadline = time.monotonic() + LOCK_PATIENCE
        with self._lock:
            while True:
                db = self._db()
                try:
                    if not explicit:
                        try:
                            return work(db)
                        except BaseException:
                            if db.in_transaction:  # a RETURNING statement left half-read
                                db.execute("ROLLBACK")
                            raise
                    try:
                        db.execute("BEGIN IMMEDIATE")
                        result = work(db)
                        db.execute("COMMIT")
                        return result
                    except BaseException:
                        # Also reached when a job's timeout interrupts its thread between
                        # BEGIN and COMMIT: the shared connection must never stay inside.
                        if db.in_transaction:
                            db.execute("ROLLBACK")
                        raise
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) and "busy" not in str(exc):
                        raise BackendUnavailable(f"SQLite error on {self.path}: {exc}") from exc
                    if time.monotonic() > deadline:
                        raise BackendUnavailable(
                            f"the SQLite database {self.path} stayed locked for "
                            f"{LOCK_PATIENCE:.0f}s; another process holds a long write"
                        ) from exc
                    time.sleep(0.001)

    def _read(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> list[sqlite3.Row]:
        with self._locked() as db:
            return db.execute(sql, params).fetchall()

    # -- life of a job -------------------------------------------------------

    def enqueue(self, jobs: Sequence[JobRecord]) -> list[JobRecord]:
        try:
            if len(jobs) == 1 and jobs[0].unique_key is None:
                row = jobs[0].to_dict()  # the common .delay(): one INSERT is its own transaction
                self._statement(lambda db: db.execute(QUERIES["insert_job"], row))
                stored = list(jobs)
            else:
                stored = self._transaction(lambda db: _insert(db, jobs))
        except sqlite3.IntegrityError as exc:
            _raise_duplicate(exc, jobs)
            raise
        except BackendUnavailable as exc:
            raise EnqueueError(f"job not enqueued: {exc}") from exc.__cause__
        self._notify()
        return stored

    def reserve(
        self,
        queues: Sequence[str] | None,
        limit: int,
        worker_id: str,
        lease_seconds: float,
        now: float,
        *,
        max_lost_leases: int = DEFAULT_MAX_LOST_LEASES,
    ) -> list[JobRecord]:
        queue_filter, params = _queue_filter(queues)
        params.update(
            now=now,
            expires=now + lease_seconds,
            worker=worker_id,
            limit=limit,
            max_lost=max_lost_leases,
            lost_error=WORKER_LOST_ERROR,
        )
        claim = QUERIES["claim"].format(queue_filter=queue_filter)
        rows = self._statement(lambda db: db.execute(claim, params).fetchall())
        return sorted(
            claimed_only([_record(row) for row in rows]),
            key=lambda job: (-job.priority, job.eta, job.enqueued_at),
        )

    def heartbeat(self, leases: Mapping[str, str], lease_seconds: float, now: float) -> set[str]:
        if not leases:
            return set()

        def extend(db: sqlite3.Connection) -> set[str]:
            cancelled = set()
            for job_id, token in leases.items():
                params = {"id": job_id, "token": token, "expires": now + lease_seconds}
                row = db.execute(QUERIES["extend_lease"], params).fetchone()
                if row is not None and row["cancel_requested"]:
                    cancelled.add(job_id)
            return cancelled

        return self._transaction(extend)

    def set_progress(self, job_id: str, progress: float | None, message: str | None) -> None:
        params = {"id": job_id, "progress": progress, "message": message}
        self._statement(lambda db: db.execute(QUERIES["set_progress"], params))

    def finish(
        self,
        job_id: str,
        lease_token: str,
        status: str,
        now: float,
        *,
        result: str | None = None,
        error: str | None = None,
        traceback: str | None = None,
        eta: float | None = None,
    ) -> bool:
        params = {
            "id": job_id,
            "token": lease_token,
            "status": status,
            "now": now,
            "result": result,
            "error": error,
            "traceback": traceback,
            "eta": eta,
        }
        changed = self._statement(lambda db: db.execute(QUERIES["finish"], params).rowcount)
        if status == SCHEDULED:
            self._notify()
        return changed == 1

    def release(self, job_id: str, lease_token: str, now: float) -> bool:
        params = {"id": job_id, "token": lease_token}
        changed = self._statement(lambda db: db.execute(QUERIES["release"], params).rowcount)
        self._notify()
        return changed == 1

    def cancel(self, job_id: str, now: float) -> JobRecord | None:
        def cancel(db: sqlite3.Connection) -> sqlite3.Row | None:
            params = {"id": job_id, "now": now}
            if db.execute(QUERIES["cancel_waiting"], params).rowcount == 0:
                db.execute(QUERIES["cancel_running"], params)
            row: sqlite3.Row | None = db.execute(QUERIES["get"], (job_id,)).fetchone()
            return row

        return _optional_record(self._transaction(cancel))

    def requeue(self, job_id: str, now: float) -> JobRecord | None:
        def requeue(db: sqlite3.Connection) -> sqlite3.Row | None:
            # A live job holding the same unique key leaves this one finished.
            with contextlib.suppress(sqlite3.IntegrityError):
                db.execute(QUERIES["requeue"], {"id": job_id, "now": now})
            row: sqlite3.Row | None = db.execute(QUERIES["get"], (job_id,)).fetchone()
            return row

        record = _optional_record(self._transaction(requeue))
        self._notify()
        return record

    # -- looking at jobs -----------------------------------------------------

    def get(self, job_id: str) -> JobRecord | None:
        rows = self._read(QUERIES["get"], (job_id,))
        return _record(rows[0]) if rows else None

    def list_jobs(
        self,
        status: str | None = None,
        queue: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> list[JobRecord]:
        params = {"status": status, "queue": queue, "limit": limit, "offset": offset}
        return [_record(row) for row in self._read(QUERIES["list_jobs"], params)]

    def counts(self) -> dict[tuple[str, str], int]:
        return {(queue, status): n for queue, status, n in self._read(QUERIES["counts"])}

    def next_eta(self, queues: Sequence[str] | None) -> float | None:
        queue_filter, params = _queue_filter(queues)
        rows = self._read(QUERIES["next_eta"].format(queue_filter=queue_filter), params)
        return rows[0][0] if rows else None

    # -- housekeeping --------------------------------------------------------

    def fire_tick(self, schedule: str, fire_time: float, job: JobRecord, now: float) -> bool:
        def fire(db: sqlite3.Connection) -> bool:
            if db.execute(QUERIES["fire_tick"], (schedule, fire_time, now)).rowcount == 0:
                return False
            [stored] = _insert(db, [job])
            db.execute(QUERIES["set_tick_job"], (stored.id, schedule, fire_time))
            return True

        try:
            fired = self._transaction(fire)
        except sqlite3.IntegrityError as exc:
            _raise_duplicate(exc, [job])
            raise
        if fired:
            self._notify()
        return fired

    def last_ticks(self) -> dict[str, tuple[float, str | None]]:
        rows = self._read(QUERIES["last_ticks"])
        return {row["schedule"]: (row["fire_time"], row["job_id"]) for row in rows}

    def prune(self, finished_before: float) -> int:
        def prune(db: sqlite3.Connection) -> int:
            db.execute(QUERIES["prune_ticks"], (finished_before,))
            db.execute(QUERIES["prune_workers"], (finished_before,))
            return db.execute(QUERIES["prune_jobs"], (finished_before,)).rowcount

        return self._transaction(prune)

    def purge(
        self, status: str | None = None, queue: str | None = None, before: float | None = None
    ) -> int:
        params = {"status": status, "queue": queue, "before": before}
        return self._transaction(lambda db: db.execute(QUERIES["purge"], params).rowcount)

    def register_worker(
        self, worker_id: str, info: Mapping[str, Any], ttl: float, now: float
    ) -> None:
        params = (worker_id, json.dumps(dict(info)), now + ttl)
        self._transaction(lambda db: db.execute(QUERIES["register_worker"], params))

    def unregister_worker(self, worker_id: str) -> None:
        self._transaction(lambda db: db.execute(QUERIES["unregister_worker"], (worker_id,)))

    def list_workers(self, now: float) -> list[dict[str, Any]]:
        rows = self._read(QUERIES["list_workers"], (now,))
        return [{**json.loads(row["info"]), "id": row["id"]} for row in rows]

    def close(self) -> None:
        self._closed.set()
        watcher = self._watcher
        if watcher is not None and watcher is not threading.current_thread():
            watcher.join(timeout=2 * BACKSTOP_INTERVAL)
        self._wakeup.shutdown()
        with self._lock:
            if self._connection is not None and self._pid == os.getpid():
                self._connection.close()
            self._connection = None

    # -- wake-ups from other processes ---------------------------------------

    def _watch(self) -> None:
        """Wake this process's workers when another process may have added work.

        Writers knock on a Unix socket after each commit (see ``wakeup.py``);
        polling ``PRAGMA data_version`` now and then catches anything missed,
        such as a writer running as another user.
        """
        db = self._connect()
        listener = self._wakeup.listen()
        try:
            last = None
            while not self._closed.is_set() and self._watchers:
                knocked = self._wakeup.wait(listener, BACKSTOP_INTERVAL)
                version = db.execute("PRAGMA data_version").fetchone()[0]
                if knocked or version != last:
                    last = version
                    super()._notify()
        except (sqlite3.Error, OSError):
            pass  # the backend was closed under us; nothing left to watch
        finally:
            self._wakeup.close(listener)
            db.close()

    def _notify(self) -> None:
        super()._notify()
        self._wakeup.send()


def _hold_lock_across_fork(backend: SQLiteBackend) -> None:
    """Take the backend's lock around ``fork()``, and give the child a fresh one.

    A child forked while one of the parent's threads was inside SQLite would
    inherit that thread's locks (this one, and SQLite's own mutexes) held by a
    thread it does not have, and hang on its first query.
    """
    ref = weakref.ref(backend)

    def before() -> None:
        live = ref()
        if live is not None:
            live._lock.acquire()

    def after_in_parent() -> None:
        live = ref()
        if live is not None:
            live._lock.release()

    def after_in_child() -> None:
        live = ref()
        if live is not None:
            live._lock = threading.RLock()

    os.register_at_fork(
        before=before, after_in_parent=after_in_parent, after_in_child=after_in_child
    )


def _raise_duplicate(exc: sqlite3.IntegrityError, jobs: Sequence[JobRecord]) -> None:
    """Raise :class:`DuplicateJob` when ``exc`` says a job id was already taken."""
    if "errands_jobs.id" not in str(exc):
        return
    what = jobs[0].id if len(jobs) == 1 else f"one of these {len(jobs)} (or one given twice)"
    raise DuplicateJob(f"job id already stored: {what}") from exc


def _insert(db: sqlite3.Connection, jobs: Sequence[JobRecord]) -> list[JobRecord]:
    rows = [job.to_dict() for job in jobs]
    if all(row["unique_key"] is None for row in rows):
        db.executemany(QUERIES["insert_job"], rows)
        return list(jobs)
    stored = []
    for job, row in zip(jobs, rows, strict=True):
        if db.execute(QUERIES["insert_job"], row).rowcount == 1:
            stored.append(job)
        else:
            stored.append(
                _record(db.execute(QUERIES["live_unique"], (job.unique_key,)).fetchone())
            )
    return stored


#: For each column list a query returns, where each JobRecord field is in its rows.
_FIELD_POSITIONS: dict[tuple[str, ...], tuple[int, ...] | None] = {}


def _record(row: sqlite3.Row) -> JobRecord:
    """Build a record from a row of ``errands_jobs``.

    Positional, through a cached map from column names: a third of the cost of
    going through a dict, and it runs for every job reserved or looked up.
    """
    columns = tuple(row.keys())
    positions = _FIELD_POSITIONS.get(columns, ())
    if positions == ():
        found = {name: i for i, name in enumerate(columns)}
        positions = _FIELD_POSITIONS[columns] = (
            tuple(found[name] for name in FIELD_NAMES)
            if all(name in found for name in FIELD_NAMES)
            else None
        )
    if positions is None:  # not every field selected: let the defaults fill in
        record = JobRecord.from_mapping(dict(row))
    else:
        record = JobRecord(*[row[i] for i in positions])
        record.status = JobStatus(record.status)
    record.cancel_requested = bool(record.cancel_requested)
    return record


def _optional_record(row: sqlite3.Row | None) -> JobRecord | None:
    return None if row is None else _record(row)


def _queue_filter(queues: Sequence[str] | None) -> tuple[str, dict[str, Any]]:
    if queues is None:
        return "", {}
    params = {f"q{i}": queue for i, queue in enumerate(queues)}
    return f"AND queue IN ({', '.join(':' + name for name in params)})", params
