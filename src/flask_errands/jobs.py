"""``Job``: a handle on an enqueued job that any process sharing the backend can poll."""

from __future__ import annotations

import datetime as dt
import time
from typing import TYPE_CHECKING, Any

from . import serialization
from .backends.base import BLOCKED, CANCELLED, FAILED, FINISHED, SUCCEEDED, Flow, JobRecord
from .exceptions import ErrandsError, JobCancelled, JobFailed
from .status import BY_VALUE, JobStatus

if TYPE_CHECKING:
    from .backends.base import Backend


def _datetime(timestamp: float | None) -> dt.datetime | None:
    return None if timestamp is None else dt.datetime.fromtimestamp(timestamp, dt.timezone.utc)


class Job:
    """A job's state as last read from the backend; :meth:`refresh` reads it again."""

    def __init__(self, record: JobRecord, backend: Backend) -> None:
        self._record = record
        self._backend = backend

    @property
    def id(self) -> str:
        return self._record.id

    @property
    def task(self) -> str:
        """The task's name, by default ``module.qualname`` of its function."""
        return self._record.task

    @property
    def status(self) -> JobStatus:
        """Where the job is; ``pending`` until the transaction it was enqueued in commits."""
        return BY_VALUE[self._record.status]

    @property
    def queue(self) -> str:
        return self._record.queue

    @property
    def priority(self) -> int:
        return self._record.priority

    @property
    def attempts(self) -> int:
        """Attempts started so far; the first run is attempt 1."""
        return self._record.attempts

    @property
    def max_attempts(self) -> int:
        return self._record.max_attempts

    @property
    def progress(self) -> float | None:
        return self._record.progress

    @property
    def progress_message(self) -> str | None:
        return self._record.progress_message

    @property
    def error(self) -> str | None:
        """``"ValueError: message"`` for a failed attempt, or None."""
        return self._record.error

    @property
    def traceback(self) -> str | None:
        return self._record.traceback

    @property
    def worker_id(self) -> str | None:
        """The worker that runs or last ran the job (``host:pid:random``), or None."""
        return self._record.worker_id

    @property
    def cancel_requested(self) -> bool:
        return self._record.cancel_requested

    @property
    def upstream_steps(self) -> int:
        """How many workflow steps pass this one their result: 0 for a first step or a lone job."""
        flow = self._record.flow
        return 0 if flow is None else Flow.loads(flow).inputs

    @property
    def waiting_for(self) -> int:
        """How many of its :attr:`upstream_steps` a ``blocked`` step still waits for (else 0)."""
        return self._record.blocked_by if self._record.status == BLOCKED else 0

    @property
    def args(self) -> tuple[Any, ...]:
        return tuple(serialization.loads(self._record.payload)["args"])

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(serialization.loads(self._record.payload)["kwargs"])

    @property
    def enqueued_at(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self._record.enqueued_at, dt.timezone.utc)

    @property
    def scheduled_for(self) -> dt.datetime:
        """When the job is (or was) due to start."""
        return dt.datetime.fromtimestamp(self._record.eta, dt.timezone.utc)

    @property
    def started_at(self) -> dt.datetime | None:
        return _datetime(self._record.started_at)

    @property
    def finished_at(self) -> dt.datetime | None:
        return _datetime(self._record.finished_at)

    def _become(self, stored: Job) -> None:
        """Take the state and store of ``stored``: this job, held until a commit, now stored."""
        self._record, self._backend = stored._record, stored._backend

    def refresh(self) -> Job:
        """Read the job's current state from the backend; returns the job itself.

        A job still ``pending`` (its transaction has not committed) stays so.
        """
        record = self._backend.get(self.id)
        if record is not None:
            self._record = record
        return self

    def cancel(self) -> Job:
        """Cancel the job: a waiting one never starts, a running one sees ``cancel_requested``."""
        record = self._backend.cancel(self.id, time.time())
        if record is not None:
            self._record = record
        return self

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the job to finish and return its value.

        Raises :class:`JobFailed` (with the remote type, message and traceback),
        :class:`JobCancelled`, or ``TimeoutError`` after ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.002
        while self._record.status not in FINISHED:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise TimeoutError(f"job {self.id} did not finish within {timeout}s")
            time.sleep(pause if remaining is None else min(pause, remaining))
            pause = min(pause * 1.5, 0.1)
            record = self._backend.get(self.id)
            if record is None:
                raise ErrandsError(
                    f"job {self.id} is not stored: the transaction it was enqueued in has not "
                    "committed, or was rolled back"
                    if self.status == JobStatus.PENDING
                    else f"job {self.id} no longer exists (pruned or purged)"
                )
            self._record = record
        record = self._record
        if record.status == SUCCEEDED:
            return None if record.result is None else serialization.loads(record.result)
        if record.status == FAILED:
            exc_type, _, message = (record.error or "Error").partition(": ")
            raise JobFailed(record.id, exc_type, message, record.traceback)
        assert record.status == CANCELLED
        raise JobCancelled(record.id)

    def to_dict(self) -> dict[str, Any]:
        """The job as JSON-ready data, for a status endpoint."""
        record = self._record
        data: dict[str, Any] = {
            "id": record.id,
            "task": record.task,
            "status": self.status.value,
            "queue": record.queue,
            "priority": record.priority,
            "attempts": record.attempts,
            "max_attempts": record.max_attempts,
            "progress": record.progress,
            "progress_message": record.progress_message,
            "error": record.error,
            "enqueued_at": self.enqueued_at.isoformat(),
            "scheduled_for": self.scheduled_for.isoformat(),
            "started_at": _isoformat(self.started_at),
            "finished_at": _isoformat(self.finished_at),
            "worker_id": record.worker_id,
            "upstream_steps": self.upstream_steps,
            "waiting_for": self.waiting_for,
        }
        if record.status == SUCCEEDED and record.result is not None:
            data["result"] = serialization.to_plain(serialization.loads(record.result))
        return data

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Job) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def __repr__(self) -> str:
        return f"<Job {self.task} {self.id} {self.status.value}>"


def _isoformat(value: dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat()
