"""``postgresql://``: jobs in PostgreSQL, for many worker processes on many hosts.

Every change is one transaction, and reserve is a single statement that claims
due jobs with ``FOR UPDATE SKIP LOCKED``, so workers never wait on each other
and never claim a job twice. Connections come from a small pool opened on first
use (an app starts while the server is down) and opened again in a forked
child. Enqueues are announced with ``NOTIFY`` on a channel named after the
schema, heard by one listening connection per process.

Tables are created in the first schema of the connection's ``search_path``;
choose another schema with ``?options=-csearch_path%3Dmyschema``. Three query
parameters are read here and not passed to libpq: ``pool_max_size``
(connections per process, default 10), ``pool_timeout`` (seconds an
operation waits for a free connection, default 5) and ``timeout``.

``timeout`` (seconds, default 10) bounds every call to the store, waiting for
a connection included: a call still waiting for PostgreSQL then fails with
:class:`~flask_errands.exceptions.BackendUnavailable`, and its connection,
which may have gone silent (a firewall dropping packets, a dead NAT, a
failover), is dropped and replaced. The server cancels a statement a little
sooner (``statement_timeout``), libpq's TCP keepalives and ``tcp_user_timeout``
notice a dead peer, and the listening connection is pinged every few seconds.
An enqueue whose reply is lost (it may have been stored) asks again, within
another ``timeout``, whether its jobs were stored: it returns them if so and
stores them if not, so ``.delay()`` either returns a stored job or raises
:class:`~flask_errands.exceptions.EnqueueError` within twice ``timeout`` (and
two seconds to say why a connection could not be had). Needs PostgreSQL 13
or newer.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import logging
import math
import os
import re
import socket
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from functools import cache
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from psycopg.errors import IdleInTransactionSessionTimeout, UniqueViolation
from psycopg.rows import DictRow, dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool, PoolTimeout

from ..exceptions import BackendUnavailable, ConfigurationError, DuplicateJob, EnqueueError
from ..limits import Gate, Limit
from . import steps
from .base import (
    DEFAULT_MAX_LOST_LEASES,
    FAILED,
    FIGURE_MINUTES,
    PAGE_KEY,
    RUNNING,
    SCHEDULED,
    WORKER_LOST_ERROR,
    Backend,
    Cursor,
    JobRecord,
    ScheduleState,
    Timing,
    claimed_only,
    gather_timings,
    minute_of,
    page_bounds,
    page_of,
    worker_lost_error,
)
from .patience import STORE_CALL, patience
from .queries import load_queries
from .urls import hide_password

logger = logging.getLogger("flask_errands")

#: The name of this backend's connection pools, in psycopg_pool's log records.
POOL_NAME = "flask-errands"


class _OwnPoolReports(logging.Filter):
    """Drop psycopg_pool's line per failed reconnect of our pools: the worker says it once."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not (str(record.msg).startswith("error connecting in") and POOL_NAME in args)


logging.getLogger("psycopg.pool").addFilter(_OwnPoolReports())


class Connection(psycopg.Connection[DictRow]):
    """A pooled connection that remembers when a call last used it without error."""

    last_used = -math.inf


QUERIES = load_queries("postgres.sql")
# An attempt's figures, recorded the same way by the finish of a job and of a workflow step.
QUERIES.update(
    {
        name: QUERIES[name].format(attempt_figures=QUERIES["attempt_figures"])
        for name in ("finish", "finish_step")
    }
)
SCHEMA_VERSION = 9
#: The statements that bring a schema from the version before to each version.
MIGRATIONS = {
    1: tuple(QUERIES[name] for name in QUERIES if name.startswith("create_")),
    2: (QUERIES["migrate_2_lost_leases"],),
    3: tuple(QUERIES[name] for name in QUERIES if name.startswith("migrate_3_")),
    4: tuple(QUERIES[name] for name in QUERIES if name.startswith("migrate_4_")),
    # Finished totals from the per-minute counts, one page index (see postgres.sql). Names
    # without a number: the step can be renumbered as it is.
    5: tuple(QUERIES[name] for name in QUERIES if name.startswith("migrate_hot_")),
    # The rate and concurrency limits (see postgres.sql).
    6: tuple(QUERIES[name] for name in QUERIES if name.startswith("migrate_6_")),
    # Figures for metrics and the trace context (see postgres.sql); it can be renumbered.
    7: tuple(QUERIES[name] for name in QUERIES if name.startswith("migrate_timings_")),
    # Counts per limit key, for a limited claim with headroom (see postgres.sql); renumberable.
    8: tuple(QUERIES[name] for name in QUERIES if name.startswith("migrate_limit_counts")),
    # Waiting jobs without limits in claim order (see postgres.sql); renumberable.
    9: (QUERIES["migrate_free_waiting_index"],),
}

#: How long even a call that may not retry (see ``patience``) waits for the pool to lend a
#: connection: the pool opens one in the background, so waiting is its first try, not a retry.
FIRST_TRY = 1.0
#: Settings read from (and removed from) the URL's query, with their defaults.
POOL_OPTIONS = {"pool_max_size": 10.0, "pool_timeout": 5.0, "timeout": 10.0}
#: libpq settings used unless the URL gives its own; ``connect_timeout`` and
#: ``tcp_user_timeout`` follow ``timeout``. Keepalives notice a dead peer in about 11 s.
CONNECT_DEFAULTS = {
    "application_name": "flask-errands",
    "keepalives": "1",
    "keepalives_idle": "5",
    "keepalives_interval": "2",
    "keepalives_count": "3",
}
#: The server cancels a statement after this share of ``timeout``, before the client gives up.
STATEMENT_SHARE = 0.9
#: How often the listening connection, otherwise idle, checks that the server still answers.
LISTEN_PING = 5.0
#: The pause between two tries to learn whether an enqueue whose reply was lost was stored.
CONFIRM_PAUSE = 0.2
#: A pooled connection idle this long is checked (one round trip) before it is lent.
CHECK_AFTER_IDLE = 1.0
#: How long the pool retries a failed connection before the next operation starts afresh.
RECONNECT_TIMEOUT = 10.0
#: How often the listening thread looks up from the socket to see if it should stop.
LISTEN_POLL = 0.5
#: The longest pause between two attempts to reconnect the listening connection.
MAX_RECONNECT_DELAY = 5.0
#: How many times enqueue retries a unique key whose live job finished under it.
UNIQUE_RACE_RETRIES = 10


