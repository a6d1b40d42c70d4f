"""The contract between the engine and storage.

The interface speaks of jobs, not messages: a job is enqueued, reserved under
a lease, heartbeated, finished (succeeded, failed, retried later, cancelled),
released on a graceful stop, looked up and pruned. Every method that changes a
job is atomic in its store. Times are seconds since the epoch (``time.time()``)
and are passed in by the caller, so tests can drive a backend with any clock.

Errors are the same on every store. A method raises
:class:`~flask_errands.exceptions.BackendUnavailable` when its store cannot be
reached or refuses the operation, and nothing else, unless its docstring says
more: :meth:`Backend.enqueue` raises ``EnqueueError`` and ``DuplicateJob``,
:meth:`Backend.fire_tick` ``DuplicateJob``. Values are checked above this layer
(``TaskOptions``, ``serialization``): a store never raises ``ValueError`` or a
driver's own exception for a queue name, priority, eta or payload that passed
those checks.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

from ..limits import Limit
from ..status import FINISHED, LIVE, STATUSES, WAITING, JobStatus

# Stored records hold a status as its plain string: a ``JobStatus`` member in a record
# would make the garbage collector track (and traverse) every stored record's dict.
# ``Job.status`` turns it into ``JobStatus``; the two compare and hash alike.
BLOCKED: str = JobStatus.BLOCKED.value
QUEUED: str = JobStatus.QUEUED.value
SCHEDULED: str = JobStatus.SCHEDULED.value
RUNNING: str = JobStatus.RUNNING.value
SUCCEEDED: str = JobStatus.SUCCEEDED.value
FAILED: str = JobStatus.FAILED.value
CANCELLED: str = JobStatus.CANCELLED.value

__all__ = [
    "BLOCKED",
    "CANCELLED",
    "FAILED",
    "FINISHED",
    "LIVE",
    "QUEUED",
    "RUNNING",
    "SCHEDULED",
    "STATUSES",
    "SUCCEEDED",
    "UPSTREAM_FAILED",
    "WAITING",
    "Backend",
    "Cursor",
    "Flow",
    "JobRecord",
    "JobStatus",
    "ScheduleState",
    "Timing",
]

#: How many leases in a row a job may lose (its worker died running it) before it fails.
DEFAULT_MAX_LOST_LEASES = 3
#: The error of a job that failed so: each store fills in the fields as it fails the job.
WORKER_LOST_ERROR = (
    "WorkerLost: worker {worker} died while running attempt {attempt} (its lease expired); "
    "the job lost {lost} leases in a row, so it is not run again"
)

#: The error of a workflow step cancelled because a step upstream of it failed or was cancelled.
UPSTREAM_FAILED = "UpstreamFailed: upstream step {job} ({task}) {ended}; this step never ran"
#: How an :data:`UPSTREAM_FAILED` error starts: re-running the upstream step revives such steps.
UPSTREAM_FAILED_PREFIX = "UpstreamFailed: "

logger = logging.getLogger("flask_errands")


@dataclasses.dataclass
class JobRecord:
    """A job as storage keeps it: plain values only, payload and result as JSON text.

    ``status`` is a status's plain string (``"queued"``), never a ``JobStatus``
    member: only immutable built-in values keep a record's dict out of the
    garbage collector's sight. :attr:`Job.status <flask_errands.Job.status>` is
    the ``JobStatus``.
    """

    id: str
    task: str
    payload: str
    queue: str = "default"
    priority: int = 0
    status: str = QUEUED
    attempts: int = 0
    max_attempts: int = 1
    retry_delay: float = 1.0
    timeout: float | None = None
    unique_key: str | None = None
    eta: float = 0.0
    enqueued_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    result: str | None = None
    error: str | None = None
    traceback: str | None = None
    progress: float | None = None
    progress_message: str | None = None
    cancel_requested: bool = False
    lease_expires_at: float | None = None
    lease_token: str | None = None
    worker_id: str | None = None
    #: Leases lost in a row: reserve counts a claim of an expired lease; finish and release reset.
    lost_leases: int = 0
    #: For a workflow step, its place in the workflow as :class:`Flow` JSON; None otherwise.
    flow: str | None = None
    #: For a blocked step, how many of its inputs (upstream results) are not stored yet.
    blocked_by: int = 0
    #: The rate and concurrency limits the job starts under, as ``limits.encode`` JSON; or None.
    limits: str | None = None
    #: The W3C ``traceparent`` of the span that enqueued the job, when tracing is on; the
    #: attempts' spans are its children, in whichever process runs them.
    trace: str | None = None

    @classmethod
    def from_mapping(cls, row: Mapping[str, Any]) -> JobRecord:
        """Build a record from a row or hash whose keys are field names."""
        record = cls(**{f.name: row[f.name] for f in FIELDS if f.name in row})
        record.status = str(record.status)  # a JobStatus member, too, becomes its string
        return record

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


FIELDS = dataclasses.fields(JobRecord)
FIELD_NAMES = tuple(f.name for f in FIELDS)


@dataclasses.dataclass(frozen=True)
class Flow:
    """A workflow step's links, fixed when the workflow is enqueued.

    ``next`` lists the steps this one feeds, each with the position its result
    takes among that step's inputs. A step with ``inputs`` takes the results of
    that many upstream steps as its first argument: the one result itself, or
    the list of them in position order when ``gather`` (after a group, a chord's
    callback).
    """

    next: tuple[tuple[str, int], ...] = ()
    inputs: int = 0
    gather: bool = False

    def dumps(self) -> str:
        return json.dumps(
            {
                "next": [list(link) for link in self.next],
                "inputs": self.inputs,
                "gather": self.gather,
            },
            separators=(",", ":"),
        )

    @classmethod
    def loads(cls, text: str) -> Flow:
        data = json.loads(text)
        return cls(
            next=tuple((str(job_id), int(position)) for job_id, position in data["next"]),
            inputs=int(data["inputs"]),
            gather=bool(data["gather"]),
        )


def upstream_failed(job_id: str, task: str, status: str) -> str:
    """:data:`UPSTREAM_FAILED` for the steps downstream of ``job_id``, which ended ``status``."""
    ended = "was cancelled" if status == CANCELLED else "failed"
    return UPSTREAM_FAILED.format(job=job_id, task=task, ended=ended)


def worker_lost_error(worker: str | None, attempt: int, lost: int) -> str:
    """:data:`WORKER_LOST_ERROR` for a job whose ``lost``-th lease in a row just expired."""
    return WORKER_LOST_ERROR.format(worker=worker or "?", attempt=attempt, lost=lost)


def claimed_only(records: Sequence[JobRecord]) -> list[JobRecord]:
    """The jobs a reserve claimed, without those it failed for lost leases, which it logs."""
    claimed = []
    for record in records:
        if record.status == FAILED:
            logger.warning(
                "%s %s failed (attempt %d): %s",
                record.task,
                record.id,
                record.attempts,
                record.error,
                extra={"job_id": record.id, "task": record.task},
            )
        else:
            claimed.append(record)
    return claimed


@dataclasses.dataclass(frozen=True)
class ScheduleState:
    """What people changed on a schedule at run time, as the store keeps it for every process.

    ``every`` or ``cron`` (at most one set) replaces the timing the code gave;
    ``since`` is when the schedule was last resumed or re-timed: a tick before
    it is a past one, never fired late.
    """

    paused: bool = False
    every: float | None = None
    cron: str | None = None
    since: float = 0.0


#: The outcome an attempt's end counts as, by the status :meth:`Backend.finish` gives the job.
OUTCOMES = {"succeeded": "succeeded", "failed": "failed", "cancelled": "cancelled"}
OUTCOMES["scheduled"] = "retried"


#: How many minutes the SQL stores keep their per-minute counts apart (the dashboard charts
#: the last hour): the first :meth:`Backend.sample_depth` of each minute folds older ones into
#: minute 0, so finished jobs are counted from a few thousand rows at most.
FIGURE_MINUTES = 180


#: The upper bounds, in seconds, of the buckets of the timings every store keeps
#: (:meth:`Backend.timings`); one more bucket, +Inf, holds what is longer. Fixed, as the
#: stores' scripts and statements spell them out too (redis.lua, sqlite.sql, postgres.sql).
TIMING_BOUNDS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)
#: The timings kept: ``duration`` (start to end of an attempt) and ``wait`` (due to start).
TIMINGS = ("duration", "wait")


def bucket_of(seconds: float) -> int:
    """The index in :data:`TIMING_BOUNDS` of the first bound >= ``seconds``, or its length."""
    for index, bound in enumerate(TIMING_BOUNDS):
        if seconds <= bound:
            return index
    return len(TIMING_BOUNDS)


@dataclasses.dataclass
class Timing:
    """One histogram of a queue and task: how many values fell in each bucket, and their sum.

    ``buckets[i]`` counts the values of bucket ``i`` alone (not cumulative); the
    last one is +Inf.
    """

    buckets: list[int] = dataclasses.field(default_factory=lambda: [0] * (len(TIMING_BOUNDS) + 1))
    total: float = 0.0

    @property
    def count(self) -> int:
        return sum(self.buckets)


def gather_timings(
    rows: Iterable[tuple[str, str, str, int, int, float]],
) -> dict[tuple[str, str, str], Timing]:
    """:meth:`Backend.timings` from a store's rows ``(timing, queue, task, bucket, n, total)``."""
    timings: dict[tuple[str, str, str], Timing] = {}
    for timing, queue, task, bucket, n, total in rows:
        found = timings.setdefault((timing, queue, task), Timing())
        found.buckets[min(int(bucket), len(TIMING_BOUNDS))] += int(n)
        found.total += float(total)
    return timings


