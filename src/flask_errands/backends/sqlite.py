"""``sqlite:///path``: the embedded default, durable, with no server to run.

One connection per process, in WAL mode, behind a lock: SQLite lets one writer
in at a time anyway, and a single connection per process means threads never
wait on each other through SQLite's busy handler. Every change takes the write
lock up front (``BEGIN IMMEDIATE``, or one statement in autocommit mode, which
does the same), so several processes on one host share the file safely.
Workers in other processes are woken through Unix sockets (``wakeup.py``)
after each commit that adds work, with a slow ``PRAGMA data_version`` poll as
a backstop.

Another process may hold the write lock for long (a long transaction of the
app, a migration, the ``sqlite3`` shell). Each operation waits for it only as
long as its caller can afford: ``.delay()`` ``ENQUEUE_PATIENCE`` seconds, then
:class:`~flask_errands.exceptions.EnqueueError`; a worker's reserve and
heartbeat a third of the lease, so it warns and retries before the lease
lapses. A lease that lapsed while its worker's process is still alive on this
host is most likely stuck behind such a lock, so it is not taken over for a
few more leases; past that, the first worker's outcome is dropped with a
WARNING that says the job runs again.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import operator
import os
import socket
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, TypeVar

from ..exceptions import BackendUnavailable, ConfigurationError, DuplicateJob, EnqueueError
from ..limits import Gate, Limit
from . import steps
from .base import (
    DEFAULT_MAX_LOST_LEASES,
    FIELD_NAMES,
    FIGURE_MINUTES,
    FINISHED,
    PAGE_KEY,
    SCHEDULED,
    WORKER_LOST_ERROR,
    Backend,
    JobRecord,
    JobStatus,
    ScheduleState,
    Timing,
    claimed_only,
    gather_timings,
    minute_of,
    page_bounds,
    page_of,
)
from .patience import STORE_CALL, given_up
from .queries import load_queries
from .wakeup import SocketWakeup

T = TypeVar("T")

QUERIES = load_queries("sqlite.sql")
SCHEMA = tuple(QUERIES[name] for name in QUERIES if name.startswith("create_"))
#: The schema's version, kept in ``PRAGMA user_version`` (0 in files made before it was).
SCHEMA_VERSION = 9
#: The statements that bring the tables from the version before to each version.
MIGRATIONS = {
    2: (QUERIES["migrate_2_lost_leases"],),
    3: tuple(QUERIES[name] for name in QUERIES if name.startswith("migrate_3_")),
    4: tuple(QUERIES[name] for name in QUERIES if name.startswith("migrate_4_")),
    # The partial indexes over three statuses, with OR instead of IN (see sqlite.sql); the
    # query names carry no version number, so this step can be renumbered as it is.
    5: (
        QUERIES["migrate_or_drop_unique_index"],
        QUERIES["create_unique_index"],
        QUERIES["migrate_or_drop_finished_index"],
        QUERIES["create_finished_index"],
    ),
    # Finished totals from the per-minute counts, one page index (see sqlite.sql); the count
    # trigger made again as it is now spelled. Names without a number: it can be renumbered.
    6: (
        *(QUERIES[name] for name in QUERIES if name.startswith("migrate_hot_")),
        QUERIES["migrate_3_count_trigger"],
    ),
    # The rate and concurrency limits (see sqlite.sql).
    7: tuple(QUERIES[name] for name in QUERIES if name.startswith("migrate_7_")),
    # Figures for metrics and the trace context (see sqlite.sql); it can be renumbered.
    8: tuple(QUERIES[name] for name in QUERIES if name.startswith("migrate_timings_")),
    # Starts logged by the claim, for a limited claim in one statement (see sqlite.sql).
    9: (QUERIES["migrate_limit_starts_trigger"],),
}

logger = logging.getLogger("flask_errands")

#: How long an operation keeps retrying a locked database, unless its caller needs less.
LOCK_PATIENCE = 30.0
#: How long ``.delay()`` waits for a locked database before raising ``EnqueueError``.
ENQUEUE_PATIENCE = 5.0
#: A worker's reserve and heartbeat wait at most this share of the lease for the lock.
WORKER_PATIENCE_SHARE = 1 / 3
#: How long one call into SQLite waits on the lock before the deadline is checked again.
BUSY_SLICE = 0.1
#: For this many leases after it lapsed, a lease held by a live process on this host stays put.
LIVE_HOLDER_LEASES = 4.0
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

    def _connect(self, busy_timeout: float = BUSY_SLICE) -> sqlite3.Connection:
        """Open a connection whose calls wait ``busy_timeout`` for a lock, then raise."""
        db = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=busy_timeout
        )
        db.row_factory = sqlite3.Row
        db.create_function("errands_live_holder", 4, _live_holder)
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA foreign_keys = ON")  # a step's inputs are deleted with it
        db.execute(f"PRAGMA synchronous = {self._synchronous}")
        return db

    def _db(self) -> sqlite3.Connection:
        if self._connection is None or self._pid != os.getpid():
            # A connection inherited through fork() must never be used by the child.
            self._connection = self._connect()
            self._pid = os.getpid()
        return self._connection

    def _transaction(
        self,
        work: Callable[[sqlite3.Connection], T],
        *,
        patience: float = LOCK_PATIENCE,
        failure: type[BackendUnavailable] = BackendUnavailable,
    ) -> T:
        """Run ``work`` in ``BEGIN IMMEDIATE``; retry while another process holds the lock."""
        return self._retrying(work, explicit=True, patience=patience, failure=failure)

    def _statement(
        self,
        work: Callable[[sqlite3.Connection], T],
        *,
        patience: float = LOCK_PATIENCE,
        failure: type[BackendUnavailable] = BackendUnavailable,
    ) -> T:
        """Run ``work``, which executes one write statement, as its own transaction.

        A lone ``INSERT``/``UPDATE``/``DELETE`` in autocommit mode takes the write
        lock before it reads anything (as ``BEGIN IMMEDIATE`` does), so it is as
        safe between processes; it saves the ``BEGIN`` and ``COMMIT`` calls, and
        with them two hand-offs of the GIL while this process's lock is held.
        ``work`` must consume every row a ``RETURNING`` clause yields: the
        statement commits when its last row has been read.
        """
        return self._retrying(work, explicit=False, patience=patience, failure=failure)

    def _retrying(
        self,
        work: Callable[[sqlite3.Connection], T],
        *,
        explicit: bool,
        patience: float,
        failure: type[BackendUnavailable],
    ) -> T:
        """Run ``work`` until it gets through; after ``patience`` seconds, raise ``failure``.

        SQLite waits ``BUSY_SLICE`` at a time for the lock; between slices this
        process's lock is let go, so a thread with less patience (a web request's
        ``.delay()``) never waits behind a worker thread's longer wait. The whole
        call is a store call (``STORE_CALL``): a job's timeout never lands in it.
        """
        deadline = time.monotonic() + patience
        lock = self._lock
        with STORE_CALL:
            while True:
                # Uncontended, the lock is taken without a timeout to work out.
                if not lock.acquire(False) and not lock.acquire(
                    True, max(0.0, deadline - time.monotonic())
                ):
                    raise self._stayed_locked(failure, patience)
                try:
                    return self._attempt(work, explicit)
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) and "busy" not in str(exc):
                        prefix = "job not enqueued, " if issubclass(failure, EnqueueError) else ""
                        raise failure(f"{prefix}SQLite error on {self.path}: {exc}") from exc
                    if time.monotonic() >= deadline or given_up():
                        raise self._stayed_locked(failure, patience) from exc
                finally:
                    lock.release()
                time.sleep(0.001)

    def _attempt(self, work: Callable[[sqlite3.Connection], T], explicit: bool) -> T:
        db = self._db()
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

    def _stayed_locked(
        self, failure: type[BackendUnavailable], patience: float
    ) -> BackendUnavailable:
        message = (
            f"the SQLite database {self.path} stayed locked for {patience:.3g}s: another "
            "process holds a long write transaction"
        )
        if issubclass(failure, EnqueueError):
            message = f"job not enqueued, {message}; nothing was stored"
        return failure(message)

    def _read(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> list[sqlite3.Row]:
        def read(db: sqlite3.Connection) -> list[sqlite3.Row]:
            return db.execute(sql, params).fetchall()

        return self._retrying(
            read, explicit=False, patience=LOCK_PATIENCE, failure=BackendUnavailable
        )

    # -- life of a job -------------------------------------------------------

    def enqueue(self, jobs: Sequence[JobRecord]) -> list[JobRecord]:
        try:
            if len(jobs) == 1 and jobs[0].unique_key is None:
                row = _row(jobs[0])  # the common .delay(): one INSERT is its own transaction
                self._statement(
                    lambda db: db.execute(QUERIES["insert_job"], row),
                    patience=ENQUEUE_PATIENCE,
                    failure=EnqueueError,
                )
                stored = list(jobs)
            else:
                stored = self._transaction(
                    lambda db: _insert(db, jobs), patience=ENQUEUE_PATIENCE, failure=EnqueueError
                )
        except sqlite3.IntegrityError as exc:
            _raise_duplicate(exc, jobs)
            raise
        except EnqueueError:
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
        key = None if queues is None else tuple(queues)
        limited = self.limited
        claim, queue_params = _claim_statement(key, limited)
        params = {
            "now": now,
            "expires": now + lease_seconds,
            "worker": worker_id,
            "limit": limit,
            "max_lost": max_lost_leases,
            "lost_error": WORKER_LOST_ERROR,
            "live_until": now - LIVE_HOLDER_LEASES * lease_seconds,
            **queue_params,
        }
        work = partial(_limited_claim if limited else _claim, claim=claim, params=params, now=now)
        if limited:
            work = partial(work, backend=self, queues=key, first=_headroom_claim(key))
        records = self._transaction(work, patience=_worker_patience(lease_seconds))
        claimed = claimed_only(records)
        if len(claimed) > 1:
            claimed.sort(key=lambda job: (-job.priority, job.eta, job.enqueued_at))
        return claimed

    def limit_usage(self, limits: Sequence[Limit], now: float) -> dict[str, tuple[int, int]]:
        def usage(db: sqlite3.Connection) -> dict[str, tuple[int, int]]:
            found = {}
            for limit in limits:
                running = _running_of(db, now, limit.kind, limit.name)
                recent = 0
                if limit.per is not None:
                    since = now - limit.per
                    recent = db.execute(QUERIES["recent_starts"], (limit.key, since)).fetchone()[0]
                found[limit.key] = (running, recent)
            return found

        return self._retrying(
            usage, explicit=False, patience=LOCK_PATIENCE, failure=BackendUnavailable
        )

    def heartbeat(self, leases: Mapping[str, str], lease_seconds: float, now: float) -> set[str]:
        if not leases:
            return set()

        called = time.monotonic()

        def extend(db: sqlite3.Connection) -> set[str]:
            expires = now + lease_seconds
            waited = time.monotonic() - called
            if waited >= BUSY_SLICE:  # waited for the lock: the lease runs from now on
                expires += waited
            cancelled = set()
            for job_id, token in leases.items():
                params = {"id": job_id, "token": token, "expires": expires}
                row = db.execute(QUERIES["extend_lease"], params).fetchone()
                if row is not None and row["cancel_requested"]:
                    cancelled.add(job_id)
            return cancelled

        return self._transaction(extend, patience=_worker_patience(lease_seconds))

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
            "status": _PLAIN.get(status, status),
            "now": now,
            "result": result,
            "error": error,
            "traceback": traceback,
            "eta": eta,
        }
        changed = self._statement(lambda db: db.execute(QUERIES["finish"], params).rowcount)
        due = False
        if changed != 1:  # a workflow step (or a lost lease): record it and move its workflow on

            def finish_step(db: sqlite3.Connection) -> tuple[int, bool]:
                rows = db.execute(QUERIES["finish_step"], params).fetchall()
                if not rows:
                    return 0, False
                task, flow = rows[0]["task"], rows[0]["flow"]
                return 1, steps.advance(_runner(db), job_id, task, status, flow, result, now)

            changed, due = self._transaction(finish_step)
        if status == SCHEDULED or due:
            self._notify()
        if changed != 1:
            self._warn_taken_over(job_id, status)
        return changed == 1

    def _warn_taken_over(self, job_id: str, status: str) -> None:
        """Say so when an attempt's outcome is dropped because another worker holds its job now."""
        rows = self._read(QUERIES["get"], (job_id,))
        if not rows or rows[0]["status"] != "running":
            return
        row = rows[0]
        logger.warning(
            "%s %s: this attempt ended %s, but its lease had lapsed (was %s locked for "
            "longer than the lease?) and worker %s took the job over: it runs again "
            "(attempt %d), and this outcome is dropped",
            row["task"],
            job_id,
            status,
            self.path,
            row["worker_id"],
            row["attempts"],
            extra={"job_id": job_id, "task": row["task"]},
        )

    def release(self, job_id: str, lease_token: str, now: float) -> bool:
        params = {"id": job_id, "token": lease_token}
        changed = self._statement(lambda db: db.execute(QUERIES["release"], params).rowcount)
        self._notify()
        return changed == 1

    def cancel(self, job_id: str, now: float) -> JobRecord | None:
        def cancel(db: sqlite3.Connection) -> sqlite3.Row | None:
            params = {"id": job_id, "now": now}
            cancelled = db.execute(QUERIES["cancel_waiting"], params).fetchall()
            if cancelled:
                task, flow = cancelled[0]["task"], cancelled[0]["flow"]
                _adjust(db, cancelled[0]["queue"], "cancelled", 1)
                steps.advance(_runner(db), job_id, task, "cancelled", flow, None, now)
            else:
                db.execute(QUERIES["cancel_running"], params)
            row: sqlite3.Row | None = db.execute(QUERIES["get"], (job_id,)).fetchone()
            return row

        return _optional_record(self._transaction(cancel))

    def requeue(self, job_id: str, now: float) -> JobRecord | None:
        def requeue(db: sqlite3.Connection) -> sqlite3.Row | None:
            # A live job holding the same unique key leaves this one finished.
            with contextlib.suppress(sqlite3.IntegrityError):
                params = {"id": job_id, "now": now}
                was: sqlite3.Row | None = db.execute(QUERIES["get"], (job_id,)).fetchone()
                for requeued in db.execute(QUERIES["requeue"], params).fetchall():
                    if was is not None:
                        _adjust(db, was["queue"], was["status"], -1)
                    steps.revive(_runner(db), requeued["flow"])
            row: sqlite3.Row | None = db.execute(QUERIES["get"], (job_id,)).fetchone()
            return row

        record = _optional_record(self._transaction(requeue))
        self._notify()
        return record

    def step_inputs(self, job_id: str) -> dict[int, str]:
        return {row[0]: row[1] for row in self._read(QUERIES["step_inputs"], (job_id,))}

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

    def job_page(
        self,
        status: str | None = None,
        queue: str | None = None,
        task: str | None = None,
        *,
        limit: int = 50,
        before: int | None = None,
    ) -> tuple[list[JobRecord], int | None]:
        if not (status or queue or task):
            params = page_bounds(limit, before)
            return page_of(self._read(QUERIES["job_page"], params), limit, _record)

        def page(db: sqlite3.Connection) -> list[sqlite3.Row]:
            def run(sql: str, params: Mapping[str, Any]) -> list[Any]:
                return [row[0] for row in db.execute(sql, params)]

            found = _page_positions(run, limit, before, status=status, queue=queue, task=task)
            return db.execute(QUERIES["jobs_at"], (json.dumps(found),)).fetchall()

        rows = self._retrying(
            page, explicit=False, patience=LOCK_PATIENCE, failure=BackendUnavailable
        )
        return page_of(rows, limit, _record)

    def counts(self) -> dict[tuple[str, str], int]:
        return {(queue, status): n for queue, status, n in self._read(QUERIES["counts"])}

    def next_eta(self, queues: Sequence[str] | None) -> float | None:
        queue_filter, params = _queue_filter(queues)
        params["free_at"] = self.limit_free_at or 0.0
        rows = self._read(QUERIES["next_eta"].format(queue_filter=queue_filter), params)
        if not rows:
            return None
        if rows[0][1]:
            self.limited = True
        eta: float | None = rows[0][0]
        return eta

    # -- queues and schedules, as people change them ---------------------------

    def pause_queue(self, queue: str, now: float) -> None:
        self._statement(lambda db: db.execute(QUERIES["pause_queue"], (queue, now)))

    def resume_queue(self, queue: str) -> None:
        self._statement(lambda db: db.execute(QUERIES["resume_queue"], (queue,)))
        self._notify()

    def paused_queues(self) -> set[str]:
        return {row[0] for row in self._read(QUERIES["paused_queues"])}

    def set_schedule_paused(self, schedule: str, paused: bool, now: float) -> None:
        params = {"schedule": schedule, "paused": paused, "now": now}
        self._statement(lambda db: db.execute(QUERIES["set_schedule_paused"], params))

    def set_schedule_timing(
        self, schedule: str, every: float | None, cron: str | None, now: float
    ) -> None:
        params = {"schedule": schedule, "every": every, "cron": cron, "now": now}
        self._statement(lambda db: db.execute(QUERIES["set_schedule_timing"], params))

    def schedule_states(self) -> dict[str, ScheduleState]:
        return {
            row["schedule"]: ScheduleState(
                paused=bool(row["paused"]),
                every=row["every"],
                cron=row["cron"],
                since=row["since"],
            )
            for row in self._read(QUERIES["schedule_states"])
        }

    # -- figures for charts and metrics ----------------------------------------

    def finished_counts(self, since_minute: int) -> list[tuple[int, str, str, str, int]]:
        rows = self._read(QUERIES["finished_counts"], (since_minute,))
        return [(row[0], row[1], row[2], row[3], row[4]) for row in rows]

    def enqueued_counts(self) -> dict[tuple[str, str], int]:
        return {(row[0], row[1]): row[2] for row in self._read(QUERIES["enqueued_counts"])}

    def timings(self) -> dict[tuple[str, str, str], Timing]:
        return gather_timings(tuple(row) for row in self._read(QUERIES["timings"]))

    def sample_depth(self, now: float) -> bool:
        minute = minute_of(now)

        def sample(db: sqlite3.Connection) -> bool:
            if db.execute(QUERIES["sample_depth"], {"minute": minute}).rowcount != 1:
                return False
            _fold_figures(db, minute - FIGURE_MINUTES)  # once a minute, by whoever sampled
            return True

        return self._transaction(sample)

    def depth_samples(self, since_minute: int) -> dict[int, dict[tuple[str, str], int]]:
        return {
            row["minute"]: {(queue, status): n for queue, status, n in json.loads(row["sample"])}
            for row in self._read(QUERIES["depth_samples"], (since_minute,))
        }

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
            _fold_figures(db, minute_of(finished_before))
            db.execute(QUERIES["prune_samples"], (minute_of(finished_before),))
            db.execute(QUERIES["adjust_totals_for_prune"], (finished_before,))
            db.execute(QUERIES["count_deleted_for_prune"], (finished_before,))
            return db.execute(QUERIES["prune_jobs"], (finished_before,)).rowcount

        return self._transaction(prune)

    def purge(
        self, status: str | None = None, queue: str | None = None, before: float | None = None
    ) -> int:
        params = {"status": status, "queue": queue, "before": before}

        def purge(db: sqlite3.Connection) -> int:
            db.execute(QUERIES["adjust_totals_for_purge"], params)
            db.execute(QUERIES["count_deleted_for_purge"], params)
            return db.execute(QUERIES["purge"], params).rowcount

        return self._transaction(purge)

    def delete(self, job_id: str) -> bool:
        def delete(db: sqlite3.Connection) -> bool:
            db.execute(QUERIES["adjust_totals_for_delete"], (job_id,))
            db.execute(QUERIES["count_deleted_for_delete"], (job_id,))
            return bool(db.execute(QUERIES["delete_job"], (job_id,)).rowcount == 1)

        return self._transaction(delete)

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
        db = self._connect(busy_timeout=LOCK_PATIENCE)
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


