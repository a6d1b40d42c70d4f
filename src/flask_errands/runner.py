"""Running one attempt of a job: decode, call in the app context, record the outcome."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from . import aio, serialization, signals
from .backends.base import CANCELLED, FAILED, SCHEDULED, SUCCEEDED, Backend, Flow, JobRecord
from .backends.patience import forget_interrupt
from .context import RunningJob, _current
from .exceptions import BackendUnavailable, JobCancelled, Retry
from .jobs import Job
from .outcomes import Decision, Ending, decide

if TYPE_CHECKING:
    from flask import Flask

    from .tasks import Task
    from .tracing import Tracing

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
        self._coroutine: asyncio.Task[Any] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._settled = False
        self._started = False
        #: How the attempt ended, once :meth:`Runner.conclude` settled it (for its trace).
        self.outcome: Outcome | None = None

    @property
    def settled(self) -> bool:
        return self._settled

    @property
    def started(self) -> bool:
        return self._started

    def begin(self, now: float, *, thread: bool = True) -> bool:
        """Mark the attempt as started, unless it was settled first; start its timeout.

        ``thread=False`` for a coroutine, which is stopped by cancelling it instead.
        """
        with self._settle_lock:
            if self._settled:
                return False
            self._started = True
            self.thread_id = threading.get_ident() if thread else None
            if self.record.timeout is not None:
                self.deadline = now + self.record.timeout
            return True

    def attach(self, coroutine: asyncio.Task[Any] | None) -> None:
        """Say which asyncio task awaits the job's coroutine, so it can be cancelled."""
        self._coroutine = coroutine
        self._loop = asyncio.get_running_loop()
        if self.cancel_requested:
            self.cancel_coroutine()

    def detach(self) -> None:
        """The coroutine has ended: nothing is left to cancel."""
        self._coroutine = None

    def cancel_coroutine(self) -> None:
        """Cancel the job's coroutine, from any thread, if it is still being awaited."""
        coroutine, loop = self._coroutine, self._loop
        if coroutine is None or loop is None:
            return

        def cancel() -> None:
            if self._coroutine is coroutine:  # not once it awaits the outcome's write
                coroutine.cancel()

        loop.call_soon_threadsafe(cancel)

    def request_cancel(self) -> None:
        """Ask the task to stop; a coroutine is cancelled, a thread sees ``cancel_requested``."""
        super().request_cancel()
        self.cancel_coroutine()

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


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How an attempt ended and what it left: the input of :meth:`Runner.conclude`."""

    ending: Ending
    result: str | None = None
    error: str | None = None
    trace: str | None = None
    requested_delay: float | None = None
    #: What the task raised, for the attempt's trace span.
    exception: BaseException | None = None


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
        tracing: Tracing | None = None,
    ) -> None:
        self.app = app
        self.backend = backend
        self.tasks = tasks
        self.clock = clock
        self.backoff = backoff
        self.tracing = tracing

    def start(self, record: JobRecord) -> Execution:
        return Execution(record, self.backend, self.clock())

    def has_async_tasks(self) -> bool:
        """Whether any task of the app is an ``async def`` function."""
        return any(task.is_async for task in self.tasks.values())

    def is_async(self, record: JobRecord) -> bool:
        """Whether the job's task is an ``async def`` function, to run on an event loop."""
        task = self.tasks.get(record.task)
        return task is not None and task.is_async

    def run(self, execution: Execution) -> None:
        """Run one attempt and record its outcome, unless a watchdog settled it first.

        An ``async def`` task runs here to its end on a private event loop (eager
        mode, ``drain()``); a worker runs it on its process's loop with :meth:`run_async`.
        """
        record = execution.record
        if self.is_async(record):
            aio.run_here(self.run_async(execution))
            return
        started = time.perf_counter()
        if not execution.begin(self.clock()):
            return  # released before a thread could take it
        with self._traced(execution):
            task = self.tasks.get(record.task)
            decision = self._refuse(execution, task)
            if decision is None and task is not None:
                decision = self._call(execution, task)
        if decision is not None:  # else a watchdog settled it and logs it
            _log_outcome(execution, decision, time.perf_counter() - started)

    async def run_async(self, execution: Execution) -> None:
        """Run one attempt of an ``async def`` task on the running loop, as :meth:`run` does.

        Its timeout and a cancel request cancel the coroutine. Store calls run in
        the loop's executor, so a slow store never holds up the other coroutines.
        """
        started = time.perf_counter()
        if not execution.begin(self.clock(), thread=False):
            return
        with self._traced(execution):
            task = self.tasks[execution.record.task]
            decision = await asyncio.to_thread(self._refuse, execution, task)
            if decision is None:
                decision = await self._await(execution, task)
        if decision is not None:
            _log_outcome(execution, decision, time.perf_counter() - started)

    def _traced(self, execution: Execution) -> contextlib.AbstractContextManager[None]:
        """The attempt's trace span, when tracing is on (see :mod:`~flask_errands.tracing`)."""
        if self.tracing is None:
            return _UNTRACED
        return self.tracing.attempt(execution)

    def _refuse(self, execution: Execution, task: Task[Any, Any] | None) -> Decision | None:
        """End an attempt that must not call its task: cancelled already, or task unknown."""
        if execution.cancel_requested:  # cancelled while reserved ahead, or re-delivered
            return self.conclude(execution, Outcome(Ending.CANCELLED))
        if task is None:
            error = (
                f"UnknownTask: no task named {execution.record.task!r} is registered in this "
                "app; deploy the code that defines it, then re-run the job"
            )
            return self.conclude(execution, Outcome(Ending.REFUSED, error=error))
        return None

    def _call(self, execution: Execution, task: Task[Any, Any]) -> Decision | None:
        """Call the task in the app context; return what was decided, or None if interrupted."""
        with self.app.app_context():
            token = _current.set(execution)
            try:
                args, kwargs = self._arguments(execution)
                outcome = Outcome(Ending.RETURNED, serialization.dumps(task.func(*args, **kwargs)))
            except JobInterrupt:
                return None
            except BaseException as exc:  # SystemExit, CancelledError too: fail, keep the thread
                outcome = _failure(exc)
            finally:
                _current.reset(token)
                execution.thread_id = None
                forget_interrupt()
            return self.conclude(execution, outcome)

    async def _await(self, execution: Execution, task: Task[Any, Any]) -> Decision | None:
        """Await the coroutine in the app context under its timeout; None if a watchdog won.

        The coroutine runs as an asyncio task of its own, which its timeout and a
        cancel request cancel. At its timeout the attempt ends as timed out even if
        the coroutine swallows the cancellation: it gets ``aio.STOP_PATIENCE`` to
        end, then is left behind, and the loop's stop cancels it again.
        """
        timeout = execution.record.timeout
        with self.app.app_context():
            token = _current.set(execution)
            try:
                args, kwargs = await asyncio.to_thread(self._arguments, execution)
                running = asyncio.ensure_future(task.func(*args, **kwargs))
                execution.attach(running)
                expired = False
                try:
                    done, _ = await asyncio.wait({running}, timeout=timeout)
                    if not done:
                        expired = True
                        running.cancel()
                        done, _ = await asyncio.wait({running}, timeout=aio.STOP_PATIENCE)
                finally:
                    execution.detach()
                if expired:
                    if not done:
                        _warn_left_behind(execution)
                    elif not running.cancelled():
                        running.exception()  # seen, so asyncio does not log it as unretrieved
                    outcome = Outcome(Ending.TIMED_OUT, error=timeout_error(timeout))
                else:
                    outcome = Outcome(Ending.RETURNED, serialization.dumps(running.result()))
            except asyncio.CancelledError as exc:
                if execution.settled:  # timed out or released by the worker, which records it
                    return None
                if execution.cancel_requested:
                    outcome = Outcome(Ending.CANCELLED)
                else:
                    outcome = _failure(exc)
            except BaseException as exc:
                outcome = _failure(exc)
            finally:
                _current.reset(token)
            return await asyncio.to_thread(self.conclude, execution, outcome)

    def _arguments(self, execution: Execution) -> tuple[list[Any], dict[str, Any]]:
        """Announce the start and decode the call's arguments."""
        record = execution.record
        if signals.job_started.receivers:
            signals.job_started.send(self.app, job=Job(record, self.backend))
        payload = serialization.loads(record.payload)
        args: list[Any] = payload["args"]
        if record.flow is not None:
            flow = Flow.loads(record.flow)
            if flow.inputs or flow.gather:
                args = [self._inputs(record, flow), *args]
        return args, payload["kwargs"]

    def _inputs(self, record: JobRecord, flow: Flow) -> Any:
        """A workflow step's first argument: its upstream result, or their list in order."""
        stored = self.backend.step_inputs(record.id)
        missing = [position for position in range(flow.inputs) if position not in stored]
        if missing:
            raise RuntimeError(
                f"workflow step {record.id} started without the results of "
                f"{len(missing)} of its {flow.inputs} upstream steps"
            )
        values = [serialization.loads(stored[position]) for position in range(flow.inputs)]
        return values if flow.gather else values[0]

    def conclude(
        self, execution: Execution, outcome: Outcome, *, claimed: bool = False
    ) -> Decision | None:
        """Decide the attempt's outcome and write it; None if someone else settled it first.

        ``claimed`` says the caller (a watchdog) has already claimed the attempt.
        """
        record = execution.record
        if not claimed and not execution.claim():
            return None
        execution.outcome = outcome
        ending, requested_delay = outcome.ending, outcome.requested_delay
        result, error, trace = outcome.result, outcome.error, outcome.trace
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