#: Random ids made per read of the OS's random source (one system call for many jobs).
_IDS_PER_READ = 256
_ids: list[str] = []
os.register_at_fork(after_in_child=_ids.clear)  # a child never hands out its parent's ids


def random_id() -> str:
    """A new job id: 128 random bits as 32 hex digits, from ``os.urandom``.

    Drawn from a pool read a few thousand bytes at a time; ``list.pop`` is
    atomic, so threads never share an id, and a forked child starts a pool of
    its own.
    """
    try:
        return _ids.pop()
    except IndexError:
        text = os.urandom(16 * _IDS_PER_READ).hex()
        _ids.extend(text[i : i + 32] for i in range(0, len(text), 32))
        return _ids.pop()


def minute_of(moment: float) -> int:
    """The minute (Unix time // 60) that per-minute counts and samples file ``moment`` under."""
    return int(moment // 60)


def page_bounds(limit: int, before: int | None) -> dict[str, int]:
    """The parameters of an SQL store's keyset page: one row more than ``limit`` is asked
    for, for :func:`page_of` to see if another page follows."""
    return {"before": 2**63 - 1 if before is None else before, "limit": limit + 1}


#: The page index of the SQL stores, ``(status, queue, task, seq)``, but ``seq``. One index
#: serves every filter of :meth:`Backend.job_page`, walked key by key: an index per filter
#: would cost every enqueue, claim and finish a write more.
PAGE_KEY = ("status", "queue", "task")


def page_of(
    rows: Sequence[Any], limit: int, record: Callable[[Any], JobRecord]
) -> tuple[list[JobRecord], int | None]:
    """The jobs of a keyset page's rows (:func:`page_bounds`), and the next page's position."""
    more = len(rows) > limit
    return [record(row) for row in rows[:limit]], rows[limit - 1]["seq"] if more else None


WakeCallback = Callable[[], None]


class Cursor(Protocol):
    """A DB-API cursor of the app's own connection (psycopg's), for writes in its transaction."""

    @property
    def description(self) -> Any: ...

    def execute(self, query: Any, params: Any = ..., /) -> Any: ...

    def executemany(self, query: Any, params_seq: Any, /) -> Any: ...

    def fetchone(self) -> Any: ...


class Backend(ABC):
    """Storage for jobs. One subclass per store, each in its own module."""

    #: The URL the backend was built from, with any password hidden.
    url: str

    def __init__(self) -> None:
        #: Whether claims must look at limits: set once this process declares or enqueues a
        #: limited job, or :meth:`next_eta` sees one waiting.
        self.limited = False
        #: When a job the last claim held back by a limit may next start, or None.
        self.limit_free_at: float | None = None
        self._watchers: list[WakeCallback] = []
        self._watchers_lock = threading.Lock()
        self._watcher: threading.Thread | None = None

    def expect_limits(self) -> None:
        """Have claims look at limits from now on: this process declares or enqueues some."""
        self.limited = True

    # -- life of a job -------------------------------------------------------

    @abstractmethod
    def enqueue(self, jobs: Sequence[JobRecord]) -> list[JobRecord]:
        """Store new jobs in one atomic step and return what was stored, in order.

        A job whose ``unique_key`` belongs to a live (queued, scheduled or
        running) job is not stored; the live job's record takes its place in
        the result. Either every job is stored or none is, and the call raises.
        So a workflow's steps are stored together: those with upstream steps
        ``blocked``, never reserved until :meth:`finish` unblocks them.

        Raises :class:`~flask_errands.exceptions.DuplicateJob` when a job's id
        is already stored (or given twice in ``jobs``), and
        :class:`~flask_errands.exceptions.EnqueueError` (a ``BackendUnavailable``)
        when the store could not be reached; in both cases nothing was stored.
        """

    @abstractmethod
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
        """Atomically claim up to ``limit`` due jobs for ``worker_id`` and return them.

        Due means queued or scheduled with ``eta <= now``, or running with an
        expired lease (its worker died). Higher priority first, then earlier
        ``eta``, then enqueue order. Each claimed job becomes running with
        ``attempts`` incremented, a fresh ``lease_token`` and
        ``lease_expires_at = now + lease_seconds``. ``queues=None`` means all.
        A paused queue (:meth:`pause_queue`) is skipped, in the same atomic step.

        A job with ``limits`` (``limits.encode``) is claimed only while its limits allow,
        checked in the same atomic step through a :class:`~flask_errands.limits.Gate`: its
        task's (or queue's) running jobs under a live lease below ``concurrency``, and fewer
        than ``rate`` of its starts in the last ``per`` seconds; every start of such a job
        is logged in the store. A job held back stays as it was (no attempt counted) and
        jobs after it are claimed instead. The SQL stores look at limits only once
        :attr:`limited` is set (else they leave limited jobs alone); a held-back claim sets
        :attr:`limit_free_at`, which :meth:`next_eta` reports for limited jobs.

        Claiming an expired lease adds one to the job's ``lost_leases``. A job
        that reaches ``max_lost_leases`` that way is not claimed but failed, in
        the same atomic step, with :data:`WORKER_LOST_ERROR` and no traceback:
        a task that kills its worker each time must not loop for ever. It is
        not returned, and may count against ``limit``. Such a workflow step
        is failed together with the cancelling of its downstream steps (as
        :meth:`finish` does), atomically, before ``reserve`` returns.
        """

    @abstractmethod
    def heartbeat(self, leases: Mapping[str, str], lease_seconds: float, now: float) -> set[str]:
        """Extend the leases of running jobs (``{job_id: lease_token}``).

        Returns the ids among them whose cancellation has been requested, so
        the running task can see ``cancel_requested``. A job whose token no
        longer matches (it was re-delivered) is left alone.
        """

    @abstractmethod
    def set_progress(self, job_id: str, progress: float | None, message: str | None) -> None:
        """Record a running job's progress fraction and message."""

    @abstractmethod
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
        """End an attempt: ``succeeded``, ``failed``, ``cancelled``, or ``scheduled`` at ``eta``.

        Applies only while the job is running under ``lease_token``; returns
        whether it applied (False when the lease was lost and the job handed
        to another worker). Clears the unique key's claim unless rescheduled.
        Resets ``lost_leases``: the attempt ended with its worker alive.

        When it applies, it also adds one, in the same atomic step, to the
        count of attempts of the job's queue and task that ended so in the
        minute of ``now`` (:meth:`finished_counts`; ``scheduled`` counts as
        ``retried``), as does a reserve that fails a job for lost leases.

        A workflow step's outcome moves its workflow on in the same atomic step
        (one Lua script, one transaction, one lock), so a worker killed at any
        point leaves either both or neither, and a chord's callback is queued
        exactly once. ``succeeded``: the result is stored as an input of each
        step in ``Flow.next`` (:meth:`step_inputs`), unless that input is
        already there (a re-run), and each newly stored input takes one from
        its step's ``blocked_by``; a blocked step at 0 becomes queued (or
        scheduled, if its eta is later). ``failed`` or ``cancelled``: every
        blocked step downstream, transitively, becomes cancelled with the
        error :func:`upstream_failed` naming this job.
        """

    @abstractmethod
    def release(self, job_id: str, lease_token: str, now: float) -> bool:
        """Give a running job back to its queue as if this attempt never started.

        Used on a graceful stop for jobs that could not finish in time: the
        job is queued again with its attempt count restored and ``lost_leases`` reset.
        """

    @abstractmethod
    def cancel(self, job_id: str, now: float) -> JobRecord | None:
        """Cancel a job: a waiting or blocked one never starts; a running one is asked to stop.

        Returns the job as it is afterwards, or None when there is no such job.
        A finished job is returned unchanged. Cancelling a waiting or blocked
        workflow step cancels the blocked steps downstream of it as
        :meth:`finish` does, in the same atomic step.
        """

    @abstractmethod
    def requeue(self, job_id: str, now: float) -> JobRecord | None:
        """Run a finished (failed, cancelled or succeeded) job again under the same id.

        The job is queued with its attempts, lost leases, result and error cleared. Returns
        the job afterwards (unchanged if it is still live), or None if unknown.

        A workflow step resumes its workflow, atomically: it goes back to
        ``blocked`` instead if inputs are still missing (``blocked_by > 0``),
        and the steps downstream of it, transitively, that were cancelled with
        an :func:`upstream_failed` error are blocked again, their stored inputs kept.
        """

    @abstractmethod
    def step_inputs(self, job_id: str) -> dict[int, str]:
        """Return the inputs stored for a workflow step: ``{position: result JSON}``.

        Written by :meth:`finish` of its upstream steps; deleted with the step.
        """

    # -- in the app's own transaction -------------------------------------------

    def shares_database(self, cursor: Cursor) -> bool:
        """Whether ``cursor``'s connection reaches the very database this store keeps jobs in.

        Only then can :meth:`enqueue_in` write jobs in that connection's
        transaction; other stores answer False, and ``errands.transaction()``
        holds the jobs until the app's commit instead.
        """
        return False

    def enqueue_in(self, cursor: Cursor, jobs: Sequence[JobRecord]) -> list[JobRecord]:
        """Write jobs through ``cursor``, in its connection's open transaction, committing nothing.

        As :meth:`enqueue`, but the app's commit stores them and its rollback
        drops them; no worker sees them before the commit, and the wake-up is
        sent at commit. Only for a cursor for which :meth:`shares_database` is true.
        """
        raise NotImplementedError(f"{type(self).__name__} keeps jobs apart from the app's data")

    # -- looking at jobs -----------------------------------------------------

    @abstractmethod
    def get(self, job_id: str) -> JobRecord | None:
        """Return the job with this id, or None."""

    @abstractmethod
    def list_jobs(
        self,
        status: str | None = None,
        queue: str | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> list[JobRecord]:
        """Return jobs, newest first, optionally only those in ``status`` and ``queue``."""

    @abstractmethod
    def job_page(
        self,
        status: str | None = None,
        queue: str | None = None,
        task: str | None = None,
        *,
        limit: int = 50,
        before: int | None = None,
    ) -> tuple[list[JobRecord], int | None]:
        """One page of jobs, newest (latest enqueued in the store's order) first.

        Keyset pagination, never an offset: ``before`` is the position a
        previous page returned, and the page holds jobs enqueued before it.
        Returns the jobs and the position to pass for the next page, or None
        when no job is left. A page may hold fewer than ``limit`` jobs and still
        have a next one (a store may bound how far it looks per call).
        """

    @abstractmethod
    def counts(self) -> dict[tuple[str, str], int]:
        """Return the number of jobs per ``(queue, status)``."""

    @abstractmethod
    def next_eta(self, queues: Sequence[str] | None) -> float | None:
        """Return the earliest ``eta`` among waiting jobs of these queues, or None.

        Paused queues are left out: their jobs are not due for any worker. A job with
        limits counts as due no earlier than :attr:`limit_free_at`, so a worker whose
        due jobs are all held back sleeps until a limit may let one go; seeing such a job
        due sets :attr:`limited`.
        """

    @abstractmethod
    def limit_usage(self, limits: Sequence[Limit], now: float) -> dict[str, tuple[int, int]]:
        """How much of each limit is in use: ``{key: (running, starts in its window)}``.

        Running counts the jobs of the task (or queue) under a live lease; starts, those
        logged in the last ``per`` seconds (0 for a limit without a rate).
        """

    # -- queues and schedules, as people change them ---------------------------

    @abstractmethod
    def pause_queue(self, queue: str, now: float) -> None:
        """Stop every worker from claiming jobs of ``queue`` until resumed; idempotent.

        Jobs still enqueue to a paused queue, and running ones finish.
        """

    @abstractmethod
    def resume_queue(self, queue: str) -> None:
        """Let workers claim from ``queue`` again, and wake them; idempotent."""

    @abstractmethod
    def paused_queues(self) -> set[str]:
        """The names of the paused queues, whether they hold jobs or not."""

    @abstractmethod
    def set_schedule_paused(self, schedule: str, paused: bool, now: float) -> None:
        """Pause or resume a schedule for every scheduler; atomic, keeps its timing.

        Resuming (from paused) sets ``since`` to ``now``, so the ticks missed meanwhile never fire.
        """

    @abstractmethod
    def set_schedule_timing(
        self, schedule: str, every: float | None, cron: str | None, now: float
    ) -> None:
        """Replace a schedule's timing (one of ``every`` and ``cron``) for every scheduler.

        Atomic, keeps whether it is paused, and sets ``since`` to ``now``.
        """

    @abstractmethod
    def schedule_states(self) -> dict[str, ScheduleState]:
        """Every schedule changed at run time, by name."""

    # -- figures for charts and metrics ----------------------------------------

    @abstractmethod
    def finished_counts(self, since_minute: int) -> list[tuple[int, str, str, str, int]]:
        """Attempts that ended per minute, from ``since_minute`` (Unix time // 60) on.

        Rows of ``(minute, queue, task, outcome, n)``, outcome one of
        ``succeeded``, ``failed``, ``cancelled`` and ``retried``, as counted by
        :meth:`finish`. :meth:`prune` folds the minutes before its cut-off into
        minute 0, which so holds the counts since the store began (for metrics);
        the SQL stores also fold those :data:`FIGURE_MINUTES` older than each depth sample.
        """

    @abstractmethod
    def enqueued_counts(self) -> dict[tuple[str, str], int]:
        """How many jobs were stored since the store began, per ``(queue, task)``.

        Jobs stored by :meth:`enqueue`, :meth:`enqueue_in` (once committed) and
        :meth:`fire_tick`; never decreased: a job whose unique key a live job held
        is not counted, deleted jobs stay counted. A store counts them as it
        stores them (memory, Redis), or as the jobs it holds plus those it deleted,
        noted by :meth:`prune`, :meth:`purge` and :meth:`delete` (the SQL stores:
        no write on the enqueue path; the read scans an index of the jobs).
        """

    @abstractmethod
    def timings(self) -> dict[tuple[str, str, str], Timing]:
        """Histograms since the store began, per ``(timing, queue, task)``, never decreased.

        Both are added atomically with each end of an attempt that
        :meth:`finished_counts` counts, so each histogram's count is theirs:
        ``duration`` from the attempt's start to its end, ``wait`` from the ``eta``
        it was due at to its start. An attempt whose lease was taken over never
        ended, and is in neither. A negative time (clocks apart) counts as 0.
        """

    @abstractmethod
    def sample_depth(self, now: float) -> bool:
        """Record how many jobs each queue holds queued, scheduled and running, once a minute.

        Keyed by the minute of ``now``: the first caller of the minute, in any
        process, stores the sample and gets True; later ones store nothing.
        """

    @abstractmethod
    def depth_samples(self, since_minute: int) -> dict[int, dict[tuple[str, str], int]]:
        """The samples :meth:`sample_depth` stored, ``{minute: {(queue, status): n}}``."""

    # -- housekeeping --------------------------------------------------------

    @abstractmethod
    def fire_tick(self, schedule: str, fire_time: float, job: JobRecord, now: float) -> bool:
        """Record that ``schedule`` fired for ``fire_time`` and enqueue ``job``, atomically.

        True for the first caller only, across every process sharing the store:
        it is what makes a periodic job fire once per tick however many
        schedulers run. The job is enqueued as by :meth:`enqueue` (a live job
        holding its ``unique_key`` means no new job), in the same atomic step,
        so a tick is never recorded without its job.

        Raises :class:`~flask_errands.exceptions.DuplicateJob` when the job's id
        is already stored, and ``BackendUnavailable`` when the store could not
        be reached; either way the tick is not recorded, unless only the reply
        was lost, in which case calling again for the same tick returns False.
        """

    @abstractmethod
    def last_ticks(self) -> dict[str, tuple[float, str | None]]:
        """Return ``{schedule: (latest fire_time, id of the job it enqueued)}``."""

    @abstractmethod
    def prune(self, finished_before: float) -> int:
        """Delete what is older than ``finished_before``; return how many jobs were deleted.

        Deletes: jobs that finished (succeeded, failed or cancelled) before
        ``finished_before``; the depth samples of minutes before it, and their
        per-minute counts (added to minute 0 first); schedule ticks fired
        before it, except the latest tick of each schedule, which is kept so
        missed ticks can be found; and worker registrations that expired at or
        before it. Waiting and running jobs are never deleted. Redis also
        expires finished records by themselves, a day after the result TTL;
        those count as deleted here.
        """

    @abstractmethod
    def purge(
        self, status: str | None = None, queue: str | None = None, before: float | None = None
    ) -> int:
        """Delete jobs that are not running, by state, queue and age; return how many.

        ``before`` compares with when a job finished, or was enqueued if it has not.
        """

    @abstractmethod
    def delete(self, job_id: str) -> bool:
        """Delete one finished (succeeded, failed or cancelled) job; False if none was deleted.

        A waiting or running job is left alone: cancel it first.
        """

    # -- live workers --------------------------------------------------------

    @abstractmethod
    def register_worker(
        self, worker_id: str, info: Mapping[str, Any], ttl: float, now: float
    ) -> None:
        """Say ``worker_id`` is alive for ``ttl`` more seconds, with what it reports of itself."""

    @abstractmethod
    def unregister_worker(self, worker_id: str) -> None:
        """Forget a worker that stopped cleanly."""

    @abstractmethod
    def list_workers(self, now: float) -> list[dict[str, Any]]:
        """Return the info of every worker whose registration has not expired, with ``id``."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections and threads. The backend is not used afterwards."""

    # -- wake-ups ------------------------------------------------------------

    def watch(self, callback: WakeCallback) -> None:
        """Call ``callback`` whenever new work may have become due, from any thread.

        Wake-ups are hints: a callback may be called when nothing is due, and a
        waiting worker still looks for work at its next deadline.
        """
        with self._watchers_lock:
            self._watchers.append(callback)
        self._start_watching()

    def unwatch(self, callback: WakeCallback) -> None:
        """Stop calling ``callback``."""
        with self._watchers_lock:
            if callback in self._watchers:
                self._watchers.remove(callback)

    def _start_watching(self) -> None:
        """Run :meth:`_watch` in a daemon thread, once at a time, if this store has one."""
        if type(self)._watch is Backend._watch:
            return
        with self._watchers_lock:
            if self._watcher is not None and self._watcher.is_alive():
                return
            name = f"errands-{type(self).__name__}-watch"
            self._watcher = threading.Thread(target=self._watch, name=name, daemon=True)
            self._watcher.start()

    def _watch(self) -> None:  # noqa: B027 - optional hook
        """Listen for other processes' work and call :meth:`_notify`, until closed.

        Stores that tell other processes about new work override this; it runs
        in its own thread while anyone watches.
        """

    def _notify(self) -> None:
        for callback in tuple(self._watchers):
            callback()