#: The steps' queries that make a job finished (+1) or not any more (-1), by hand, not by
#: an attempt's end: the per-minute counts do not see them (see ``_adjust``).
_STEP_ADJUSTMENTS = {"cancel_blocked": 1, "revive_cancelled": -1}


def _runner(db: sqlite3.Connection) -> steps.Run:
    """Run this backend's named queries on ``db``, for :mod:`steps`."""

    def run(name: str, params: Mapping[str, Any]) -> list[Any]:
        rows: list[sqlite3.Row] = db.execute(QUERIES[name], params).fetchall()
        if name in _STEP_ADJUSTMENTS:
            for row in rows:
                _adjust(db, row["queue"], "cancelled", _STEP_ADJUSTMENTS[name])
        return rows

    return run


#: Runs one query of :func:`_page_positions` and returns the first column of its rows.
_PageRun = Callable[[str, Mapping[str, Any]], list[Any]]


def _page_positions(
    run: _PageRun, limit: int, before: int | None, **filters: str | None
) -> list[int]:
    """The positions (``seq``) of a filtered keyset page, newest first, one more than ``limit``.

    The page index (``PAGE_KEY``, then ``seq``) orders jobs by ``seq`` only
    within a status, queue and task, so each of these a filter leaves open is
    walked value by value (a seek each, however many jobs share a value), and
    the newest jobs of each are merged: a few dozen seeks in process, as fast
    deep as on the first page.
    """
    prefixes: list[dict[str, str]] = [{}]
    for column in PAGE_KEY:
        value = filters.get(column)
        if value:
            prefixes = [{**prefix, column: value} for prefix in prefixes]
            continue
        walked = []
        for prefix in prefixes:
            where = "".join(f"{key} = :{key} AND " for key in prefix)
            first, then = (
                f"SELECT {column} FROM errands_jobs WHERE {where}{column} {op} :after "
                f"ORDER BY {column} LIMIT 1"
                for op in (">=", ">")
            )
            found = run(first, {**prefix, "after": ""})
            while found:
                walked.append({**prefix, column: found[0]})
                found = run(then, {**prefix, "after": found[0]})
        prefixes = walked
    newest = (
        "SELECT seq FROM errands_jobs WHERE "
        + "".join(f"{key} = :{key} AND " for key in PAGE_KEY)
        + "seq < :before ORDER BY seq DESC LIMIT :limit"
    )
    bounds = page_bounds(limit, before)
    positions = [seq for prefix in prefixes for seq in run(newest, {**prefix, **bounds})]
    positions.sort(reverse=True)
    return positions[: limit + 1]


