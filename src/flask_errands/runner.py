"""Running one attempt of a job: decode, call in the app context, record the outcome."""

from __future__ import annotations

import logging
import random
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from . import serialization, signals
from .backends.base import CANCELLED, FAILED, SCHEDULED, SUCCEEDED, Backend, JobRecord
from .context import RunningJob, _current
from .exceptions import BackendUnavailable, JobCancelled, Retry
from .jobs import Job

if TYPE_CHECKING:
    from flask import Flask

    from .tasks import Task

logger = logging.getLogger("flask_errands")

T = TypeVar("T")

#: The longest pause between two attempts, whatever the back-off says.
MAX_BACKOFF = 3600.0
#: How long a worker keeps trying to record an outcome while the backend is unreachable.
OUTCOME_PATIENCE = 120.0


class JobInterrupt(BaseException):
    """Raised inside a job's thread to stop it (timeout, or a worker giving up on it)."""


def backoff(record: JobRecord) -> float:
    """Exponential back-off with jitter after ``record.attempts`` failed attempts."""
    base: float = min(record.retry_delay * 2.0 ** (record.attempts - 1), MAX_BACKOFF)
    return base * random.uniform(0.5, 1.0)


def no_backoff(record: JobRecord) -> float:
    """Retry at once: what ``ERRANDS_EAGER`` and tests want."""
    return 0.0


class Execution(RunningJob):
    """One attempt in progress: the task's ``current_job``, plus who gets to record its end.

    The thread running the job and the watchdog (timeout, shutdown) race to
    settle it; whichever claims it first writes the outcome, the other's is dropped.
    """

    def __init__(self, record: JobRecord, backend: Backend, now: float) -> None:
        super().__init__(record, backend)
        self.lease_token = record.lease_token or ""
        self.reserved_at = time.monotonic()
        self.deadline: float | None = None
        self.thread_id: int | None = None
        self._settle_lock = threading.Lock()
        self._settled = False
        self._started = False

    @property
    def settled(self) -> bool:
        return self._settled

    @property
    def started(self) -> bool:
        return self._started

    def begin(self, now: float) -> bool:
        """Mark the attempt as started, unless it was settled first; start its timeout."""
        with self._settle_lock:
            if self._settled:
                return False
            self._started = True
            self.thread_id = threading.get_ident()
            if self.record.timeout is not None:
                self.deadline = now + self.record.timeout
            return True

    def claim_unstarted(self) -> bool:
        """Claim an attempt that no thread has begun yet, so none ever will."""
        with self._settle_lock:
            if self._settled or self._started:
                return False
            self._settled = True
            return True

    def claim(self, then: Callable[[], None] | None = None) -> bool:
        """Claim the right to record this attempt's end; run ``then`` while holding it."""
        with self._settle_lock:
            if self._settled:
                return False
            self._settled = True
            if then is not None:
                then()
            return True


