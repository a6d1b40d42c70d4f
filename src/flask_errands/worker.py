"""The worker: reserves due jobs under a lease and runs them on a pool of threads.

One dispatcher thread reserves as many jobs as there are idle threads (and,
while jobs are short, a batch ahead of them), keeps their leases alive, stops
jobs past their timeout, and sleeps until the backend says new work may be
due. ``run_once()`` is one step of that loop, so tests can drive it without
threads. Jobs of ``async def`` tasks run as coroutines on the process's event
loop (``aio``), up to ``async_concurrency`` at once, beside the threads.
"""

from __future__ import annotations

import ctypes
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from functools import partial

from . import aio
from .backends.base import DEFAULT_MAX_LOST_LEASES, minute_of
from .backends.patience import interrupt, limited
from .exceptions import BackendUnavailable
from .outcomes import Ending
from .runner import Execution, JobInterrupt, Outcome, Runner, logger, timeout_error

#: How often a reserved job's lease is extended and its cancellation checked, at most.
HEARTBEAT_INTERVAL = 1.0
#: The longest the dispatcher sleeps without looking for due work.
IDLE_WAIT = 1.0
#: How often finished jobs older than the result TTL are pruned.
PRUNE_INTERVAL = 60.0
#: Jobs shorter than this on average are reserved ahead, a batch per claim.
PREFETCH_BELOW = 0.05
#: A job reserved ahead that has waited this long for a thread goes back to its queue.
HOLD_BACK_LIMIT = 0.5
#: How often a worker tells the backend it is alive; it drops off after three missed.
REGISTER_INTERVAL = 5.0
#: With hard timeouts, how long a timed-out job may ignore its interrupt before the worker quits.
STUCK_AFTER = 2.0
#: The longest pause between two tries at a backend that cannot be reached.
MAX_RECONNECT_PAUSE = 10.0
#: How long one store call of the dispatcher retries a lost connection before the outage
#: is reported (the dispatcher then keeps trying, and stops at once when asked).
STORE_PATIENCE = 1.0