def _fold_figures(db: sqlite3.Connection, before_minute: int) -> None:
    """Fold the per-minute counts of the minutes before ``before_minute`` into minute 0."""
    db.execute(QUERIES["roll_up_figures"], (before_minute,))
    db.execute(QUERIES["prune_figures"], (before_minute,))


def _adjust(db: sqlite3.Connection, queue: str, status: str, n: int) -> None:
    """Count ``n`` more finished jobs of ``queue`` in ``status`` than the per-minute counts say.

    Finished jobs are counted from the per-minute counts of ended attempts,
    which cost the hot path nothing more; each other way into or out of a
    finished state (a waiting job cancelled, a re-run, prune, purge) says so here.
    """
    if status in FINISHED:
        db.execute(QUERIES["adjust_total"], {"queue": queue, "status": status, "n": n})


def _claim(
    db: sqlite3.Connection, *, claim: str, params: Mapping[str, Any], now: float
) -> list[JobRecord]:
    """Claim due jobs; a workflow step failed for its lost leases cancels its downstream steps.

    In one transaction, so no process dies between the two and leaves those steps
    blocked for ever.
    """
    records = [_record(row) for row in db.execute(claim, params).fetchall()]
    for record in records:
        if record.status == "failed" and record.flow is not None:  # lost too many leases
            steps.advance(_runner(db), record.id, record.task, "failed", record.flow, None, now)
    return records