class Runner:
    """Runs attempts for one app against one backend; shared by workers, drain and eager mode."""

    def __init__(
        self,
        app: Flask,
        backend: Backend,
        tasks: Mapping[str, Task[Any, Any]],
        *,
        clock: Callable[[], float] = time.time,
        retry_after: Callable[[JobRecord], float] = backoff,
    ) -> None:
        self.app = app
        self.backend = backend
        self.tasks = tasks
        self.clock = clock
        self.retry_after = retry_after

    def start(self, record: JobRecord) -> Execution:
        return Execution(record, self.backend, self.clock())

    def run(self, execution: Execution) -> None:
        """Run one attempt and record its outcome, unless a watchdog settled it first."""
        record = execution.record
        started = time.perf_counter()
        if not execution.begin(self.clock()):
            return  # released before a thread could take it
        if execution.cancel_requested:  # cancelled while reserved ahead, or re-delivered
            self.settle(execution, CANCELLED)
            _log_outcome(execution, time.perf_counter() - started)
            return
        task = self.tasks.get(record.task)
        if task is None:
            self.settle(
                execution,
                FAILED,
                error=f"UnknownTask: no task named {record.task!r} is registered in this app; "
                "deploy the code that defines it, then re-run the job",
            )
            _log_outcome(execution, time.perf_counter() - started)
            return
        with self.app.app_context():
            token = _current.set(execution)
            try:
                if signals.job_started.receivers:
                    signals.job_started.send(self.app, job=Job(record, self.backend))
                payload = serialization.loads(record.payload)
                value = task.func(*payload["args"], **payload["kwargs"])
                result = serialization.dumps(value)
            except JobInterrupt:
                return  # the watchdog that raised it has recorded the outcome
            except Retry as retry:
                delay = self.retry_after(record)
                if retry.delay is not None and self.retry_after is not no_backoff:
                    delay = retry.delay  # under no_backoff (eager mode) even this one is at once
                self.settle(execution, SCHEDULED, error=_describe(retry), delay=delay)
            except JobCancelled:
                self.settle(execution, CANCELLED)
            except BaseException as exc:  # SystemExit, CancelledError too: fail, keep the thread
                self.fail(execution, exc)
            else:
                status = CANCELLED if execution.cancel_requested else SUCCEEDED
                self.settle(execution, status, result=result)
            finally:
                _current.reset(token)
                execution.thread_id = None
        _log_outcome(execution, time.perf_counter() - started)

    def fail(self, execution: Execution, exc: BaseException) -> None:
        """Record a failed attempt: retried later while attempts remain, else failed."""
        record = execution.record
        error = _describe(exc)
        trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        trace = serialization.storable_text(trace)
        if execution.cancel_requested:
            self.settle(execution, CANCELLED, error=error, trace=trace)
        elif record.attempts < record.max_attempts:
            self.settle(
                execution, SCHEDULED, error=error, trace=trace, delay=self.retry_after(record)
            )
        else:
            self.settle(execution, FAILED, error=error, trace=trace)

    def settle(
        self,
        execution: Execution,
        status: str,
        *,
        result: str | None = None,
        error: str | None = None,
        trace: str | None = None,
        delay: float | None = None,
    ) -> bool:
        """Write the attempt's outcome if nobody else has; send the matching signal."""
        if not execution.claim():
            return False
        return self.record_outcome(
            execution, status, result=result, error=error, trace=trace, delay=delay
        )

    def record_outcome(
        self,
        execution: Execution,
        status: str,
        *,
        result: str | None = None,
        error: str | None = None,
        trace: str | None = None,
        delay: float | None = None,
    ) -> bool:
        """Write the outcome of an attempt already claimed; send the matching signal."""
        record = execution.record
        if status == SCHEDULED and not execution.cancel_requested:
            # A cancel may have come in since the last heartbeat: never retry past it.
            latest = _persist(lambda: self.backend.get(record.id), record)
            if latest is not None and latest.cancel_requested:
                execution.request_cancel()
        if status == SCHEDULED and execution.cancel_requested:
            status, delay = CANCELLED, None
        now = self.clock()
        eta = None if delay is None else now + delay
        applied = _persist(
            lambda: self.backend.finish(
                record.id,
                execution.lease_token,
                status,
                now,
                result=result,
                error=error,
                traceback=trace,
                eta=eta,
            ),
            record,
        )
        record.status, record.result, record.error, record.traceback = status, result, error, trace
        if applied:
            signal = _SIGNALS.get(status)
            if signal is not None and signal.receivers:
                job = Job(record, self.backend)
                extra: dict[str, Any] = {"error": error} if error else {}
                signal.send(self.app, job=job, **extra)
        return applied


def _persist(write: Callable[[], T], record: JobRecord) -> T:
    """Retry an outcome write while the backend is unreachable, rather than drop the outcome.

    The job stays leased meanwhile (its worker keeps heartbeating), so giving up
    early would only make a finished job run again after its lease.
    """
    deadline = time.monotonic() + OUTCOME_PATIENCE
    pause = 0.1
    while True:
        try:
            return write()
        except BackendUnavailable as exc:
            if time.monotonic() > deadline:
                raise
            logger.warning(
                "%s %s: cannot record the outcome yet (%s); retrying in %.1fs",
                record.task,
                record.id,
                exc,
                pause,
                extra={"job_id": record.id, "task": record.task},
            )
            time.sleep(pause)
            pause = min(pause * 2, 5.0)


_SIGNALS = {
    SUCCEEDED: signals.job_succeeded,
    FAILED: signals.job_failed,
    SCHEDULED: signals.job_retrying,
}


def _describe(exc: BaseException) -> str:
    message = serialization.storable_text(str(exc))
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _log_outcome(execution: Execution, duration: float) -> None:
    record = execution.record
    level = logging.INFO if record.status in (SUCCEEDED, CANCELLED) else logging.WARNING
    outcome = record.status if record.status != SCHEDULED else "failed, will retry"
    detail = f": {record.error}" if record.error else ""
    logger.log(
        level,
        "%s %s %s after %.3fs (attempt %d)%s",
        record.task,
        record.id,
        outcome,
        duration,
        record.attempts,
        detail,
        extra={"job_id": record.id, "task": record.task},
    )
