"""``current_job``: the job the current thread is running, as its task sees it."""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING, cast

from werkzeug.local import LocalProxy

from .serialization import storable_text

if TYPE_CHECKING:
    from .backends.base import Backend, JobRecord


class RunningJob:
    """What a task knows of its own job: id, attempt, progress and cancellation."""

    def __init__(self, record: JobRecord, backend: Backend) -> None:
        self.id = record.id
        self.task = record.task
        self.attempt = record.attempts
        self.record = record
        self._backend = backend
        # A plain flag, set from the worker's thread: an Event per job cost more than the
        # rest of starting it, and nothing ever waits on it.
        self._cancel = bool(record.cancel_requested)

    @property
    def cancel_requested(self) -> bool:
        """True once someone has asked to cancel this job; stop early when you see it."""
        return self._cancel

    def set_progress(self, fraction: float, message: str | None = None) -> None:
        """Record how far the job has come (0 to 1) and what it is doing, for pollers."""
        if isinstance(fraction, bool) or not isinstance(fraction, int | float):
            raise TypeError(f"progress must be a number from 0 to 1, not {fraction!r}")
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"progress must be between 0 and 1, not {fraction!r}")
        if message is not None:
            message = storable_text(str(message))
        self._backend.set_progress(self.id, float(fraction), message)

    def request_cancel(self) -> None:
        self._cancel = True

    def __repr__(self) -> str:
        return f"<RunningJob {self.task} {self.id} attempt {self.attempt}>"


_current: ContextVar[RunningJob] = ContextVar("errands.current_job")

current_job: RunningJob = cast(
    "RunningJob",
    LocalProxy(_current, unbound_message="current_job is only available inside a running task."),
)