def _raise_duplicate(exc: sqlite3.IntegrityError, jobs: Sequence[JobRecord]) -> None:
    """Raise :class:`DuplicateJob` when ``exc`` says a job id was already taken."""
    if "errands_jobs.id" not in str(exc):
        return
    what = jobs[0].id if len(jobs) == 1 else f"one of these {len(jobs)} (or one given twice)"
    raise DuplicateJob(f"job id already stored: {what}") from exc


def _worker_patience(lease_seconds: float) -> float:
    """How long a worker's reserve or heartbeat waits for the lock: well within its lease."""
    return min(LOCK_PATIENCE, lease_seconds * WORKER_PATIENCE_SHARE)


def _live_holder(
    worker_id: str | None, claimed_at: float | None, expired_at: float, live_until: float
) -> bool:
    """Whether a lapsed lease belongs to a worker process still alive on this host.

    Such a worker is most likely waiting behind another process's write lock
    to renew the lease or record the outcome, so its job is not taken over
    until ``live_until``. A worker id is ``host:pid:random`` (``new_worker_id``).
    A process stopped or hung for good only delays its job, within that bound.
    """
    if worker_id is None or claimed_at is None or expired_at <= live_until:
        return False
    host, _, rest = worker_id.partition(":")
    pid, _, _ = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) <= 0:
        return False
    return _alive_since(int(pid), claimed_at)