def new_worker_id() -> str:
    """An id that says where the worker runs: ``host:pid:random``."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Worker:
    """A pool of ``concurrency`` threads running one app's jobs from ``queues``."""

    def __init__(
        self,
        runner: Runner,
        *,
        queues: Sequence[str] | None = None,
        concurrency: int = 4,
        async_concurrency: int = 100,
        lease_seconds: float = 30.0,
        max_lost_leases: int = DEFAULT_MAX_LOST_LEASES,
        result_ttl: float | None = None,
        name: str | None = None,
        kind: str = "embedded",
        hard_timeouts: bool = False,
    ) -> None:
        self.runner = runner
        self.backend = runner.backend
        self.queues = tuple(queues) if queues else None
        self.concurrency = concurrency
        #: How many ``async def`` jobs run at once on the process's event loop.
        self.async_concurrency = async_concurrency
        self.lease_seconds = lease_seconds
        self.max_lost_leases = max_lost_leases
        self.result_ttl = result_ttl
        self.id = name or new_worker_id()
        self.kind = kind
        self.hard_timeouts = hard_timeouts
        self.jobs_done = 0
        self.started_at = time.time()
        #: Set when a timed-out job would not stop and ``hard_timeouts`` made the worker quit.
        self.stuck = False
        self._timed_out: dict[str, float] = {}
        self._next_register = 0.0
        self._sampled_minute = -1
        self._drained = True
        self._typical_duration: float | None = None
        self._backend_down_since: float | None = None
        self._clock = runner.clock
        self._active: dict[str, Execution] = {}
        #: Lease tokens of the active jobs that run as coroutines, not on a thread.
        self._coroutines: set[str] = set()
        self._async_coming = False
        self._active_lock = threading.Lock()
        self._inbox: queue.SimpleQueue[Execution | None] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        #: The event loop ``async def`` jobs run on, started by the first one.
        self._loop = aio.LoopThread()
        self._dispatcher: threading.Thread | None = None
        self._heartbeat_interval = min(HEARTBEAT_INTERVAL, lease_seconds / 3)
        self._next_heartbeat = 0.0
        self._next_prune = 0.0
        self._grace_deadline: float | None = None
        #: When the lease of each running attempt (by lease token) last known to us ends.
        self._lease_ends: dict[str, float] = {}

    # -- one step ------------------------------------------------------------

    def run_once(self) -> int:
        """Reserve due jobs for idle threads and hand them over; return how many.

        While recent jobs are short, it also reserves as many again to queue
        behind the running ones, so one claim feeds several jobs; one that waits
        longer than ``HOLD_BACK_LIMIT`` for a thread goes back for other workers.
        """
        if self._stopping.is_set():
            return 0
        held = self._threads_held()
        short = self._typical_duration is not None and self._typical_duration < PREFETCH_BELOW
        want = (2 if short else 1) * self.concurrency - held if held <= self.concurrency else 0
        # Room on the event loop is reserved for only while async jobs are coming in, so an
        # app with async tasks does not reserve sync jobs its threads cannot take yet.
        want = max(0, want) + (self._coroutine_room() if self._async_coming else 0)
        if want <= 0:
            return 0
        records = self.backend.reserve(
            self.queues,
            want,
            self.id,
            self.lease_seconds,
            self._clock(),
            max_lost_leases=self.max_lost_leases,
        )
        self._drained = len(records) < want
        if records:
            self._async_coming = any(self.runner.is_async(record) for record in records)
        for record in records:
            self._lease_ends[record.lease_token or ""] = record.lease_expires_at or float("inf")
            execution = self.runner.start(record)
            # An async job beyond the loop's room runs on a thread, on a private loop.
            coroutine = self.runner.is_async(record) and self._coroutine_room() > 0
            with self._active_lock:
                self._active[execution.lease_token] = execution
                if coroutine:
                    self._coroutines.add(execution.lease_token)
            if coroutine:
                self._loop.submit(self._run_coroutine(execution))
            else:
                self._inbox.put(execution)
        return len(records)

    def _threads_held(self) -> int:
        """Jobs reserved for the threads: running, or waiting for one."""
        return len(self._active) - len(self._coroutines)

    def _coroutine_room(self) -> int:
        """How many more ``async def`` jobs the event loop may take now."""
        if not self.runner.has_async_tasks():
            return 0
        return max(0, self.async_concurrency - len(self._coroutines))

    def _has_room(self) -> bool:
        """Whether a thread (or its reserve-ahead) or the event loop could take another job."""
        loop_room = self._async_coming and self._coroutine_room() > 0
        return self._threads_held() <= self.concurrency or loop_room

    def maintain(self, now: float) -> None:
        """Extend leases, pass on cancellations, stop jobs past their timeout, prune."""
        with self._active_lock:
            active = list(self._active.values())
        for execution in active:
            if execution.deadline is not None and now >= execution.deadline:
                self._time_out(execution)
        self._release_held_back(active)
        # A timed-out attempt whose thread has not let go yet is settled: its retry,
        # perhaps reserved by this same worker, holds the lease now.
        live = [e for e in active if not e.settled]
        self._warn_lapsed_leases(now)
        if live and now >= self._next_heartbeat:
            self._next_heartbeat = now + self._heartbeat_interval
            leases = {e.id: e.lease_token for e in live}
            cancelled = self.backend.heartbeat(leases, self.lease_seconds, now)
            self._lease_ends.update((e.lease_token, now + self.lease_seconds) for e in live)
            for execution in live:
                if execution.id in cancelled:
                    execution.request_cancel()
        if self.result_ttl is not None and now >= self._next_prune:
            self._next_prune = now + PRUNE_INTERVAL
            self.backend.prune(now - self.result_ttl)
        if now >= self._next_register:
            self._next_register = now + REGISTER_INTERVAL
            self.backend.register_worker(
                self.id, {**self.info(), "last_seen": now}, REGISTER_INTERVAL * 3, now
            )
            if minute_of(now) != self._sampled_minute:
                # One depth sample a minute for the dashboard's charts: the first worker wins.
                self.backend.sample_depth(now)
                self._sampled_minute = minute_of(now)
        self._check_stuck(active)

    def _warn_lapsed_leases(self, now: float) -> None:
        """Say once per lapse which running jobs' leases ended before they could be renewed."""
        with self._active_lock:
            live = {e.lease_token: e for e in self._active.values() if not e.settled}
        for token in [t for t in self._lease_ends if t not in live]:
            del self._lease_ends[token]
        lapsed = [e for t, e in live.items() if self._lease_ends.get(t, now + 1.0) <= now]
        if not lapsed:
            return
        for execution in lapsed:
            del self._lease_ends[execution.lease_token]
        logger.warning(
            "errands worker %s: the lease of %s lapsed before this worker could renew it; "
            "%s may run again elsewhere while still running here",
            self.id,
            ", ".join(f"{e.task} {e.id}" for e in lapsed),
            "it" if len(lapsed) == 1 else "they",
        )

    def info(self) -> dict[str, object]:
        """What this worker says of itself in the backend's list of live workers."""
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "kind": self.kind,
            "queues": list(self.queues) if self.queues else None,
            "concurrency": self.concurrency,
            "async_concurrency": self.async_concurrency,
            "started_at": self.started_at,
            "jobs_done": self.jobs_done,
            "current_jobs": self.active_jobs(),
        }

    def _check_stuck(self, active: list[Execution]) -> None:
        """With hard timeouts, quit when a timed-out job ignores its interrupt for too long."""
        if not self._timed_out:
            return
        running = {e.lease_token: e.id for e in active}
        for token, since in list(self._timed_out.items()):
            if token not in running:
                del self._timed_out[token]
            elif not self.hard_timeouts:
                continue
            elif time.monotonic() - since > STUCK_AFTER and not self._stopping.is_set():
                logger.error(
                    "job %s ignores its timeout; stopping this worker process to kill it",
                    running[token],
                )
                self.stuck = True
                self.stop(0.0 if len(running) == 1 else 30.0, wait=False)

    # -- threads -------------------------------------------------------------

    def start(self) -> Worker:
        """Start the dispatcher and the job threads; returns at once."""
        self.backend.watch(self._wake.set)
        for n in range(self.concurrency):
            thread = threading.Thread(target=self._work, name=f"errands-worker-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)
        self._dispatcher = threading.Thread(
            target=self._dispatch, name="errands-dispatcher", daemon=True
        )
        self._dispatcher.start()
        return self

    def stop(self, grace: float = 30.0, *, wait: bool = True) -> None:
        """Stop taking jobs, let running ones finish for ``grace`` seconds, release the rest.

        With ``wait=False`` this only asks; :meth:`join` waits for the stop to complete.
        Asked again, the earlier deadline wins: ``stop(0)`` during a grace releases
        the running jobs at once.
        """
        deadline = time.monotonic() + grace
        if self._grace_deadline is None or deadline < self._grace_deadline:
            self._grace_deadline = deadline
        self._stopping.set()
        self._wake.set()
        if wait:
            self.join()

    def join(self) -> None:
        """Wait until a requested stop has finished, then end the job threads."""
        if self._dispatcher is not None and self._dispatcher is not threading.current_thread():
            self._dispatcher.join()
        self.backend.unwatch(self._wake.set)
        for _ in self._threads:
            self._inbox.put(None)
        self._threads.clear()
        self._loop.stop()

    @property
    def running(self) -> bool:
        return self._dispatcher is not None and self._dispatcher.is_alive()

    def active_jobs(self) -> list[str]:
        """Ids of the jobs this worker is running now."""
        with self._active_lock:
            return [e.id for e in self._active.values()]

    def _dispatch(self) -> None:
        pause = 0.5
        with limited(STORE_PATIENCE, self._stopping):
            while not self._stopping.is_set():
                try:
                    self._wake.clear()
                    reserved = self.run_once()
                    self.maintain(self._clock())
                    if self._backend_down_since is not None:
                        logger.warning("errands worker %s: the store is reachable again", self.id)
                        self._backend_down_since, pause = None, 0.5
                    if reserved and not self._drained and self._has_room():
                        continue
                    self._wake.wait(self._idle_wait())
                except BackendUnavailable as exc:
                    self._warn_lapsed_leases(self._clock())
                    self._note_outage(exc)
                    self._stopping.wait(pause)
                    pause = min(pause * 2, MAX_RECONNECT_PAUSE)
                except Exception:
                    logger.exception("errands worker %s: unexpected error; retrying", self.id)
                    self._stopping.wait(1.0)
        with limited(STORE_PATIENCE):
            self._finish_running()
        try:
            with limited(0.0):  # one try: the registration expires by itself anyway
                self.backend.unregister_worker(self.id)
        except Exception:
            logger.debug("could not unregister worker %s", self.id, exc_info=True)

    def _note_outage(self, exc: BackendUnavailable) -> None:
        """Say once, without a traceback, that the store cannot be reached."""
        if self._backend_down_since is None:
            self._backend_down_since = time.monotonic()
            logger.warning("errands worker %s: %s; retrying until it is back", self.id, exc)

    def _idle_wait(self) -> float:
        now = self._clock()
        wait = min(IDLE_WAIT, max(0.0, self._next_heartbeat - now) if self._active else IDLE_WAIT)
        active = list(self._active.values())
        deadlines = [e.deadline for e in active if e.deadline is not None]
        if deadlines:
            wait = min(wait, max(0.0, min(deadlines) - now))
        waiting_since = [e.reserved_at for e in active if not e.started]
        if waiting_since:
            hold_back_ends = min(waiting_since) + HOLD_BACK_LIMIT - time.monotonic()
            wait = min(wait, max(0.0, hold_back_ends) + 0.01)
        if self._drained and (
            self._threads_held() < self.concurrency
            or (self._async_coming and self._coroutine_room() > 0)
        ):
            eta = self.backend.next_eta(self.queues)
            if eta is not None:
                wait = min(wait, max(0.0, eta - now))
        return wait

    def _finish_running(self) -> None:
        """On stop: keep leases alive while running jobs finish, then release the rest.

        The deadline is read on every turn, so a later ``stop(0)`` cuts the grace short.
        """
        with self._active_lock:
            waiting = [e for e in self._active.values() if e.claim_unstarted()]
        self._release(waiting)
        while self._active and time.monotonic() < self._deadline():
            try:
                self.maintain(self._clock())
            except BackendUnavailable as exc:
                self._note_outage(exc)
            except Exception:
                logger.exception("errands worker %s: backend error while stopping", self.id)
            self._wake.wait(min(0.05, max(0.0, self._deadline() - time.monotonic())))
            self._wake.clear()
        with self._active_lock:
            left = list(self._active.values())
        stopped = [e for e in left if e.claim(partial(self._interrupt, e))]
        self._release(stopped)
        for execution in stopped:
            logger.warning(
                "%s %s released back to its queue: still running at shutdown",
                execution.task,
                execution.id,
                extra={"job_id": execution.id, "task": execution.task},
            )

    def _deadline(self) -> float:
        return self._grace_deadline or time.monotonic()

    def _release(self, executions: list[Execution]) -> None:
        """Give claimed jobs back to their queue (on a backend error, after their lease)."""
        for execution in executions:
            try:
                self.backend.release(execution.id, execution.lease_token, self._clock())
            except Exception as exc:
                logger.warning(
                    "could not release job %s (%s); it returns after its lease", execution.id, exc
                )
            with self._active_lock:
                self._active.pop(execution.lease_token, None)

    def _release_held_back(self, active: list[Execution]) -> None:
        """Give back jobs reserved ahead that wait too long behind a slow one, for idle workers."""
        now = time.monotonic()
        stale = [
            e for e in active if now - e.reserved_at > HOLD_BACK_LIMIT and e.claim_unstarted()
        ]
        if stale:
            self._typical_duration = None  # no reserving ahead until a job ends again
            self._release(stale)

    def _work(self) -> None:
        execution: Execution | None = None
        while True:
            try:
                next_job = self._inbox.get()
                if next_job is None:
                    return
                execution = next_job
                started = time.perf_counter()
                try:
                    self.runner.run(execution)
                finally:
                    self._ended(execution, started)
            except JobInterrupt:  # arrived after the job ended; its outcome is recorded
                if execution is not None:
                    with self._active_lock:
                        self._active.pop(execution.lease_token, None)
            except BaseException:  # a job thread must outlive anything a job does
                logger.exception("errands worker thread: unexpected error")

    async def _run_coroutine(self, execution: Execution) -> None:
        """Run an ``async def`` job on the event loop; the loop outlives anything it does."""
        started = time.perf_counter()
        try:
            await self.runner.run_async(execution)
        except BaseException:
            logger.exception("errands worker: unexpected error running %s", execution.id)
        finally:
            self._ended(execution, started)

    def _ended(self, execution: Execution, started: float) -> None:
        """Forget a job whose attempt ended, and wake the dispatcher to fill its place."""
        with self._active_lock:
            self._active.pop(execution.lease_token, None)
            coroutine = execution.lease_token in self._coroutines
            self._coroutines.discard(execution.lease_token)
        if execution.started:
            self.jobs_done += 1
            if not coroutine:
                self._note_duration(time.perf_counter() - started)
        if self._has_room():
            self._wake.set()

    def _note_duration(self, seconds: float) -> None:
        typical = self._typical_duration
        self._typical_duration = seconds if typical is None else 0.8 * typical + 0.2 * seconds

    def _time_out(self, execution: Execution) -> None:
        timeout = execution.record.timeout
        record = execution.record
        if not execution.claim(lambda: self._interrupt(execution)):
            return
        self._timed_out[execution.lease_token] = time.monotonic()
        # Claimed: write the outcome here, since the interrupted thread will not.
        outcome = Outcome(Ending.TIMED_OUT, error=timeout_error(timeout))
        decision = self.runner.conclude(execution, outcome, claimed=True)
        then = "" if decision is None or not decision.retrying else ", will retry"
        logger.warning(
            "%s %s timed out after %gs (attempt %d)%s",
            record.task,
            record.id,
            timeout,
            record.attempts,
            then,
            extra={"job_id": record.id, "task": record.task},
        )

    @staticmethod
    def _interrupt(execution: Execution) -> None:
        """Raise :class:`JobInterrupt` in the thread running ``execution``, if any.

        Never inside a store call, where it could leave a lock or connection held:
        then it is raised as that call returns.
        """
        thread_id = execution.thread_id
        if thread_id is not None:
            interrupt(thread_id, JobInterrupt, partial(raise_in_thread, thread_id, JobInterrupt))
        else:
            execution.cancel_coroutine()


def raise_in_thread(thread_id: int, exc_type: type[BaseException]) -> bool:
    """Make ``exc_type`` be raised in another thread at its next Python instruction.

    Returns whether the thread was found; one that has already ended is not an error.
    """
    set_async_exc = ctypes.pythonapi.PyThreadState_SetAsyncExc
    touched = set_async_exc(ctypes.c_ulong(thread_id), ctypes.py_object(exc_type))
    if touched > 1:  # never expected: undo rather than interrupt unrelated threads
        set_async_exc(ctypes.c_ulong(thread_id), None)
        raise SystemError(f"PyThreadState_SetAsyncExc touched {touched} threads; undone")
    return bool(touched)