class PostgresBackend(Backend):
    """Jobs in PostgreSQL tables, shared by every process that connects to the database."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = _display(url)
        self._conninfo, options = _split_pool_options(url)
        self._pool_max_size = int(options["pool_max_size"])
        self._pool_timeout = options["pool_timeout"]
        self._timeout = options["timeout"]
        given = conninfo_to_dict(self._conninfo)
        defaults = {
            **CONNECT_DEFAULTS,
            "connect_timeout": str(math.ceil(self._timeout)),
            "tcp_user_timeout": str(math.ceil(self._timeout * 1000)),
        }
        self._connect_kwargs: dict[str, Any] = {
            k: v for k, v in defaults.items() if k not in given
        }
        server_options = str(given.get("options") or "")
        milliseconds = str(math.ceil(self._timeout * STATEMENT_SHARE * 1000))
        self._session_settings = [
            (name, milliseconds)
            for name in ("statement_timeout", "idle_in_transaction_session_timeout")
            if name not in server_options
        ]
        self._watchdog = _Watchdog()
        self._deadline = threading.local()  # of the call this thread makes, for the pool's check
        self._lock = threading.Lock()
        self._pid = -1
        self._pool: ConnectionPool[Connection] | None = None
        # Pools inherited through fork(): their sockets are the parent's, so they are
        # kept alive and never touched, lest closing them end the parent's sessions.
        self._inherited: list[ConnectionPool[Connection]] = []
        self._channel: str | None = None
        #: The jobs table qualified with the store's schema, once the tables are made.
        self._jobs_table = "errands_jobs"
        self._identity: dict[str, Any] | None = None
        self._closed = threading.Event()

    # -- connections -----------------------------------------------------------

    def _get_pool(self) -> ConnectionPool[Connection]:
        pool = self._pool
        if pool is not None and self._pid == os.getpid():
            return pool
        with self._lock:
            if self._pool is not None and self._pid != os.getpid():
                self._inherited.append(self._pool)
                self._pool = None
            if self._pool is None:
                self._pool = ConnectionPool(
                    self._conninfo,
                    connection_class=Connection,
                    kwargs={"autocommit": True, "row_factory": dict_row, **self._connect_kwargs},
                    min_size=1,
                    max_size=self._pool_max_size,
                    timeout=self._pool_timeout,
                    configure=self._configure,
                    check=self._check,
                    reconnect_timeout=RECONNECT_TIMEOUT,
                    name=POOL_NAME,
                    num_workers=2,
                    open=False,
                )
                self._pool.open(wait=False)
                self._pid = os.getpid()
            return self._pool

    def _configure(self, conn: Connection) -> None:
        """Have the server end, by itself, statements and transactions that outlast a call."""
        conn.last_used = time.monotonic()  # it has just answered
        if self._session_settings:
            settings = ", ".join("set_config(%s, %s, false)" for _ in self._session_settings)
            with self._watchdog.bound(conn, time.monotonic() + self._timeout):
                conn.execute(f"SELECT {settings}", list(itertools.chain(*self._session_settings)))

    def _check(self, conn: Connection) -> None:
        """Before lending a connection that sat idle, see that it works, by the call's deadline.

        One used a moment ago is lent as it is: a call it fails (the server
        restarted in between) fails as any call can, and is retried by its caller.
        """
        if time.monotonic() - conn.last_used < CHECK_AFTER_IDLE:
            return
        deadline = getattr(self._deadline, "at", None) or time.monotonic() + self._timeout
        with self._watchdog.bound(conn, deadline):
            ConnectionPool.check_connection(conn)

    @contextmanager
    def _connection(
        self, failure: type[BackendUnavailable] = BackendUnavailable, deadline: float = 0.0
    ) -> Iterator[Connection]:
        """Lend a pooled connection, creating the tables first if this backend has not yet.

        Everything, waiting for the connection included, ends by ``deadline``
        (default: ``timeout`` from now). A lost, refused or silent connection
        becomes ``failure`` with a one-line reason; the pool replaces broken
        connections by itself, so the next call may succeed.
        """
        if self._closed.is_set():
            raise failure(f"the PostgreSQL backend for {self.url} is closed")
        deadline = deadline or time.monotonic() + self._timeout
        self._deadline.at = deadline
        allowed = max(patience(self._pool_timeout), min(FIRST_TRY, self._pool_timeout))
        wait = max(0.0, min(allowed, deadline - time.monotonic()))
        try:
            with (
                STORE_CALL,
                self._get_pool().connection(timeout=wait) as conn,
                self._watchdog.bound(conn, deadline),
            ):
                if self._channel is None:
                    self._channel = self._create_schema(conn)
                yield conn
                conn.last_used = time.monotonic()
        except (psycopg.OperationalError, IdleInTransactionSessionTimeout) as exc:
            prefix = "job not enqueued, " if issubclass(failure, EnqueueError) else ""
            reason = self._reason(exc, deadline, wait)
            raise failure(f"{prefix}PostgreSQL at {self.url} is unavailable: {reason}") from exc
        finally:
            self._deadline.at = None

    def _reason(self, exc: psycopg.Error, deadline: float, wait: float) -> str:
        """Say in one line why an operation failed; a pool timeout is traced to its cause."""
        if not isinstance(exc, PoolTimeout) and time.monotonic() >= deadline:
            return (
                f"no reply within {self._timeout:g}s (timeout in ERRANDS_URL); "
                "the connection was dropped"
            )
        if isinstance(exc, PoolTimeout):
            try:
                psycopg.connect(
                    self._conninfo, **{**self._connect_kwargs, "connect_timeout": 2}
                ).close()
            except psycopg.Error as direct:
                return _one_line(str(direct))
            return (
                f"no pooled connection was free within {wait:g}s; "
                "raise pool_max_size in the URL or lower the load"
            )
        return _one_line(str(exc))

    def _create_schema(self, conn: Connection) -> str:
        """Create or upgrade the tables, one process at a time; return the notify channel."""
        with conn.transaction():
            conn.execute(QUERIES["lock_schema"])
            schema = _value(conn.execute(QUERIES["current_schema"]).fetchone())
            if schema is None:
                raise ConfigurationError(
                    f"the search_path of {self.url} names no existing schema; create it, "
                    "or set ?options=-csearch_path%3D<schema> in ERRANDS_URL"
                )
            version = 0
            if _value(conn.execute(QUERIES["schema_exists"]).fetchone()):
                version = _value(conn.execute(QUERIES["schema_version"]).fetchone())
            if version > SCHEMA_VERSION:
                raise ConfigurationError(
                    f"the errands tables in schema {schema!r} are at version {version}, newer "
                    f"than this flask-errands knows ({SCHEMA_VERSION}); upgrade flask-errands"
                )
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[target]:
                    conn.execute(statement)
                conn.execute(QUERIES["set_schema_version"], (target,))
        self._jobs_table = '"{}".errands_jobs'.format(schema.replace('"', '""'))
        return _channel_name(schema)

    # -- life of a job -------------------------------------------------------

    def enqueue(self, jobs: Sequence[JobRecord]) -> list[JobRecord]:
        sent = False
        try:
            with self._connection(EnqueueError) as conn:
                sent = True  # from here on, jobs may be stored whatever the reply says
                # One job, or a batch without unique keys, is one statement (or an insert and a
                # read): atomic without BEGIN.
                alone = len(jobs) == 1 or all(job.unique_key is None for job in jobs)
                with (
                    nullcontext() if alone else conn.transaction(),
                    conn.cursor() as cursor,
                ):
                    stored = self._insert(cursor, jobs)
        except EnqueueError as exc:
            if not sent:
                raise
            stored = self._store_after_lost_reply(jobs, exc)
        self._notify()
        return stored

    def _store_after_lost_reply(
        self, jobs: Sequence[JobRecord], lost: EnqueueError
    ) -> list[JobRecord]:
        """Finish an enqueue whose outcome is unknown: return the jobs it stored, else store them.

        Job ids are made before the write, so the stored jobs can be found. Asks
        again until ``timeout`` has passed; then says the jobs may have been stored.
        """
        deadline = time.monotonic() + self._timeout
        while True:
            try:
                with (
                    self._connection(EnqueueError, deadline=deadline) as conn,
                    conn.transaction(),
                ):
                    return self._insert_missing(conn, jobs)
            except DuplicateJob as exc:
                if not isinstance(exc.__cause__, UniqueViolation):
                    raise
                continue  # the lost statement committed meanwhile: look again
            except EnqueueError as exc:
                lost = exc
            if time.monotonic() + CONFIRM_PAUSE >= deadline:
                break
            time.sleep(CONFIRM_PAUSE)
        ids = ", ".join(job.id for job in jobs[:3]) + (" ..." if len(jobs) > 3 else "")
        reason = str(lost).removeprefix("job not enqueued, ")
        raise EnqueueError(
            f"job {ids} ({jobs[0].task}) may or may not have been enqueued: its reply was lost "
            f"and asking again failed: {reason}; look the id up before enqueueing it again"
        ) from lost.__cause__

    def _insert_missing(self, conn: Connection, jobs: Sequence[JobRecord]) -> list[JobRecord]:
        """Insert those of ``jobs`` not stored yet, in the caller's transaction; return all."""
        rows = conn.execute(QUERIES["get_many"], ([job.id for job in jobs],)).fetchall()
        found = {row["id"]: row for row in rows}
        for job in jobs:
            if job.id in found and not _same_job(found[job.id], job):
                raise DuplicateJob(f"job id already stored: {job.id}")
        missing = [job for job in jobs if job.id not in found]
        with conn.cursor() as cursor:
            inserted = iter(self._insert(cursor, missing) if missing else ())
        return [dataclasses.replace(job) if job.id in found else next(inserted) for job in jobs]

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
        params.update(now=now, expires=now + lease_seconds, worker=worker_id, limit=limit)
        params.update(max_lost=max_lost_leases, lost_error=WORKER_LOST_ERROR)
        with self._connection() as conn:
            if self.limited:
                rows = self._limited_claim(conn, queue_filter, params)
            else:
                query = _filtered("reserve", queue_filter, "AND limits IS NULL")
                rows = conn.execute(query, params).fetchall()
        rows.sort(key=lambda row: (-row["priority"], row["eta"], row["seq"]))
        records = []
        for record in map(_record, rows):
            held = record.status == RUNNING and (record.lease_expires_at or 0.0) <= now
            if not held or self._give_up_step(record, now):
                records.append(record)
        return claimed_only(records)

    def _limited_claim(
        self, conn: Connection, queue_filter: str, params: dict[str, Any]
    ) -> list[DictRow]:
        """Claim due jobs that their limits let start: the reserve statement's rows.

        First the jobs whose limits clearly have room (``with_headroom``, by the counts the
        trigger keeps): one statement, as a claim without limits. Only when that left one out,
        or found fewer due than asked for, does the rest go through a :class:`Gate`, exact to
        the lease, in a transaction under the limits lock.
        """
        first = _filtered("reserve", queue_filter, "", "with_headroom", "headroom_filter")
        rows = conn.execute(first, params).fetchall()
        self.limit_free_at = None
        if len(rows) < params["limit"]:
            rest = {**params, "limit": params["limit"] - len(rows)}
            chosen_filter = "AND seq = ANY(%(chosen)s)"
            query = _filtered(
                "reserve", queue_filter, chosen_filter, "with_headroom", "counts_locked"
            )
            with conn.transaction():
                chosen = self._choose(conn, _filtered("limit_candidates", queue_filter), rest)
                rows += conn.execute(query, {**rest, "chosen": chosen}).fetchall()
        return rows

    def _choose(self, conn: Connection, candidates: str, params: dict[str, Any]) -> list[int]:
        """The jobs a limited claim may start, by seq, under the limits lock (a :class:`Gate`).

        Runs in the claim's transaction: the starts are logged, and the lock held, until
        the claim commits, so the next limited claim counts this one's jobs as running.
        """
        conn.execute(QUERIES["limit_lock"])
        limit, now = params["limit"], params["now"]

        def starts(key: str, rate: int, window: int) -> tuple[int, dict[int, float]]:
            params = {"key": key, "rate": rate, "window": window}
            rows = conn.execute(QUERIES["limit_starts"], params).fetchall()
            found = {row["n"]: row["at"] for row in rows if row["n"] is not None}
            return rows[0]["done"], found

        gate = Gate(now, functools.partial(_running_of, conn, now), starts, limit)
        chosen: list[int] = []
        while len(chosen) < limit:
            extra = {"taken": chosen, "held_tasks": gate.held_names("task")}
            extra.update(held_queues=gate.held_names("queue"), limit=limit - len(chosen))
            rows = conn.execute(candidates, {**params, **extra}).fetchall()
            held = len(gate.held)
            for row in rows:
                if len(chosen) < limit and (row["give_up"] or gate.admit(row["limits"])):
                    chosen.append(row["seq"])
            if len(gate.held) == held:  # nothing newly held back: all there is was weighed
                break
        # The starts are logged by the claim's trigger (errands_limit_bookkeeping).
        self.limit_free_at = gate.free_at
        return chosen

    def limit_usage(self, limits: Sequence[Limit], now: float) -> dict[str, tuple[int, int]]:
        found = {}
        with self._connection() as conn:
            for limit in limits:
                running = _running_of(conn, now, limit.kind, limit.name)
                recent = 0
                if limit.per is not None:
                    row = conn.execute(QUERIES["recent_starts"], (limit.key, now - limit.per))
                    recent = _value(row.fetchone())
                found[limit.key] = (running, recent)
        return found

    def _give_up_step(self, record: JobRecord, now: float) -> bool:
        """Fail a workflow step ``reserve`` held for its lost leases, and cancel its downstream.

        In one transaction, so no process dies between the two and leaves those steps
        blocked for ever; False if another worker got there first, or the lease was renewed.
        """
        error = worker_lost_error(record.worker_id, record.attempts, record.lost_leases + 1)
        params = {"id": record.id, "token": record.lease_token, "now": now, "status": "failed"}
        params.update(result=None, error=error, traceback=None, eta=None)
        with self._connection() as conn, conn.transaction():
            run = self._runner(conn)
            if not run("lapsed_step", params) or not run("finish_step", params):
                return False
            steps.advance(run, record.id, record.task, "failed", record.flow, None, now)
        record.status, record.error, record.finished_at = FAILED, error, now
        return True

    def heartbeat(self, leases: Mapping[str, str], lease_seconds: float, now: float) -> set[str]:
        if not leases:
            return set()
        params = {
            "expires": now + lease_seconds,
            "ids": list(leases),
            "tokens": list(leases.values()),
        }
        with self._connection() as conn:
            rows = conn.execute(QUERIES["extend_leases"], params).fetchall()
        return {row["id"] for row in rows if row["cancel_requested"]}

    def set_progress(self, job_id: str, progress: float | None, message: str | None) -> None:
        params = {"id": job_id, "progress": progress, "message": message}
        with self._connection() as conn:
            conn.execute(QUERIES["set_progress"], params)

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
        with self._connection() as conn:
            params = {
                "id": job_id,
                "token": lease_token,
                "status": status,
                "now": now,
                "result": result,
                "error": error,
                "traceback": traceback,
                "eta": eta,
                "channel": self._channel,
            }
            applied = conn.execute(QUERIES["finish"], params).rowcount == 1
            due = False
            if not applied:  # a workflow step (or a lost lease): record it, move its workflow on
                with conn.transaction():
                    row = conn.execute(QUERIES["finish_step"], params).fetchone()
                    if row is not None:
                        applied, run = True, self._runner(conn)
                        task, flow = row["task"], row["flow"]
                        due = steps.advance(run, job_id, task, status, flow, result, now)
        if applied and (status == SCHEDULED or due):
            self._notify()
        return applied

    def _runner(self, conn: Connection) -> steps.Run:
        """Run this backend's named queries on ``conn``, for :mod:`steps`."""
        channel = self._channel

        def run(name: str, params: Mapping[str, Any]) -> list[DictRow]:
            return conn.execute(QUERIES[name], {**params, "channel": channel}).fetchall()

        return run

    def release(self, job_id: str, lease_token: str, now: float) -> bool:
        with self._connection() as conn:
            params = {"id": job_id, "token": lease_token, "channel": self._channel}
            applied = conn.execute(QUERIES["release"], params).rowcount == 1
        if applied:
            self._notify()
        return applied

    def cancel(self, job_id: str, now: float) -> JobRecord | None:
        with self._connection() as conn, conn.transaction():
            row = conn.execute(QUERIES["cancel"], {"id": job_id, "now": now}).fetchone()
            if row is not None and row["status"] == "cancelled":
                run = self._runner(conn)
                steps.advance(run, job_id, row["task"], "cancelled", row["flow"], None, now)
            if row is None:  # unknown, or already finished and left as it is
                row = conn.execute(QUERIES["get"], (job_id,)).fetchone()
        return None if row is None else _record(row)

    def requeue(self, job_id: str, now: float) -> JobRecord | None:
        with self._connection() as conn:
            params = {"id": job_id, "now": now, "channel": self._channel}
            try:
                with conn.transaction():
                    rows = conn.execute(QUERIES["requeue"], params).fetchall()
                    for requeued_row in rows:
                        steps.revive(self._runner(conn), requeued_row["flow"])
                requeued = bool(rows)
            except UniqueViolation:
                requeued = False  # a live job holds its unique key: this one stays finished
            row = conn.execute(QUERIES["get"], (job_id,)).fetchone()
        if requeued:
            self._notify()
        return None if row is None else _record(row)

    def step_inputs(self, job_id: str) -> dict[int, str]:
        with self._connection() as conn:
            rows = conn.execute(QUERIES["step_inputs"], (job_id,)).fetchall()
        return {row["position"]: row["result"] for row in rows}

    # -- looking at jobs -----------------------------------------------------

    def get(self, job_id: str) -> JobRecord | None:
        with self._connection() as conn:
            row = conn.execute(QUERIES["get"], (job_id,)).fetchone()
        return None if row is None else _record(row)

    def list_jobs(
        self,
        status: str | None = None,
        queue: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> list[JobRecord]:
        params = {"status": status, "queue": queue, "limit": limit, "offset": offset}
        with self._connection() as conn:
            rows = conn.execute(QUERIES["list_jobs"], params).fetchall()
        return [_record(row) for row in rows]

    def job_page(
        self,
        status: str | None = None,
        queue: str | None = None,
        task: str | None = None,
        *,
        limit: int = 50,
        before: int | None = None,
    ) -> tuple[list[JobRecord], int | None]:
        with self._connection() as conn:
            filters = {"status": status, "queue": queue, "task": task}
            params: dict[str, Any] = {**filters, **page_bounds(limit, before)}
            if not (status or queue or task):
                rows = conn.execute(QUERIES["job_page"], params).fetchall()
            else:
                query = _filtered_page(tuple(bool(filters[key]) for key in PAGE_KEY))
                rows = conn.execute(query, params).fetchall()
        return page_of(rows, limit, _record)

    def counts(self) -> dict[tuple[str, str], int]:
        with self._connection() as conn:
            rows = conn.execute(QUERIES["counts"]).fetchall()
        return {(row["queue"], row["status"]): row["n"] for row in rows}

    def next_eta(self, queues: Sequence[str] | None) -> float | None:
        queue_filter, params = _queue_filter(queues)
        params["free_at"] = self.limit_free_at or 0.0
        with self._connection() as conn:
            row = conn.execute(_filtered("next_eta", queue_filter), params).fetchone()
        if row is None:
            return None
        if row["limited"]:
            self.limited = True
        eta: float | None = row["eta"]
        return eta

    # -- queues and schedules, as people change them ---------------------------

    def pause_queue(self, queue: str, now: float) -> None:
        with self._connection() as conn:
            conn.execute(QUERIES["pause_queue"], (queue, now))

    def resume_queue(self, queue: str) -> None:
        with self._connection() as conn:
            conn.execute(QUERIES["resume_queue"], {"queue": queue, "channel": self._channel})
        self._notify()

    def paused_queues(self) -> set[str]:
        with self._connection() as conn:
            rows = conn.execute(QUERIES["paused_queues"]).fetchall()
        return {row["queue"] for row in rows}

    def set_schedule_paused(self, schedule: str, paused: bool, now: float) -> None:
        params = {"schedule": schedule, "paused": paused, "now": now}
        with self._connection() as conn:
            conn.execute(QUERIES["set_schedule_paused"], params)

    def set_schedule_timing(
        self, schedule: str, every: float | None, cron: str | None, now: float
    ) -> None:
        params = {"schedule": schedule, "every": every, "cron": cron, "now": now}
        with self._connection() as conn:
            conn.execute(QUERIES["set_schedule_timing"], params)

    def schedule_states(self) -> dict[str, ScheduleState]:
        with self._connection() as conn:
            rows = conn.execute(QUERIES["schedule_states"]).fetchall()
        return {
            row["schedule"]: ScheduleState(
                paused=row["paused"], every=row["every"], cron=row["cron"], since=row["since"]
            )
            for row in rows
        }

    # -- figures for charts and metrics ----------------------------------------

    def finished_counts(self, since_minute: int) -> list[tuple[int, str, str, str, int]]:
        with self._connection() as conn:
            rows = conn.execute(QUERIES["finished_counts"], (since_minute,)).fetchall()
        return [(r["minute"], r["queue"], r["task"], r["outcome"], r["n"]) for r in rows]

    def sample_depth(self, now: float) -> bool:
        minute = minute_of(now)
        with self._connection() as conn:
            if conn.execute(QUERIES["sample_depth"], {"minute": minute}).rowcount != 1:
                return False
            # Once a minute, by whoever sampled; one statement, exact under concurrent finishes.
            conn.execute(QUERIES["roll_up_figures"], (minute - FIGURE_MINUTES,))
            return True

    def enqueued_counts(self) -> dict[tuple[str, str], int]:
        with self._connection() as conn:
            rows = conn.execute(QUERIES["enqueued_counts"]).fetchall()
        return {(row["queue"], row["task"]): row["n"] for row in rows}

    def timings(self) -> dict[tuple[str, str, str], Timing]:
        with self._connection() as conn:
            rows = conn.execute(QUERIES["timings"]).fetchall()
        return gather_timings(
            (r["timing"], r["queue"], r["task"], r["bucket"], r["n"], r["total"]) for r in rows
        )

    def depth_samples(self, since_minute: int) -> dict[int, dict[tuple[str, str], int]]:
        with self._connection() as conn:
            rows = conn.execute(QUERIES["depth_samples"], (since_minute,)).fetchall()
        return {
            row["minute"]: {(queue, status): n for queue, status, n in row["sample"]}
            for row in rows
        }

    # -- housekeeping --------------------------------------------------------

    def fire_tick(self, schedule: str, fire_time: float, job: JobRecord, now: float) -> bool:
        with self._connection() as conn, conn.transaction():
            fired = conn.execute(QUERIES["fire_tick"], (schedule, fire_time, now)).rowcount == 1
            if fired:
                with conn.cursor() as cursor:
                    [stored] = self._insert(cursor, [job])
                conn.execute(QUERIES["set_tick_job"], (stored.id, schedule, fire_time))
        if fired:
            self._notify()
        return fired

    def last_ticks(self) -> dict[str, tuple[float, str | None]]:
        with self._connection() as conn:
            rows = conn.execute(QUERIES["last_ticks"]).fetchall()
        return {row["schedule"]: (row["fire_time"], row["job_id"]) for row in rows}

    def prune(self, finished_before: float) -> int:
        with self._connection() as conn, conn.transaction():
            conn.execute(QUERIES["prune_ticks"], (finished_before,))
            conn.execute(QUERIES["prune_workers"], (finished_before,))
            conn.execute(QUERIES["roll_up_figures"], (minute_of(finished_before),))
            conn.execute(QUERIES["roll_up_deleted"])
            conn.execute(QUERIES["prune_samples"], (minute_of(finished_before),))
            return int(_value(conn.execute(QUERIES["prune_jobs"], (finished_before,)).fetchone()))

    def purge(
        self, status: str | None = None, queue: str | None = None, before: float | None = None
    ) -> int:
        params = {"status": status, "queue": queue, "before": before}
        with self._connection() as conn:
            return int(_value(conn.execute(QUERIES["purge"], params).fetchone()))

    def delete(self, job_id: str) -> bool:
        with self._connection() as conn:
            return int(_value(conn.execute(QUERIES["delete_job"], (job_id,)).fetchone())) == 1

    def register_worker(
        self, worker_id: str, info: Mapping[str, Any], ttl: float, now: float
    ) -> None:
        with self._connection() as conn:
            conn.execute(QUERIES["register_worker"], (worker_id, Jsonb(dict(info)), now + ttl))

    def unregister_worker(self, worker_id: str) -> None:
        with self._connection() as conn:
            conn.execute(QUERIES["unregister_worker"], (worker_id,))

    def list_workers(self, now: float) -> list[dict[str, Any]]:
        with self._connection() as conn:
            rows = conn.execute(QUERIES["list_workers"], (now,)).fetchall()
        return [{**row["info"], "id": row["id"]} for row in rows]

    def close(self) -> None:
        self._closed.set()
        listener = self._watcher
        if listener is not None and listener is not threading.current_thread():
            listener.join(timeout=2 * LISTEN_POLL)
        with self._lock:
            pool, self._pool = self._pool, None
            if pool is not None and self._pid == os.getpid():
                pool.close()
        self._watchdog.close()

    # -- in the app's own transaction -------------------------------------------

    def shares_database(self, cursor: Cursor) -> bool:
        """Compare the server and database ``cursor`` reaches with this store's.

        The server says who it is (database, port, start time), so a host
        written ``localhost`` on one side and ``127.0.0.1`` on the other, or a
        socket, still match. A restarted server is asked again.
        """
        cursor.execute(QUERIES["server_identity"])
        theirs = _fetch_mapping(cursor)
        if theirs != self._identity:  # not asked yet, or the store's server restarted since
            with self._connection() as conn:
                self._identity = conn.execute(QUERIES["server_identity"]).fetchone()
        return theirs == self._identity

    def enqueue_in(self, cursor: Cursor, jobs: Sequence[JobRecord]) -> list[JobRecord]:
        if self._channel is None:
            with self._connection(EnqueueError):
                pass  # the tables exist and their schema is known from here on
        try:
            return self._insert(cursor, jobs, self._jobs_table)
        except psycopg.OperationalError as exc:
            raise EnqueueError(
                f"job not enqueued, the app's PostgreSQL connection failed: {_one_line(str(exc))}"
            ) from exc

    # -- storing new jobs ------------------------------------------------------

    def _insert(
        self, cursor: Cursor, jobs: Sequence[JobRecord], table: str = "errands_jobs"
    ) -> list[JobRecord]:
        """Insert ``jobs`` (several: in the caller's transaction); a live unique job stands in.

        ``cursor`` is a pooled connection's, or the app's (any row type) with
        ``table`` qualified by the store's schema.
        """
        insert, live, insert_many = _job_queries(table, isinstance(cursor, psycopg.Cursor))
        try:
            if len(jobs) > 1 and all(job.unique_key is None for job in jobs):
                cursor.execute(insert_many, self._columns(jobs))
                return [copy.copy(job) for job in jobs]
            rows = [
                {**job.to_dict(), "status": str(job.status), "channel": self._channel}
                for job in jobs
            ]
            if len(rows) == 1 and jobs[0].unique_key is None:
                cursor.execute(insert, rows[0])
                return [copy.copy(jobs[0])]
            return [
                self._insert_unique(cursor, job, row, insert, live)
                for job, row in zip(jobs, rows, strict=True)
            ]
        except UniqueViolation as exc:
            if exc.diag.constraint_name != "errands_jobs_id_key":
                raise
            raise DuplicateJob(f"job id already stored: {exc.diag.message_detail}") from exc

    def _columns(self, jobs: Sequence[JobRecord]) -> dict[str, Any]:
        """The batch insert's parameters: one array per column, the jobs in order."""
        columns: dict[str, Any] = {name: [] for name in _BATCH_COLUMNS}
        for job in jobs:
            values = job.__dict__
            for name in _BATCH_COLUMNS:
                columns[name].append(values[name])
        columns["status"] = [str(status) for status in columns["status"]]
        for name in ("retry_delay", "timeout"):  # an int among floats would set the array's type
            columns[name] = [None if value is None else float(value) for value in columns[name]]
        columns["channel"] = self._channel
        return columns

    def _insert_unique(
        self, cursor: Cursor, job: JobRecord, row: dict[str, Any], insert: str, live: str
    ) -> JobRecord:
        for _ in range(UNIQUE_RACE_RETRIES):
            cursor.execute(insert, row)
            if cursor.fetchone() is not None:
                return dataclasses.replace(job)
            cursor.execute(live, (job.unique_key,))
            holder = _fetch_mapping(cursor)
            if holder is not None:
                return _record(holder)
            # The job holding the key finished between the two statements: try again.
        raise BackendUnavailable(
            f"unique key {job.unique_key!r} kept changing hands; job {job.id} was not stored"
        )

    # -- wake-ups from other processes ---------------------------------------

    def _watch(self) -> None:
        """LISTEN on a connection of its own until closed; reconnect with back-off if it drops.

        The connection is pinged every ``LISTEN_PING`` seconds, so one that went
        silent is noticed within that and ``timeout``, and replaced.
        """
        delay = 0.0
        while not self._closed.is_set():
            try:
                with psycopg.connect(
                    self._conninfo, autocommit=True, row_factory=dict_row, **self._connect_kwargs
                ) as conn:
                    with self._watchdog.bound(conn, time.monotonic() + self._timeout):
                        channel = _channel_name(
                            _value(conn.execute(QUERIES["current_schema"]).fetchone())
                        )
                        conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
                    if delay:
                        logger.info("errands: listening to PostgreSQL at %s again", self.url)
                    delay = 0.0
                    self._notify()  # jobs may have been enqueued while nobody listened
                    next_ping = time.monotonic() + LISTEN_PING
                    while not self._closed.is_set():
                        for _ in conn.notifies(timeout=LISTEN_POLL):
                            self._notify()
                        if time.monotonic() >= next_ping:
                            with self._watchdog.bound(conn, time.monotonic() + self._timeout):
                                conn.execute("SELECT 1")
                            next_ping = time.monotonic() + LISTEN_PING
            except psycopg.Error as exc:
                if not delay:
                    logger.warning(
                        "errands: no PostgreSQL listen connection to %s (%s); reconnecting",
                        self.url,
                        _one_line(str(exc)),
                    )
                delay = min(max(delay * 2, 0.1), MAX_RECONNECT_DELAY)
                self._closed.wait(delay)


class _Watchdog:
    """Cuts the connection of a call still waiting at its deadline, so no call waits for good.

    psycopg has no client-side timeout, and libpq waits on a silent socket for
    ever: a peer that drops packets never says so, and where the kernel still
    acknowledges (a proxy, a NAT) keepalives do not tell either. One thread per
    process shuts down the socket of each connection used past its deadline;
    libpq then fails the call with ``OperationalError``, and the pool discards
    the connection.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._armed: dict[object, tuple[float, psycopg.Connection[Any]]] = {}
        self._wakes_at = math.inf
        self._pid = -1
        self._closed = False

    @contextmanager
    def bound(self, conn: psycopg.Connection[Any], deadline: float) -> Iterator[None]:
        """Cut ``conn`` if the block is still running at ``deadline`` (``time.monotonic()``)."""
        key = object()
        with self._cond:
            if self._pid != os.getpid():  # new, or forked: the thread is not ours yet
                self._pid, self._armed, self._wakes_at = os.getpid(), {}, math.inf
                name = "errands-postgres-watchdog"
                threading.Thread(target=self._run, name=name, daemon=True).start()
            self._armed[key] = (deadline, conn)
            if deadline < self._wakes_at:
                self._wakes_at = deadline
                self._cond.notify()
        try:
            yield
        finally:
            with self._cond:
                self._armed.pop(key, None)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _run(self) -> None:
        pid = os.getpid()
        with self._cond:
            while not self._closed and self._pid == pid:
                now = time.monotonic()
                for key, (deadline, conn) in list(self._armed.items()):
                    if deadline <= now:
                        del self._armed[key]
                        _cut(conn)
                self._wakes_at = min((d for d, _ in self._armed.values()), default=math.inf)
                self._cond.wait(None if self._wakes_at == math.inf else self._wakes_at - now)


def _cut(conn: psycopg.Connection[Any]) -> None:
    """Shut down the socket under ``conn``, which its user still holds, so its wait ends."""
    try:
        fd = conn.pgconn.socket
    except psycopg.Error:  # already closed
        return
    try:
        with socket.socket(fileno=os.dup(fd)) as sock:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        return
    logger.debug("errands: dropped a PostgreSQL connection that did not answer in time")


def _same_job(row: Mapping[str, Any], job: JobRecord) -> bool:
    """Whether a stored row is ``job`` itself (stored by a call whose reply was lost)."""
    return (row["task"], row["payload"], row["enqueued_at"]) == (
        job.task,
        job.payload,
        job.enqueued_at,
    )


def _record(row: Mapping[str, Any]) -> JobRecord:
    return JobRecord.from_mapping(row)


#: The columns :meth:`PostgresBackend._columns` sends as arrays for ``insert_jobs``.
_BATCH_COLUMNS = (
    *("id", "task", "payload", "queue", "priority", "status", "attempts", "max_attempts"),
    *("retry_delay", "timeout", "eta", "enqueued_at", "flow", "blocked_by", "limits", "trace"),
)


@cache
def _job_queries(table: str, psycopg3: bool = True) -> tuple[str, str, str]:
    """The insert, live-unique and batch insert queries on ``table``, bare or schema-qualified.

    For a psycopg 3 cursor the batch's arrays are sent in binary (``%b``): in text,
    psycopg quotes every element with a regular expression, which for JSON
    payloads cost more than the rest of the batch's Python. psycopg2 knows only ``%s``.
    """
    insert, live, many = (
        QUERIES[name].format(jobs=table) for name in ("insert_job", "live_unique", "insert_jobs")
    )
    if psycopg3:
        many = re.sub(r"%\((\w+)\)s::", r"%(\1)b::", many)
    return insert, live, many


@cache
def _filtered_page(given: tuple[bool, ...]) -> str:
    """The statement of a page filtered on those of ``PAGE_KEY`` that ``given`` says.

    The filters that lead the page index bound its skip scan; the others are
    checked on each key it finds.
    """
    leading = PAGE_KEY[: len(list(itertools.takewhile(bool, given)))]

    def matching(alias: str) -> str:
        return " AND ".join(f"{alias}.{key} = %({key})s" for key in leading) or "true"

    rest = zip(PAGE_KEY[len(leading) :], given[len(leading) :], strict=True)
    others = " AND ".join(f"{key} = %({key})s" for key, on in rest if on) or "true"
    return QUERIES["filtered_job_page"].format(
        fixed=matching("j"), still=matching("later"), others=others
    )


def _fetch_mapping(cursor: Cursor) -> Mapping[str, Any] | None:
    """The next row as a mapping, whatever rows the cursor's connection makes (tuples, dicts)."""
    row = cursor.fetchone()
    if row is None or isinstance(row, Mapping):
        return row
    return dict(zip((column[0] for column in cursor.description), row, strict=True))


def _value(row: DictRow | None) -> Any:
    """The single value of a one-column row."""
    return None if row is None else next(iter(row.values()))


@functools.lru_cache(maxsize=16)
def _filtered(
    name: str,
    queue_filter: str,
    limit_filter: str = "",
    headroom: str | None = None,
    headroom_filter: str | None = None,
) -> str:
    """Query ``name`` with its filters filled in, made once: a worker runs it all the time.

    ``headroom`` and ``headroom_filter`` name the queries a limited reserve puts in.
    """
    return QUERIES[name].format(
        queue_filter=queue_filter,
        limit_filter=limit_filter,
        skip="",
        headroom=QUERIES[headroom] if headroom else "",
        headroom_filter=QUERIES[headroom_filter] if headroom_filter else "",
    )


def _running_of(conn: Connection, now: float, kind: str, name: str) -> int:
    """Jobs of a task (or queue) running under a live lease."""
    query = QUERIES["limit_running_task" if kind == "task" else "limit_running_queue"]
    count: int = _value(conn.execute(query, {"now": now, "name": name}).fetchone())
    return count


def _queue_filter(queues: Sequence[str] | None) -> tuple[str, dict[str, Any]]:
    if queues is None:
        return "", {}
    return "AND queue = ANY(%(queues)s)", {"queues": list(queues)}


def _channel_name(schema: str | None) -> str:
    """The NOTIFY channel of a schema; channel names are identifiers of at most 63 bytes."""
    name = f"errands_{schema or ''}"
    return name.encode()[:63].decode(errors="ignore")


def _split_pool_options(url: str) -> tuple[str, dict[str, float]]:
    """Take the pool's own settings out of ``url``; return the libpq URL and the settings."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    options = dict(POOL_OPTIONS)
    for key, value in query:
        if key in POOL_OPTIONS:
            try:
                options[key] = float(value)
            except ValueError:
                options[key] = 0.0
            bad = not math.isfinite(options[key]) or options[key] <= 0
            if bad or (key == "pool_max_size" and not options[key].is_integer()):
                raise ConfigurationError(
                    f"{key} in ERRANDS_URL must be a positive number, not {value!r}"
                )
    if all(key not in POOL_OPTIONS for key, _ in query):
        return url, options
    rest = urlencode([(k, v) for k, v in query if k not in POOL_OPTIONS], quote_via=quote)
    return urlunsplit(parts._replace(query=rest)), options


def _display(url: str) -> str:
    """``url`` fit for messages: no password, in the authority or in the query."""
    return re.sub(r"([?&]password=)[^&]*", r"\1***", hide_password(url))


def _one_line(text: str) -> str:
    return " ".join(text.split())