def _alive_since(pid: int, moment: float) -> bool:
    """Whether process ``pid`` is alive and was already running at ``moment`` (Unix time).

    A process that started later only reuses the pid of one that died, as a
    restarted container's does; a zombie is dead. Without ``/proc`` (macOS),
    only whether the pid is taken can be known.
    """
    try:
        os.kill(pid, 0)
    except PermissionError:
        pass  # alive, run by another user
    except OSError:
        return False
    if not os.path.exists("/proc/self/stat"):
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
            fields = stat.read().rpartition(")")[2].split()
        with open("/proc/uptime", encoding="ascii") as uptime:
            since_boot = float(uptime.read().split()[0])
        state, ticks = fields[0], int(fields[19])
    except FileNotFoundError:
        return False  # ended since the kill() above
    except (OSError, ValueError, IndexError):
        return True
    started = time.time() - since_boot + ticks / os.sysconf("SC_CLK_TCK")
    return state not in ("Z", "X") and started <= moment + 1.0  # /proc/uptime drifts a little


#: Each status as the plain string it stands for. sqlite3 binds an exact ``str`` at once, but
#: looks for an adapter (and fails, at a cost) for a subclass such as ``JobStatus``.
_PLAIN: dict[str, str] = {status: status.value for status in JobStatus}


