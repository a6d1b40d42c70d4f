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
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from ..status import FINISHED, LIVE, STATUSES, WAITING, JobStatus

QUEUED = JobStatus.QUEUED
SCHEDULED = JobStatus.SCHEDULED
RUNNING = JobStatus.RUNNING
SUCCEEDED = JobStatus.SUCCEEDED
FAILED = JobStatus.FAILED
CANCELLED = JobStatus.CANCELLED

__all__ = [
    "CANCELLED",
    "FAILED",
    "FINISHED",
    "LIVE",
    "QUEUED",
    "RUNNING",
    "SCHEDULED",
    "STATUSES",
    "SUCCEEDED",
    "WAITING",
    "Backend",
    "Cursor",
    "JobRecord",
    "JobStatus",
]

#: How many leases in a row a job may lose (its worker died running it) before it fails.
DEFAULT_MAX_LOST_LEASES = 3
#: The error of a job that failed so: each store fills in the fields as it fails the job.
WORKER_LOST_ERROR = (
    "WorkerLost: worker {worker} died while running attempt {attempt} (its lease expired); "
    "the job lost {lost} leases in a row, so it is not run again"
)

logger = logging.getLogger("flask_errands")


@dataclasses.dataclass
class JobRecord:
    """A job as storage keeps it: plain values only, payload and result as JSON text."""

    id: str
    task: str
    payload: str
    queue: str = "default"
    priority: int = 0
    status: JobStatus = QUEUED
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

    @classmethod
    def from_mapping(cls, row: Mapping[str, Any]) -> JobRecord:
        """Build a record from a row or hash whose keys are field names."""
        record = cls(**{f.name: row[f.name] for f in FIELDS if f.name in row})
        record.status = JobStatus(record.status)
        return record

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


FIELDS = dataclasses.fields(JobRecord)
FIELD_NAMES = tuple(f.name for f in FIELDS)


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
        self._watchers: list[WakeCallback] = []
        self._watchers_lock = threading.Lock()
        self._watcher: threading.Thread | None = None

    # -- life of a job -------------------------------------------------------

    @abstractmethod
    def enqueue(self, jobs: Sequence[JobRecord]) -> list[JobRecord]:
        """Store new jobs in one atomic step and return what was stored, in order.

        A job whose ``unique_key`` belongs to a live (queued, scheduled or
        running) job is not stored; the live job's record takes its place in
        the result. Either every job is stored or none is, and the call raises.

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

        Claiming an expired lease adds one to the job's ``lost_leases``. A job
        that reaches ``max_lost_leases`` that way is not claimed but failed, in
        the same atomic step, with :data:`WORKER_LOST_ERROR` and no traceback:
        a task that kills its worker each time must not loop for ever. It is
        not returned, and may count against ``limit``.
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
        """

    @abstractmethod
    def release(self, job_id: str, lease_token: str, now: float) -> bool:
        """Give a running job back to its queue as if this attempt never started.

        Used on a graceful stop for jobs that could not finish in time: the
        job is queued again with its attempt count restored and ``lost_leases`` reset.
        """

    @abstractmethod
    def cancel(self, job_id: str, now: float) -> JobRecord | None:
        """Cancel a job: a waiting one never starts; a running one is asked to stop.

        Returns the job as it is afterwards, or None when there is no such job.
        A finished job is returned unchanged.
        """

    @abstractmethod
    def requeue(self, job_id: str, now: float) -> JobRecord | None:
        """Run a finished (failed, cancelled or succeeded) job again under the same id.

        The job is queued with its attempts, lost leases, result and error cleared. Returns
        the job afterwards (unchanged if it is still live), or None if unknown.
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
    def counts(self) -> dict[tuple[str, str], int]:
        """Return the number of jobs per ``(queue, status)``."""

    @abstractmethod
    def next_eta(self, queues: Sequence[str] | None) -> float | None:
        """Return the earliest ``eta`` among waiting jobs of these queues, or None."""

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
        ``finished_before``; schedule ticks fired before it, except the latest
        tick of each schedule, which is kept so missed ticks can be found; and
        worker registrations that expired at or before it. Waiting and running
        jobs are never deleted. Redis also expires finished records by
        themselves, a day after the result TTL; those count as deleted here.
        """

    @abstractmethod
    def purge(
        self, status: str | None = None, queue: str | None = None, before: float | None = None
    ) -> int:
        """Delete jobs that are not running, by state, queue and age; return how many.

        ``before`` compares with when a job finished, or was enqueued if it has not.
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