#: The context of an attempt nobody traces: one object, entered and left at no cost.
_UNTRACED = contextlib.nullcontext()

_SIGNALS = {
    SUCCEEDED: signals.job_succeeded,
    FAILED: signals.job_failed,
    SCHEDULED: signals.job_retrying,
}


def _failure(exc: BaseException) -> Outcome:
    """The outcome of an attempt that raised ``exc``."""
    if isinstance(exc, Retry):
        return Outcome(Ending.RETRY_REQUESTED, error=_describe(exc), requested_delay=exc.delay)
    if isinstance(exc, JobCancelled):
        return Outcome(Ending.CANCELLED)
    trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    text = serialization.storable_text(trace)
    return Outcome(Ending.RAISED, error=_describe(exc), trace=text, exception=exc)


def _warn_left_behind(execution: Execution) -> None:
    """Say that a coroutine swallowed the cancellation at its timeout and still runs."""
    logger.warning(
        "%s %s ignored its cancellation at its timeout of %gs: the attempt ends timed out, "
        "the coroutine is left running on the event loop until the worker stops",
        execution.task,
        execution.id,
        execution.record.timeout or 0,
        extra={"job_id": execution.id, "task": execution.task},
    )


def timeout_error(timeout: float | None) -> str:
    """The error of an attempt stopped at its timeout."""
    return f"TimeoutError: job exceeded its timeout of {timeout or 0:g}s"


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