#: The fields ``insert_job`` stores, but the status, which comes last, as plain text.
_INSERT_FIELDS = operator.attrgetter(
    "id",
    "task",
    "payload",
    "queue",
    "priority",
    "attempts",
    "max_attempts",
    "retry_delay",
    "timeout",
    "unique_key",
    "eta",
    "enqueued_at",
    "flow",
    "blocked_by",
    "limits",
    "trace",
)


def _row(job: JobRecord) -> tuple[Any, ...]:
    """The parameters of ``insert_job`` that store ``job``."""
    return (*_INSERT_FIELDS(job), _PLAIN.get(job.status, job.status))


def _insert(db: sqlite3.Connection, jobs: Sequence[JobRecord]) -> list[JobRecord]:
    rows = [_row(job) for job in jobs]
    if all(job.unique_key is None for job in jobs):
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
    record.cancel_requested = bool(record.cancel_requested)
    return record


def _optional_record(row: sqlite3.Row | None) -> JobRecord | None:
    return None if row is None else _record(row)


#: What a limited claim sets, and a plain one does not, to fire the trigger logging its starts.
_TOUCH_LIMITS = ", limits = errands_jobs.limits"


@functools.lru_cache(maxsize=64)
def _claim_statement(
    queues: tuple[str, ...] | None, limited: bool = False
) -> tuple[str, dict[str, Any]]:
    """The claim statement for these queues, and their parameters.

    Cached: filling in the statement's text costs more than running it, and the
    very same string each time is found at once in sqlite3's statement cache.
    Unless ``limited``, it leaves jobs with limits alone; else it claims the jobs
    whose ``seq`` are in the JSON array ``:chosen`` (:func:`_limited_claim`).
    """
    queue_filter, params = _queue_filter(queues)
    limit_filter = (
        "AND seq IN (SELECT value FROM json_each(:chosen))" if limited else "AND limits IS NULL"
    )
    due = QUERIES["due_jobs"].format(queue_filter=queue_filter, filter=limit_filter)
    touch = _TOUCH_LIMITS if limited else ""
    return QUERIES["claim"].format(due=due, touch_limits=touch), params


