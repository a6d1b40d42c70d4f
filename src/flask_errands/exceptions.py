"""Exceptions raised by flask-errands.

::

    ErrandsError
    ├── ConfigurationError      (also ValueError)
    ├── PayloadTooLarge         (also ValueError)
    ├── DuplicateJob            (also ValueError)
    ├── BackendUnavailable
    │   └── EnqueueError
    ├── UnknownTask
    ├── JobNotFound             (also LookupError)
    ├── ScheduleNotFound        (also LookupError)
    ├── JobFailed
    └── JobCancelled

    Retry                        (raised by a task to ask for another attempt)

An argument that JSON cannot carry (an unsupported type, a value nested
deeper than 100 levels or containing itself, a string with a lone surrogate)
raises the built-in ``TypeError`` at ``.delay()`` naming the task and the
argument, as Python does for any call with a wrong argument. An option out of
its range (a NaN delay, a priority beyond 32 bits, an empty queue name) raises
``ValueError`` naming the limit, and an unknown option name ``TypeError``.
"""

from __future__ import annotations

import datetime as dt
import math


class ErrandsError(Exception):
    """Base class of every error flask-errands raises."""


class ConfigurationError(ErrandsError, ValueError):
    """A setting, URL or schedule is invalid; the message says which and why."""


class PayloadTooLarge(ErrandsError, ValueError):
    """Encoded arguments are larger than ``ERRANDS_MAX_PAYLOAD``."""


class DuplicateJob(ErrandsError, ValueError):
    """A job with this id is already stored; nothing was stored by the call that raised."""


class BackendUnavailable(ErrandsError):
    """The backend could not be reached or refused the operation."""


class EnqueueError(BackendUnavailable):
    """``.delay()`` could not confirm the job was stored, so it hands out no job.

    Nearly always nothing was stored. When the store's reply was lost and even
    asking again failed, the message says the job "may or may not have been
    enqueued" and names its id, to look up before enqueueing it again.
    """


class UnknownTask(ErrandsError):
    """A task name that no task of this app is registered under (``Admin.enqueue``)."""


class JobNotFound(ErrandsError, LookupError):
    """No job has this id in the app's store (it never existed, or was pruned)."""


class ScheduleNotFound(ErrandsError, LookupError):
    """No schedule of this app has this name (``Admin`` schedule actions)."""


class JobFailed(ErrandsError):
    """The job ended in failure; carries the remote exception's type, message and traceback."""

    def __init__(self, job_id: str, exc_type: str, message: str, traceback: str | None) -> None:
        super().__init__(f"{exc_type}: {message}" if message else exc_type)
        self.job_id = job_id
        self.exc_type = exc_type
        self.message = message
        self.traceback = traceback


class JobCancelled(ErrandsError):
    """The job was cancelled before it could produce a result."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id} was cancelled")
        self.job_id = job_id


class Retry(Exception):
    """Raised inside a task to schedule another attempt after ``delay`` seconds.

    An explicit ``Retry`` is always honoured, whatever the task's ``retries``;
    bound it with ``current_job.attempt`` where a loop is possible.
    """

    def __init__(self, delay: float | dt.timedelta | None = None, message: str = "") -> None:
        super().__init__(message or "retry requested")
        if isinstance(delay, dt.timedelta):
            delay = delay.total_seconds()
        if delay is not None and (
            isinstance(delay, bool) or not isinstance(delay, int | float) or math.isnan(delay)
        ):
            raise ValueError(f"Retry(delay=...) takes seconds or a timedelta, not {delay!r}")
        #: Seconds until the next attempt (a negative one means now), or None for the back-off.
        self.delay = None if delay is None else float(delay)
