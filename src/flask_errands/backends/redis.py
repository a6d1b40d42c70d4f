"""``redis://host:port/db``: the production queue, shared by worker processes on many hosts.

Every operation is one Lua script from ``redis.lua``, run with EVALSHA (and loaded
again when a restarted server has forgotten it), so each is atomic and costs one
round trip. Records are hashes under one key prefix (``?prefix=`` in the URL, or
``ERRANDS_REDIS_PREFIX``; default ``errands:``). Workers hear of new work on a
pub/sub channel the scripts publish to, and wait for delayed jobs until their eta.

A lost connection is retried with back-off, for up to ``WORKER_PATIENCE`` seconds
in the worker's operations and ``CALLER_PATIENCE`` seconds in the web process's,
then surfaces as :class:`~flask_errands.exceptions.BackendUnavailable` (or
:class:`~flask_errands.exceptions.EnqueueError`). Each try waits at most
``socket_timeout`` (default 10 s; ``?socket_timeout=`` in the URL) for a reply,
so a silent connection fails and is replaced. An enqueue whose reply was lost
may have been stored: it is sent once more, and the script returns what the
first run stored, so ``.delay()`` returns the stored jobs or raises
:class:`~flask_errands.exceptions.EnqueueError` within about twice
``socket_timeout``. Nothing read from Redis is ever unpickled: records are
strings, numbers and JSON text.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import math
import os
import random
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
from redis.backoff import NoBackoff
from redis.connection import URL_QUERY_ARGUMENT_PARSERS
from redis.retry import Retry

try:
    from hiredis import pack_command
except ImportError:  # pragma: no cover - each connection packs in Python then
    pack_command = None  # type: ignore[assignment]

from ..exceptions import BackendUnavailable, DuplicateJob, EnqueueError
from ..limits import Limit
from .base import (
    DEFAULT_MAX_LOST_LEASES,
    FAILED,
    FIGURE_MINUTES,
    RUNNING,
    SCHEDULED,
    STATUSES,
    TIMING_BOUNDS,
    UPSTREAM_FAILED,
    UPSTREAM_FAILED_PREFIX,
    WORKER_LOST_ERROR,
    Backend,
    JobRecord,
    JobStatus,
    ScheduleState,
    Timing,
    claimed_only,
    gather_timings,
    minute_of,
    random_id,
)
from .patience import STORE_CALL, given_up
from .patience import patience as limited_patience
from .queries import load_queries
from .urls import hide_password

T = TypeVar("T")

DEFAULT_PREFIX = "errands:"
#: How long the web process's calls (enqueue, look-ups) retry a lost connection.
CALLER_PATIENCE = 1.0
#: How long the worker's calls retry a lost connection before raising.
WORKER_PATIENCE = 10.0
#: The longest pause between two reconnection attempts.
MAX_BACKOFF = 2.0
#: A finished record expires this long after its result TTL; prune deletes it first.
EXPIRY_SLACK = 86400.0
DEFAULT_RESULT_TTL = 7 * 86400.0
#: How many jobs one prune or purge script handles before giving Redis back to others.
BATCH = 500
#: How many jobs one page of a task's jobs looks at, at most, to find those of the task.
PAGE_BUDGET = 2000
#: How long the watcher waits on the wake channel before checking whether it was closed.
WATCH_TIMEOUT = 1.0
#: How many claims' start and eta one backend keeps for their finish (past that it forgets
#: them all, and the finish script works the timings out itself).
CLAIMS_KEPT = 10_000
#: Connection settings the URL's query can override.
CLIENT_DEFAULTS: dict[str, Any] = {
    "socket_connect_timeout": 5.0,
    "socket_timeout": 10.0,
    "socket_keepalive": True,
}

#: Query parameters a redis:// URL may carry: ours, and the connection settings of redis-py.
URL_OPTIONS = frozenset(
    {
        "prefix",
        "timeout",
        *URL_QUERY_ARGUMENT_PARSERS,
        *("client_name", "username", "password"),
        *("ssl_ca_certs", "ssl_ca_path", "ssl_cert_reqs", "ssl_certfile", "ssl_keyfile"),
        *("ssl_ciphers", "ssl_password"),
    }
)

_TRANSIENT = ("BUSY", "LOADING", "TRYAGAIN", "MASTERDOWN", "MISCONF")
_INTS = {"priority", "attempts", "max_attempts", "lost_leases", "blocked_by"}
_FLOATS = {
    "retry_delay",
    "eta",
    "enqueued_at",
    "timeout",
    "started_at",
    "finished_at",
    "progress",
    "lease_expires_at",
}


_TEXT: dict[type, Callable[[Any], str]] = {
    str: str,
    float: repr,
    int: repr,
    bool: lambda value: "1" if value else "0",
}
#: Fields that may be left out of a stored record: the scripts read them with these defaults.
_DEFAULTS: dict[str, Any] = {
    "queue": "default",
    "priority": 0,
    "attempts": 0,
    "max_attempts": 1,
    "retry_delay": 1.0,
    "cancel_requested": False,
    "lost_leases": 0,
    "blocked_by": 0,
}
_NO_DEFAULT = object()
_OPTIONAL = tuple(
    name
    for name in JobRecord.__dataclass_fields__
    if name not in ("id", "task", "payload", "status", "eta", "enqueued_at")
)
_to_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


#: Each stored status's bytes, to the one plain string the record keeps.
_STATUS_TEXT = {status.value.encode(): status.value for status in JobStatus}


def _status(value: bytes) -> str:
    try:
        return _STATUS_TEXT[value]
    except KeyError:
        raise ValueError(f"unknown status {value!r}") from None


def _convert(name: str) -> Callable[[bytes], Any]:
    if name in _INTS:
        return int
    if name in _FLOATS:
        return float
    if name == "cancel_requested":
        return lambda value: value == b"1"
    if name == "status":
        return _status
    return bytes.decode


_DECODERS = {name.encode(): (name, _convert(name)) for name in JobRecord.__dataclass_fields__}


class _Unreadable(ValueError):
    """A stored record that is not what this backend writes."""


class _ReplyLost(redis.ConnectionError):
    """A script was sent but no reply came back: it may have run."""


class _MaybeDone(BackendUnavailable):
    """A call failed after a try whose reply was lost: it may have taken effect."""


class _Script:
    """One named script: its text (helpers, then its own block) and the SHA1 it runs by."""

    def __init__(self, name: str, text: str) -> None:
        self.name = name
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()


def _with_helpers(common: str, body: str) -> str:
    """``body`` after the top-level definitions of ``common`` that it uses, directly or not.

    Every run of a script executes its whole text, so each carries only what it
    needs: defining every helper on each call would cost a few microseconds.
    """
    chunks: list[list[str]] = []
    for line in common.splitlines():
        top = line.startswith(("local ", "--"))
        attached = bool(chunks) and chunks[-1][-1].startswith("--")
        if not chunks or (top and not attached):
            chunks.append([line])
        else:
            chunks[-1].append(line)
    texts = ["\n".join(chunk) for chunk in chunks]
    names = [
        set(re.findall(r"^local (?:function )?(\w+(?:, \w+)*)", text, re.M)) for text in texts
    ]
    defined = [{name for group in found for name in group.split(", ")} for found in names]
    used = set(re.findall(r"\w+", body))
    wanted: set[int] = set()
    while True:
        more = {i for i, names_ in enumerate(defined) if i not in wanted and names_ & used}
        if not more:
            break
        wanted |= more
        for i in more:
            used |= set(re.findall(r"\w+", texts[i]))
    return "\n".join([*(texts[i] for i in sorted(wanted)), body])


_LUA = load_queries("redis.lua")
SCRIPTS = {
    name: _Script(name, _with_helpers(_LUA["common"], body))
    for name, body in _LUA.items()
    if name != "common"
}


class RedisBackend(Backend):
    """Jobs in one Redis server, shared by every process that uses the same URL and prefix."""

    def __init__(
        self, url: str, *, prefix: str | None = None, result_ttl: float | None = None
    ) -> None:
        super().__init__()
        self._held_at = 0.0  # when the claim that last held a job back by a limit ran
        # Lease token -> (started_at, eta) of the jobs this backend claimed, until they finish.
        self._claims: dict[str, tuple[float, float]] = {}
        self.url = hide_password(url)
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        url_prefix = next((value for key, value in query if key == "prefix"), None)
        self.prefix = url_prefix or prefix or DEFAULT_PREFIX
        self.result_ttl = DEFAULT_RESULT_TTL if result_ttl is None else result_ttl
        self._expiry = math.ceil(self.result_ttl + EXPIRY_SLACK)
        rest = urlencode([(key, value) for key, value in query if key != "prefix"])
        self._scripts = SCRIPTS
        self._connections = _Connections(lambda: None)
        self._client = self._open(urlunsplit(parts._replace(query=rest)))
        self._execute: Callable[..., Any] = self._client.execute_command
        self._closed = threading.Event()

    def _open(self, url: str) -> Any:
        """The client for ``url`` (without our own query parameters); scripts use its pool."""
        client = redis.Redis.from_url(
            url,
            # Retries are ours: a script is only run again where that is safe.
            retry=Retry(NoBackoff(), 0),
            **CLIENT_DEFAULTS,
        )
        pool = client.connection_pool
        self._connections = _Connections(lambda: pool.connection_class(**pool.connection_kwargs))
        return client

    # -- running scripts -----------------------------------------------------

    def _run(
        self,
        name: str,
        args: Sequence[Any],
        patience: float = WORKER_PATIENCE,
        retry_args: Sequence[Any] | None = None,
    ) -> Any:
        """Run script ``name``; ``retry_args``, if given, replace ``args`` on the tries after
        the first (one of which may follow a run whose reply was lost)."""
        script = self._scripts[name]
        tries = 0

        def evalsha() -> Any:
            nonlocal tries
            sent = args if tries == 0 or retry_args is None else retry_args
            tries += 1
            try:
                return self._evalsha(script.sha, sent)
            except redis.exceptions.NoScriptError:
                self._client.script_load(script.text)  # the server restarted or was flushed
                return self._evalsha(script.sha, sent)

        return self._retrying(evalsha, name, patience)

    def _evalsha(self, sha: str, args: Sequence[Any]) -> Any:
        """One EVALSHA, packed and sent without redis-py's per-command machinery."""
        # KEYS[1] routes the script to the prefix's hash slot on a cluster (see redis.lua).
        command = ("EVALSHA", sha, 1, self.prefix, self.prefix, *args)
        connection = self._connections.take()
        sent = False
        try:
            if pack_command is not None:
                connection.send_packed_command([pack_command(command)], check_health=False)
            else:
                connection.send_command(*command, check_health=False)
            sent = True
            reply = connection.read_response()
        except redis.ResponseError:
            self._connections.give(connection)  # the server answered: the connection is fine
            raise
        except BaseException as exc:
            connection.disconnect()
            self._connections.drop_idle()  # the server went away: the others are stale too
            if sent and isinstance(exc, redis.ConnectionError | redis.TimeoutError):
                raise _ReplyLost(f"no reply ({type(exc).__name__}: {exc})") from exc
            raise
        self._connections.give(connection)
        return reply

    def _retrying(self, call: Callable[[], T], what: str, patience: float) -> T:
        """Run ``call``, retrying transient errors with back-off for ``patience`` seconds.

        The whole call is a store call (``STORE_CALL``): a job's timeout never lands in it.
        """
        deadline = time.monotonic() + limited_patience(patience)
        with STORE_CALL:
            pause = 0.0
            lost = False
            while True:
                try:
                    return call()
                except redis.RedisError as exc:
                    if str(exc).startswith("ERRANDS job id already stored: "):
                        raise DuplicateJob(str(exc).removeprefix("ERRANDS ")) from None
                    lost = lost or isinstance(exc, _ReplyLost)
                    left = deadline - time.monotonic()
                    if not _transient(exc) or left <= 0 or self._closed.is_set() or given_up():
                        raise (_MaybeDone if lost else BackendUnavailable)(
                            f"Redis at {self.url} failed {what} "
                            f"({type(exc).__name__.lstrip('_')}: {exc}); "
                            "check that the server is running and reachable"
                        ) from exc
                    time.sleep(min(pause, left))
                    pause = min(max(pause * 2, 0.05), MAX_BACKOFF) * random.uniform(0.8, 1.0)

    def _key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    # -- life of a job -------------------------------------------------------

    def enqueue(self, jobs: Sequence[JobRecord]) -> list[JobRecord]:
        if not jobs:
            return []
        # The nonce marks the jobs this call stores: sent again, the script returns them.
        args = [random_id()[:16], _jobs_text(jobs)]
        try:
            reply = self._run("enqueue", args, CALLER_PATIENCE)
        except _MaybeDone:
            try:
                reply = self._run("enqueue", args, CALLER_PATIENCE)
            except BackendUnavailable as exc:
                ids = ", ".join(job.id for job in jobs[:3]) + (" ..." if len(jobs) > 3 else "")
                raise EnqueueError(
                    f"job {ids} ({jobs[0].task}) may or may not have been enqueued: {exc}; "
                    "look the id up before enqueueing it again"
                ) from exc.__cause__
        except BackendUnavailable as exc:
            raise EnqueueError(
                f"could not enqueue {len(jobs)} job(s) of {jobs[0].task}: {exc}; "
                "nothing was stored"
            ) from exc.__cause__
        self._notify()
        return [
            job if held == 0 else _lenient(held) for job, held in zip(jobs, reply, strict=True)
        ]

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
        if limit <= 0 or (queues is not None and not queues):
            return []
        token = random_id()[:16] + ":"
        args = [now, now + lease_seconds, worker_id, limit, token, max_lost_leases]
        # Only a retry can find what an earlier try of this call claimed: the first skips that.
        reply = self._run(
            "reserve", [*args, 0, *(queues or ())], retry_args=[*args, 1, *(queues or ())]
        )
        self.limit_free_at = None
        if len(reply) >= 2 and reply[-2] == b"":  # a limit held a job back until then
            self.limit_free_at, self._held_at = float(reply[-1]), now
            reply = reply[:-2]
        claimed, lost = [], []
        for i in range(0, len(reply), 2):
            if reply[i + 1] is None:  # its last lease ran out: the give_up script fails it
                lost.append(reply[i])
                continue
            try:
                claimed.append(_strict(reply[i + 1]))
            except _Unreadable as exc:
                self._fail_unreadable(reply[i].decode(errors="replace"), reply[i + 1], exc, now)
        if len(self._claims) > CLAIMS_KEPT:
            self._claims.clear()  # finishes from elsewhere never popped them
        for record in claimed:
            if record.lease_token and record.started_at is not None:
                self._claims[record.lease_token] = (record.started_at, record.eta)
        if lost:
            args = [now, max_lost_leases, self._expiry, WORKER_LOST_ERROR, UPSTREAM_FAILED]
            failed = self._run("give_up", [*args, *lost])
            claimed += [_lenient(failed[i + 1]) for i in range(0, len(failed), 2)]
        return claimed_only(claimed)

    def _fail_unreadable(
        self, job_id: str, flat: list[bytes], exc: _Unreadable, now: float
    ) -> None:
        """Fail a claimed job whose record cannot be read, so it is never run."""
        token = dict(zip(flat[::2], flat[1::2], strict=True)).get(b"lease_token", b"")
        error = (
            f"InvalidJob: the record of job {job_id} in Redis is unreadable ({exc}); "
            "it was not run. Enqueue jobs with task.delay(), never by writing to Redis"
        )
        self.finish(job_id, token.decode(), FAILED, now, error=error)

    def heartbeat(self, leases: Mapping[str, str], lease_seconds: float, now: float) -> set[str]:
        if not leases:
            return set()
        args: list[Any] = [now + lease_seconds]
        for job_id, token in leases.items():
            args += (job_id, token)
        return {job_id.decode() for job_id in self._run("heartbeat", args)}

    def set_progress(self, job_id: str, progress: float | None, message: str | None) -> None:
        fields = _fields({"progress": progress, "progress_message": message})
        self._run("set_progress", [job_id, *fields])

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
        fields = _fields({"result": result, "error": error, "traceback": traceback})
        args = [job_id, lease_token, status, now, now if eta is None else eta, self._expiry]
        timed = _timed(self._claims.pop(lease_token, None), now)
        reply = self._run("finish", [*args, UPSTREAM_FAILED, minute_of(now), *timed, *fields])
        if reply == 2 or (reply == 1 and status == SCHEDULED):
            self._notify()
        return bool(reply)

    def release(self, job_id: str, lease_token: str, now: float) -> bool:
        self._claims.pop(lease_token, None)
        applied = bool(self._run("release", [job_id, lease_token]) == 1)
        self._notify()
        return applied

    def cancel(self, job_id: str, now: float) -> JobRecord | None:
        args = [job_id, now, self._expiry, UPSTREAM_FAILED]
        reply = self._run("cancel", args, CALLER_PATIENCE)
        return None if reply is None else _lenient(reply, job_id)

    def requeue(self, job_id: str, now: float) -> JobRecord | None:
        reply = self._run("requeue", [job_id, now, UPSTREAM_FAILED_PREFIX], CALLER_PATIENCE)
        self._notify()
        return None if reply is None else _lenient(reply, job_id)

    def step_inputs(self, job_id: str) -> dict[int, str]:
        key = self._key("inputs", job_id)
        found = self._retrying(lambda: self._execute("HGETALL", key), "to read", WORKER_PATIENCE)
        return {int(position): result.decode() for position, result in found.items()}

    # -- looking at jobs -----------------------------------------------------

    def get(self, job_id: str) -> JobRecord | None:
        key = self._key("job", job_id)
        found = self._retrying(lambda: self._execute("HGETALL", key), "to read", CALLER_PATIENCE)
        return (
            _lenient([item for pair in found.items() for item in pair], job_id) if found else None
        )

    def list_jobs(
        self,
        status: str | None = None,
        queue: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> list[JobRecord]:
        args = [status or "", queue or "", limit, offset]
        return [_lenient(flat) for flat in self._run("list_jobs", args, CALLER_PATIENCE)]

    def job_page(
        self,
        status: str | None = None,
        queue: str | None = None,
        task: str | None = None,
        *,
        limit: int = 50,
        before: int | None = None,
    ) -> tuple[list[JobRecord], int | None]:
        args = [status or "", queue or "", task or "", limit, "" if before is None else before]
        records, last = self._run("job_page", [*args, PAGE_BUDGET], CALLER_PATIENCE)
        return [_lenient(flat) for flat in records], int(last) if last else None

    def counts(self) -> dict[tuple[str, str], int]:
        reply = self._run("counts", [], CALLER_PATIENCE)
        return {
            (reply[i].decode(), reply[i + 1].decode()): int(reply[i + 2])
            for i in range(0, len(reply), 3)
        }

    def next_eta(self, queues: Sequence[str] | None) -> float | None:
        if queues is not None and not queues:
            return None
        reply = self._run("next_eta", list(queues or ()))
        if reply is None:
            return None
        eta, free_at = float(reply), self.limit_free_at
        # What was due at the last claim was claimed, but what limits held back: those
        # wait for their limits (a job enqueued since sends a wake-up of its own).
        if free_at is not None and eta < free_at and eta <= self._held_at:
            eta = free_at
        return eta

    def limit_usage(self, limits: Sequence[Limit], now: float) -> dict[str, tuple[int, int]]:
        args: list[Any] = [now]
        for limit in limits:
            args += (limit.key, limit.kind, limit.name, "" if limit.per is None else limit.per)
        reply = self._run("limit_usage", args) if limits else []
        return {
            limit.key: (int(reply[2 * i]), int(reply[2 * i + 1])) for i, limit in enumerate(limits)
        }

    # -- queues and schedules, as people change them ---------------------------

    def pause_queue(self, queue: str, now: float) -> None:
        self._run("pause_queue", [queue], CALLER_PATIENCE)

    def resume_queue(self, queue: str) -> None:
        self._run("resume_queue", [queue], CALLER_PATIENCE)
        self._notify()

    def paused_queues(self) -> set[str]:
        members = self._retrying(
            lambda: self._execute("SMEMBERS", self._key("paused")),
            "to list paused queues",
            CALLER_PATIENCE,
        )
        return {name.decode() for name in members}

    def set_schedule_paused(self, schedule: str, paused: bool, now: float) -> None:
        self._run("set_schedule_paused", [schedule, "1" if paused else "0", repr(now)])

    def set_schedule_timing(
        self, schedule: str, every: float | None, cron: str | None, now: float
    ) -> None:
        timing = ["" if every is None else repr(float(every)), cron or ""]
        self._run("set_schedule_timing", [schedule, *timing, repr(now)])

    def schedule_states(self) -> dict[str, ScheduleState]:
        reply = self._run("schedule_states", [], CALLER_PATIENCE)
        states = {}
        for i in range(0, len(reply), 2):
            flat = reply[i + 1]
            fields = {flat[k].decode(): flat[k + 1].decode() for k in range(0, len(flat), 2)}
            states[reply[i].decode()] = ScheduleState(
                paused=fields.get("paused") == "1",
                every=float(fields["every"]) if "every" in fields else None,
                cron=fields.get("cron"),
                since=float(fields.get("since", 0.0)),
            )
        return states

    # -- figures for charts and metrics ----------------------------------------

    def finished_counts(self, since_minute: int) -> list[tuple[int, str, str, str, int]]:
        reply = self._run("finished_counts", [since_minute], CALLER_PATIENCE)
        rows = []
        for i in range(0, len(reply), 3):
            queue, task, outcome = reply[i + 1].decode().split("\n")
            rows.append((int(reply[i]), queue, task, outcome, int(reply[i + 2])))
        return sorted(rows)

    def sample_depth(self, now: float) -> bool:
        minute = minute_of(now)
        args = [minute, self._expiry, minute - FIGURE_MINUTES]
        return bool(self._run("sample_depth", args) == 1)

    def enqueued_counts(self) -> dict[tuple[str, str], int]:
        reply = self._run("enqueued_counts", [], CALLER_PATIENCE)
        counts = {}
        for i in range(0, len(reply), 2):
            queue, task = reply[i].decode().split("\n")
            counts[(queue, task)] = int(reply[i + 1])
        return counts

    def timings(self) -> dict[tuple[str, str, str], Timing]:
        reply = self._run("timings", [], CALLER_PATIENCE)
        rows = []
        for i in range(0, len(reply), 2):
            timing, queue, task, bucket = reply[i].decode().split("\n")
            value = reply[i + 1]
            if timing == "both":  # one count for a duration bucket and a wait bucket
                duration, wait = bucket.split(",")
                rows.append(("duration", queue, task, int(duration), int(value), 0.0))
                rows.append(("wait", queue, task, int(wait), int(value), 0.0))
            elif bucket == "usum":  # whole microseconds (see redis.lua)
                rows.append((timing, queue, task, 0, 0, int(value) / 1e6))
            elif bucket == "sum":  # float seconds, as stores written before kept it
                rows.append((timing, queue, task, 0, 0, float(value)))
            else:
                rows.append((timing, queue, task, int(bucket), int(value), 0.0))
        return gather_timings(rows)

    def depth_samples(self, since_minute: int) -> dict[int, dict[tuple[str, str], int]]:
        reply = self._run("depth_samples", [since_minute], CALLER_PATIENCE)
        return {
            int(reply[i]): {(queue, status): n for queue, status, n in json.loads(reply[i + 1])}
            for i in range(0, len(reply), 2)
        }

    # -- housekeeping --------------------------------------------------------

    def fire_tick(self, schedule: str, fire_time: float, job: JobRecord, now: float) -> bool:
        args = [random_id()[:16], schedule, repr(float(fire_time)), now, _jobs_text([job])]
        fired = bool(self._run("fire_tick", args) == 1)
        if fired:
            self._notify()
        return fired

    def last_ticks(self) -> dict[str, tuple[float, str | None]]:
        reply = self._run("last_ticks", [])
        return {
            reply[i].decode(): (float(reply[i + 1]), reply[i + 2].decode() or None)
            for i in range(0, len(reply), 3)
        }

    def prune(self, finished_before: float) -> int:
        total, more = 0, 1
        while more:
            deleted, more = self._run("prune", [finished_before, BATCH])
            total += deleted
        return int(total)

    def purge(
        self, status: str | None = None, queue: str | None = None, before: float | None = None
    ) -> int:
        if status == RUNNING or (status is not None and status not in STATUSES):
            return 0
        statuses = [status] if status else [s for s in STATUSES if s != RUNNING]
        if queue is None:
            members = self._retrying(
                lambda: self._execute("SMEMBERS", self._key("queues")),
                "to list queues",
                CALLER_PATIENCE,
            )
            queues = sorted(name.decode() for name in members)
        else:
            queues = [queue]
        total = 0
        for name in queues:
            for state in statuses:
                cursor = "0"
                while cursor:
                    args = [name, state, "" if before is None else before, cursor, BATCH]
                    deleted, next_cursor = self._run("purge", args, CALLER_PATIENCE)
                    total += deleted
                    cursor = next_cursor.decode()
        return total

    # -- live workers --------------------------------------------------------

    def delete(self, job_id: str) -> bool:
        return bool(self._run("delete", [job_id], CALLER_PATIENCE) == 1)

    def register_worker(
        self, worker_id: str, info: Mapping[str, Any], ttl: float, now: float
    ) -> None:
        self._run("register_worker", [worker_id, now + ttl, json.dumps(dict(info))])

    def unregister_worker(self, worker_id: str) -> None:
        self._run("unregister_worker", [worker_id])

    def list_workers(self, now: float) -> list[dict[str, Any]]:
        reply = self._run("list_workers", [now], CALLER_PATIENCE)
        workers = []
        for i in range(0, len(reply), 2):
            with contextlib.suppress(ValueError):
                workers.append({**json.loads(reply[i + 1]), "id": reply[i].decode()})
        return sorted(workers, key=lambda worker: str(worker["id"]))

    def close(self) -> None:
        self._closed.set()
        self._connections.close()
        self._client.close()

    # -- wake-ups from other processes ---------------------------------------

    def _watch(self) -> None:
        """Listen on the wake channel until closed, reconnecting with back-off."""
        pause = 0.0
        while not self._closed.is_set():
            pubsub = None
            try:
                pubsub, receive = self._subscribe()
                self._notify()  # work may have come while nobody was listening
                pause = 0.0
                while not self._closed.is_set():
                    if receive(WATCH_TIMEOUT) is not None:
                        while receive(0.0) is not None:
                            pass
                        self._notify()
            except Exception:  # close() pulls the socket from under redis-py, too
                pause = min(max(pause * 2, 0.05), MAX_BACKOFF)
                self._closed.wait(pause)
            finally:
                with contextlib.suppress(Exception):
                    if pubsub is not None:
                        pubsub.close()

    def _subscribe(self) -> tuple[Any, Callable[[float], Any]]:
        """A pub/sub connection listening on the wake channel, and its receive(timeout)."""
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(self._key("wake"))
        except BaseException:
            pubsub.close()
            raise
        return pubsub, lambda timeout: pubsub.get_message(timeout=timeout)


class _Connections:
    """Connections for scripts, reused last-in first-out; each serves one caller at a time.

    Lighter than redis-py's pool, which inspects its arguments on every call;
    there are as many connections as callers ever ran scripts at once.
    """

    def __init__(self, make: Callable[[], Any]) -> None:
        self._make = make
        self._pid = os.getpid()
        self._idle: list[Any] = []
        self._made: list[Any] = []
        self._lock = threading.Lock()

    def take(self) -> Any:
        if self._pid != os.getpid():
            # Forked: the parent's sockets are not ours to use (nor to close).
            self._pid, self._idle, self._made = os.getpid(), [], []
        try:
            return self._idle.pop()
        except IndexError:
            connection = self._make()
            with self._lock:
                self._made.append(connection)
            return connection

    def give(self, connection: Any) -> None:
        self._idle.append(connection)

    def drop_idle(self) -> None:
        """Disconnect idle connections; each reconnects when next used."""
        for connection in list(self._idle):
            connection.disconnect()

    def close(self) -> None:
        with self._lock:
            made, self._made, self._idle = self._made, [], []
        for connection in made:
            connection.disconnect()


def _transient(exc: redis.RedisError) -> bool:
    """Whether an error may go away by itself: a lost connection, a loading or busy server."""
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
        return True
    return isinstance(exc, redis.ResponseError) and str(exc).startswith(_TRANSIENT)


def _jobs_text(jobs: Sequence[JobRecord]) -> str:
    """New jobs as the scripts read them: index fields, then the stored fields as pairs."""
    blocks: list[list[Any]] = []
    for job in jobs:
        values = job.__dict__
        eta = repr(float(job.eta))
        fields = ["id", job.id, "task", job.task, "payload", job.payload, "status", job.status]
        fields += ("eta", eta, "enqueued_at", repr(float(job.enqueued_at)))
        for name in _OPTIONAL:
            value = values[name]
            # A field at JobRecord's default is left out: reading it back gives the default.
            if value is not None and _DEFAULTS.get(name, _NO_DEFAULT) != value:
                fields += (name, _TEXT.get(type(value), str)(value))
        header = [job.id, job.queue, str(job.priority), job.status, eta]
        blocks.append([*header, job.unique_key, fields])
    return _to_json(blocks)


def _fields(values: Mapping[str, Any]) -> list[Any]:
    """A block of fields to set (the non-None ones) and fields to delete (the None ones)."""
    block: list[Any] = [sum(value is not None for value in values.values())]
    for name, value in values.items():
        if value is not None:
            block += (name, value)
    block.append(sum(value is None for value in values.values()))
    block += [name for name, value in values.items() if value is None]
    return block


def _timed(claim: tuple[float, float] | None, now: float) -> tuple[str, int, int]:
    """The finish script's timing arguments for an attempt claimed at ``(started_at, eta)``:
    its duration's and wait's buckets (as ``bucket_of`` in ``redis.lua``) and both in whole
    microseconds; for a claim this backend never saw, ``""`` and the script works them out.
    """
    if claim is None:
        return "", 0, 0
    started, eta = claim
    duration, wait = max(now - started, 0.0), max(started - eta, 0.0)
    buckets = (
        f"{bisect.bisect_left(TIMING_BOUNDS, duration)},{bisect.bisect_left(TIMING_BOUNDS, wait)}"
    )
    return buckets, int(duration * 1e6 + 0.5), int(wait * 1e6 + 0.5)


def _strict(flat: list[bytes]) -> JobRecord:
    """Decode a record to be run; raise :class:`_Unreadable` for anything not written by us."""
    values: dict[str, Any] = {}
    try:
        for i in range(0, len(flat), 2):
            decoder = _DECODERS.get(flat[i])
            if decoder is not None:
                name, convert = decoder
                values[name] = convert(flat[i + 1])
        record = JobRecord(**values)
        payload = json.loads(record.payload)
    except (TypeError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError included
        raise _Unreadable(str(exc)) from None
    if (
        not isinstance(payload, dict)
        or not isinstance(payload.get("args"), list)
        or not isinstance(payload.get("kwargs"), dict)
    ):
        raise _Unreadable("its payload is not an object with args and kwargs")
    return record


def _lenient(flat: list[bytes], job_id: str = "") -> JobRecord:
    """Decode a record to be shown: fields that cannot be read are left at their defaults."""
    values: dict[str, Any] = {"id": job_id, "task": "", "payload": ""}
    for i in range(0, len(flat), 2):
        decoder = _DECODERS.get(flat[i])
        if decoder is not None:
            name, convert = decoder
            with contextlib.suppress(ValueError):
                values[name] = convert(flat[i + 1])
    return JobRecord(**values)