def _limited_claim(
    db: sqlite3.Connection,
    *,
    claim: str,
    first: str,
    params: dict[str, Any],
    now: float,
    backend: SQLiteBackend,
    queues: tuple[str, ...] | None,
) -> list[JobRecord]:
    """Claim due jobs that their limits let start, in the claim's transaction.

    First the jobs whose limits have room for as many starts as asked for (``first``): one
    statement, as a claim without limits. Only when that left one out, or found fewer due
    than asked for, does the rest go through a :class:`Gate`, exact to the lease.
    """
    records = _claim(db, claim=first, params=params, now=now)
    backend.limit_free_at = None
    if len(records) < params["limit"]:
        rest = {**params, "limit": params["limit"] - len(records)}
        more, backend.limit_free_at = _gated_claim(
            db, claim=claim, params=rest, now=now, queues=queues
        )
        records += more
    return records


def _gated_claim(
    db: sqlite3.Connection,
    *,
    claim: str,
    params: dict[str, Any],
    now: float,
    queues: tuple[str, ...] | None,
) -> tuple[list[JobRecord], float | None]:
    """Claim due jobs their limits let start, each weighed by a Gate; and when one held may."""
    limit = params["limit"]

    def starts(key: str, rate: int, window: int) -> tuple[int, dict[int, float]]:
        params = {"key": key, "rate": rate, "window": window}
        rows = db.execute(QUERIES["limit_starts"], params).fetchall()
        return rows[0][0], {n: at for _, n, at in rows if n is not None}

    gate = Gate(now, partial(_running_of, db, now), starts, limit)
    chosen: list[int] = []
    queue_filter, _ = _queue_filter(queues)
    while len(chosen) < limit:
        skip = "AND seq NOT IN (SELECT value FROM json_each(:taken))"
        held_tasks, held_queues = gate.held_names("task"), gate.held_names("queue")
        if held_tasks or held_queues:
            skip += (
                " AND (limits IS NULL OR (task NOT IN (SELECT value FROM json_each(:tasks))"
                " AND queue NOT IN (SELECT value FROM json_each(:queues))))"
            )
        query = QUERIES["due_jobs"].format(queue_filter=queue_filter, filter=skip)
        taken = json.dumps(chosen)
        extra = {
            "taken": taken,
            "tasks": json.dumps(held_tasks),
            "queues": json.dumps(held_queues),
        }
        rows = db.execute(query, {**params, **extra, "limit": limit - len(chosen)}).fetchall()
        held = len(gate.held)
        for seq, limits, _, give_up in rows:
            if len(chosen) < limit and (give_up or gate.admit(limits)):
                chosen.append(seq)
        if len(gate.held) == held:  # nothing newly held back: all there is was weighed
            break
    # The starts are logged by the claim's trigger (errands_limit_starts_log).
    if not chosen:
        return [], gate.free_at
    chosen_params = {**params, "chosen": json.dumps(chosen)}
    return _claim(db, claim=claim, params=chosen_params, now=now), gate.free_at


@functools.lru_cache(maxsize=64)
def _headroom_claim(queues: tuple[str, ...] | None) -> str:
    """The claim of due jobs whose limits clearly have room (``with_headroom``), cached."""
    queue_filter, _ = _queue_filter(queues)
    due = QUERIES["due_jobs"].format(queue_filter=queue_filter, filter="")
    headroom = QUERIES["with_headroom"].format(due=due)
    return QUERIES["claim"].format(due=headroom, touch_limits=_TOUCH_LIMITS)


def _running_of(db: sqlite3.Connection, now: float, kind: str, name: str) -> int:
    """Jobs of a task (or queue) running under a live lease."""
    query = QUERIES["limit_running_task" if kind == "task" else "limit_running_queue"]
    count: int = db.execute(query, {"now": now, "name": name}).fetchone()[0]
    return count


def _queue_filter(queues: Sequence[str] | None) -> tuple[str, dict[str, Any]]:
    if queues is None:
        return "", {}
    params = {f"q{i}": queue for i, queue in enumerate(queues)}
    return f"AND queue IN ({', '.join(':' + name for name in params)})", params
