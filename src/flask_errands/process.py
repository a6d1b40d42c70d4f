"""Running a worker as the main program: signals, graceful stop, and a pool of processes.

``flask errands worker`` calls :func:`run_worker`. In thread mode the process
runs one :class:`~flask_errands.worker.Worker`; with ``processes > 1`` it forks
that many children, each with its own threads, and replaces any that dies or
is recycled after ``max_jobs_per_child`` jobs. The first SIGTERM or SIGINT
stops taking jobs and lets running ones finish within ``grace`` seconds, then
releases the rest back to their queue; a second one exits at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import TYPE_CHECKING

from .worker import Worker

if TYPE_CHECKING:
    from .extension import AppState

logger = logging.getLogger("flask_errands")

#: Exit code of a child that quit because a job ignored its timeout.
EXIT_STUCK = 3
#: Exit code after a second stop signal: running jobs come back after their lease.
EXIT_ABANDONED = 1


@dataclasses.dataclass(frozen=True)
class WorkerOptions:
    """What ``flask errands worker`` was asked for."""

    queues: tuple[str, ...] | None = None
    concurrency: int = 4
    scheduler: bool = True
    grace: float = 30.0
    processes: int = 1
    max_jobs_per_child: int | None = None


class StopSignals:
    """Turns the first SIGTERM/SIGINT into a stop request and the second into an exit."""

    def __init__(self, on_second: Callable[[], None]) -> None:
        self.requested = threading.Event()
        self._on_second = on_second

    def install(self) -> StopSignals:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested.is_set():
            logger.warning("%s again: stopping now; running jobs return after their lease", name)
            self._on_second()
            os._exit(EXIT_ABANDONED)
        logger.info("%s: finishing running jobs, then stopping", name)
        self.requested.set()


def run_worker(state: AppState, options: WorkerOptions) -> int:
    """Run a worker in the foreground until a stop signal; return the exit code."""
    if options.processes > 1:
        return _supervise(state, options)
    stop = StopSignals(on_second=lambda: None).install()
    return _run_threads(state, options, stop.requested, run_scheduler=options.scheduler)


def _run_threads(
    state: AppState,
    options: WorkerOptions,
    stop: threading.Event,
    *,
    run_scheduler: bool,
    hard_timeouts: bool = False,
) -> int:
    worker = Worker(
        state.runner,
        queues=options.queues,
        concurrency=options.concurrency,
        lease_seconds=state.settings.lease_seconds,
        max_lost_leases=state.settings.max_lost_leases,
        result_ttl=state.settings.result_ttl,
        kind="worker",
        hard_timeouts=hard_timeouts,
    ).start()
    stop_scheduler = _start_scheduler(state) if run_scheduler else None
    limit = options.max_jobs_per_child
    while not stop.wait(0.2):
        if not worker.running or (limit is not None and worker.jobs_done >= limit):
            break
    busy = len(worker.active_jobs())
    if busy:
        logger.info("waiting up to %gs for %d running job(s)", options.grace, busy)
    if stop_scheduler is not None:
        stop_scheduler()
    worker.stop(options.grace)
    return EXIT_STUCK if worker.stuck else 0


def _start_scheduler(state: AppState) -> Callable[[], None] | None:
    """Start the periodic-job scheduler in a thread; return how to stop it."""
    try:
        from .scheduler import Scheduler
    except ImportError:
        return None
    stopped = threading.Event()
    thread = threading.Thread(
        target=Scheduler(state).run, args=(stopped,), name="errands-scheduler", daemon=True
    )
    thread.start()

    def stop() -> None:
        stopped.set()
        thread.join(timeout=5)

    return stop


@dataclasses.dataclass
class _Child:
    slot: int
    pid: int
    started: float


def _supervise(state: AppState, options: WorkerOptions) -> int:
    """Fork ``options.processes`` children and keep that many alive until told to stop."""
    children: dict[int, _Child] = {}
    stop = StopSignals(on_second=lambda: _signal_all(children, signal.SIGKILL)).install()

    def spawn(slot: int) -> None:
        pid = os.fork()
        if pid == 0:  # the child: run threads, never return into the parent's code
            code = 1
            try:
                child_stop = StopSignals(on_second=lambda: None).install()
                code = _run_threads(
                    state,
                    options,
                    child_stop.requested,
                    run_scheduler=options.scheduler and slot == 0,
                    hard_timeouts=True,
                )
            finally:
                os._exit(code)
        children[pid] = _Child(slot, pid, time.monotonic())
        logger.info("worker process %d started (slot %d)", pid, slot)

    for slot in range(options.processes):
        spawn(slot)
    while not stop.requested.is_set():
        for pid, code in _reap(children):
            child = children.pop(pid)
            if code == 0:
                logger.info("worker process %d recycled", pid)
            else:
                logger.warning("worker process %d exited (%s); replacing it", pid, code)
            if not stop.requested.is_set():
                if time.monotonic() - child.started < 1.0:
                    time.sleep(1.0)  # a child dying at start-up must not become a fork loop
                spawn(child.slot)
        stop.requested.wait(0.2)
    _signal_all(children, signal.SIGTERM)
    deadline = time.monotonic() + options.grace + 10
    while children and time.monotonic() < deadline:
        for pid, _ in _reap(children):
            children.pop(pid)
        time.sleep(0.1)
    _signal_all(children, signal.SIGKILL)
    return 0


def _reap(children: dict[int, _Child]) -> list[tuple[int, int | str]]:
    """Collect the children that have exited, with their exit code or killing signal."""
    done: list[tuple[int, int | str]] = []
    for pid in list(children):
        try:
            waited, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done.append((pid, "gone"))
            continue
        if waited == 0:
            continue
        if os.WIFSIGNALED(status):
            done.append((pid, signal.Signals(os.WTERMSIG(status)).name))
        else:
            done.append((pid, os.WEXITSTATUS(status)))
    return done


def _signal_all(children: dict[int, _Child], signum: int) -> None:
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def queues_label(queues: Sequence[str] | None) -> str:
    return ", ".join(queues) if queues else "all"
