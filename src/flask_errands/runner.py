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
from .backends.patience import forget_interrupt
from .context import RunningJob, _current
from .exceptions import BackendUnavailable, JobCancelled, Retry
from .jobs import Job
from .outcomes import Decision, Ending, decide

if TYPE_CHECKING:
    from flask import Flask

    from .tasks import Task

logger = logging.getLogger("flask_errands")

T = TypeVar("T")

#: How long a worker keeps trying to record an outcome while the backend is unreachable.
OUTCOME_PATIENCE = 120.0


class JobInterrupt(BaseException):
    """Raised inside a job's thread to stop it (timeout, or a worker giving up on it)."""


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
    """Runs attempts for one app against one backend; shared by workers, drain and eager mode.

    ``backoff=False`` retries at once instead of after the back-off: eager mode
    and ``drain(backoff=False)`` use it, so a test of a retrying task never sleeps.
    """

    def __init__(
        self,
        app: Flask,
        backend: Backend,
        tasks: Mapping[str, Task[Any, Any]],
        *,
        clock: Callable[[], float] = time.time,
        backoff: bool = True,
    ) -> None:
        self.app = app
        self.backend = backend
        self.tasks = tasks
        self.clock = clock
        self.backoff = backoff

    def start(self, record: JobRecord) -> Execution:
        return Execution(record, self.backend, self.clock())

    def run(self, execution: Execution) -> None:
        """Run one attempt and record its outcome, unless a watchdog settled it first."""
        record = execution.record
        started = time.perf_counter()
        if not execution.begin(self.clock()):
            return  # released before a thread could take it
        task = self.tasks.get(record.task)
        if execution.cancel_requested:  # cancelled while reserved ahead, or re-delivered
            decision = self.conclude(execution, Ending.CANCELLED)
        elif task is None:
            decision = self.conclude(
                execution,
                Ending.REFUSED,
                error=f"UnknownTask: no task named {record.task!r} is registered in this app; "
                "deploy the code that defines it, then re-run the job",
            )
        else:
            decision = self._call(execution, task)
        if decision is not None:  # else a watchdog settled it and logs it
            _log_outcome(execution, decision, time.perf_counter() - started)

    def _call(self, execution: Execution, task: Task[Any, Any]) -> Decision | None:
        """Call the task in the app context; return what was decided, or None if interrupted."""
        record = execution.record
        with self.app.app_context():
            token = _current.set(execution)
            try:
                if signals.job_started.receivers:
                    signals.job_started.send(self.app, job=Job(record, self.backend))
                payload = serialization.loads(record.payload)
                value = task.func(*payload["args"], **payload["kwargs"])
                result = serialization.dumps(value)
            except JobInterrupt:
                return None
            except Retry as retry:
                return self.conclude(
                    execution,
                    Ending.RETRY_REQUESTED,
                    error=_describe(retry),
                    requested_delay=retry.delay,
                )
            except JobCancelled:
                return self.conclude(execution, Ending.CANCELLED)
            except BaseException as exc:  # SystemExit, CancelledError too: fail, keep the thread
                trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
                trace = serialization.storable_text(trace)
                return self.conclude(execution, Ending.RAISED, error=_describe(exc), trace=trace)
            else:
                return self.conclude(execution, Ending.RETURNED, result=result)
            finally:
                _current.reset(token)
                execution.thread_id = None
                forget_interrupt()

    def conclude(
        self,
        execution: Execution,
        ending: Ending,
        *,
        result: str | None = None,
        error: str | None = None,
        trace: str | None = None,
        requested_delay: float | None = None,
        claimed: bool = False,
    ) -> Decision | None:
        """Decide the attempt's outcome and write it; None if someone else settled it first.

        ``claimed`` says the caller (a watchdog) has already claimed the attempt.
        """
        record = execution.record
        if not claimed and not execution.claim():
            return None
        decision = self.decide(execution, ending, requested_delay)
        if decision.retrying:
            # A cancel may have come in since the last heartbeat: never retry past it.
            latest = _persist(lambda: self.backend.get(record.id), record)
            if latest is not None and latest.cancel_requested:
                execution.request_cancel()
                decision = self.decide(execution, ending, requested_delay)
        now = self.clock()
        status = decision.status
        eta = None if decision.delay is None else now + decision.delay
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
        return decision

    def decide(
        self, execution: Execution, ending: Ending, requested_delay: float | None = None
    ) -> Decision:
        """The outcome rule (:func:`~flask_errands.outcomes.decide`) applied to this attempt."""
        record = execution.record
        return decide(
            ending,
            attempts=record.attempts,
            max_attempts=record.max_attempts,
            cancel_requested=execution.cancel_requested,
            retry_delay=record.retry_delay,
            requested_delay=requested_delay,
            backoff=self.backoff,
            jitter=1.0 if ending is Ending.RETURNED else random.uniform(0.5, 1.0),
        )


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


def _log_outcome(execution: Execution, decision: Decision, duration: float) -> None:
    status = decision.status
    level = logging.INFO if status in (SUCCEEDED, CANCELLED) else logging.WARNING
    if not logger.isEnabledFor(level):
        return
    record = execution.record
    if decision.retrying:
        outcome = f"failed after {duration:.3f}s (attempt {record.attempts}), "
        outcome += f"will retry in {decision.delay or 0.0:.1f}s"
    else:
        outcome = f"{status} after {duration:.3f}s (attempt {record.attempts})"
    detail = f": {record.error}" if record.error else ""
    logger.log(
        level,
        "%s %s %s%s",
        record.task,
        record.id,
        outcome,
        detail,
        extra={"job_id": record.id, "task": record.task},
    )
