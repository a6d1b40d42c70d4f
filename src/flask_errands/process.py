"""Running a worker as the main program: signals, graceful stop, and a pool of processes.

``flask errands worker`` calls :func:`run_worker`. In thread mode the process
runs one :class:`~flask_errands.service.Service`; with ``processes > 1`` it forks
that many children, each with its own threads, and replaces any that dies or
is recycled after ``max_jobs_per_child`` jobs.

A SIGTERM or SIGINT stops taking jobs and lets running ones finish within
``grace`` seconds, then releases the rest back to their queue. Copies of the
signal that arrive within ``BURST`` seconds of the first (a terminal's Ctrl-C
or systemd's stop reach every process of the group) are the same request; a
later one stops at once, releasing the running jobs. Children obey their
supervisor through a pipe: it tells them to stop, or to stop now, and its end of
file tells them it died (killed, out of memory), and they stop as on a SIGTERM.
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

from .runtime import Runtime
from .serving import BURST, Burst

logger = logging.getLogger("flask_errands")

#: Exit code of a child that quit because a job ignored its timeout.
EXIT_STUCK = 3
#: Exit code after a deliberate second stop signal: running jobs were released at once.
EXIT_ABANDONED = 1
#: After "stop now", how long releasing the running jobs may take before the process quits anyway.
NOW_LIMIT = 5.0
#: What a supervisor writes to a child's pipe.
ASK_STOP, ASK_NOW = b"s", b"n"


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
    """SIGTERM and SIGINT as stop requests: one per burst of copies, "stop now" after it."""

    def __init__(self, *, watchdog: bool = True) -> None:
        self.requested = threading.Event()
        self.now = threading.Event()
        self._burst = Burst()
        self._watchdog = watchdog
        self._on_now: Callable[[], None] = lambda: None

    def install(self) -> StopSignals:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)
        return self

    def on_now(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` on "stop now" (at once if it was already asked)."""
        self._on_now = callback
        if self.now.is_set():
            callback()

    def ask(self, why: str) -> None:
        """Stop after the running jobs; asking again changes nothing."""
        if not self.requested.is_set():
            logger.info("%s: finishing running jobs, then stopping", why)
            self.requested.set()

    def stop_now(self, why: str) -> None:
        """Release the running jobs and exit; with the watchdog, quit anyway after NOW_LIMIT."""
        if self.now.is_set():
            return
        logger.warning("%s: stopping now; running jobs go back to their queue", why)
        self.requested.set()
        self.now.set()
        self._on_now()
        if self._watchdog:
            threading.Thread(target=_quit_after, args=(NOW_LIMIT,), daemon=True).start()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        arrival = self._burst.arrive()
        if arrival == Burst.FIRST:
            self.ask(name)
        elif arrival == Burst.AGAIN:
            self.stop_now(f"{name} again")
        else:
            logger.debug("%s again within %gs: the same stop request", name, BURST)


def _quit_after(seconds: float) -> None:
    time.sleep(seconds)
    logger.error("running jobs not released within %gs; they return after their lease", seconds)
    os._exit(EXIT_ABANDONED)


def run_worker(runtime: Runtime, options: WorkerOptions) -> int:
    """Run a worker in the foreground until a stop signal; return the exit code."""
    if options.processes > 1:
        return _supervise(runtime, options)
    stop = StopSignals().install()
    return _run_threads(runtime, options, stop, run_scheduler=options.scheduler)


def _run_threads(
    runtime: Runtime,
    options: WorkerOptions,
    stop: StopSignals,
    *,
    run_scheduler: bool,
    hard_timeouts: bool = False,
) -> int:
    service = runtime.service(
        queues=options.queues,
        concurrency=options.concurrency,
        scheduler=run_scheduler,
        kind="worker",
        hard_timeouts=hard_timeouts,
    ).start()
    stop.on_now(lambda: service.stop(0.0, wait=False))
    limit = options.max_jobs_per_child
    while not stop.requested.wait(0.2):
        if not service.running or (limit is not None and service.jobs_done >= limit):
            break
    busy = len(service.active_jobs())
    if busy and not stop.now.is_set():
        logger.info("waiting up to %gs for %d running job(s)", options.grace, busy)
    service.stop(options.grace)
    if stop.now.is_set():
        return EXIT_ABANDONED
    return EXIT_STUCK if service.stuck else 0


@dataclasses.dataclass
class _Child:
    slot: int
    pid: int
    started: float
    pipe: int  # the supervisor's end of the pipe the child listens on


def _supervise(runtime: Runtime, options: WorkerOptions) -> int:
    """Fork ``options.processes`` children and keep that many alive until told to stop."""
    children: dict[int, _Child] = {}
    stop = StopSignals(watchdog=False).install()

    def spawn(slot: int) -> None:
        listen, tell = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: run threads, never return into the parent's code
            code = 1
            try:
                for fd in [tell, *(child.pipe for child in children.values())]:
                    os.close(fd)  # only the supervisor may hold a writing end
                code = _run_child(runtime, options, slot, listen)
            finally:
                os._exit(code)
        os.close(listen)
        children[pid] = _Child(slot, pid, time.monotonic(), tell)
        logger.info("worker process %d started (slot %d)", pid, slot)

    for slot in range(options.processes):
        spawn(slot)
    while not stop.requested.is_set():
        for child, code in _reap(children):
            if code == 0:
                logger.info("worker process %d recycled", child.pid)
            else:
                logger.warning("worker process %d exited (%s); replacing it", child.pid, code)
            if not stop.requested.is_set():
                if time.monotonic() - child.started < 1.0:
                    time.sleep(1.0)  # a child dying at start-up must not become a fork loop
                spawn(child.slot)
        stop.requested.wait(0.2)
    _tell_all(children, ASK_STOP)
    deadline = time.monotonic() + options.grace + 10
    hurried = False
    while children and time.monotonic() < deadline:
        if stop.now.is_set() and not hurried:
            hurried = True
            _tell_all(children, ASK_NOW)
            deadline = min(deadline, time.monotonic() + NOW_LIMIT + 1)
        _reap(children)
        time.sleep(0.05)
    _signal_all(children, signal.SIGKILL)
    while children:
        _reap(children)
        time.sleep(0.05)
    return EXIT_ABANDONED if stop.now.is_set() else 0


def _run_child(runtime: Runtime, options: WorkerOptions, slot: int, pipe: int) -> int:
    """A child's life: its own threads, stopped by its own signals or by the supervisor."""
    stop = StopSignals().install()
    supervisor = os.getppid()
    threading.Thread(
        target=_obey, args=(pipe, stop, supervisor), name="errands-supervisor", daemon=True
    ).start()
    return _run_threads(
        runtime,
        options,
        stop,
        run_scheduler=options.scheduler and slot == 0,
        hard_timeouts=True,
    )


def _obey(pipe: int, stop: StopSignals, supervisor: int) -> None:
    """Read the supervisor's requests; end of file means it is gone, and so is ours to stop."""
    while True:
        try:
            message = os.read(pipe, 1)
        except OSError:
            message = b""
        if message == ASK_STOP:
            stop.ask("the supervisor asks")
        elif message == ASK_NOW:
            stop.stop_now("the supervisor says now")
        else:
            stop.ask(f"supervisor {supervisor} is gone")
            return


def _tell_all(children: dict[int, _Child], message: bytes) -> None:
    for child in children.values():
        with contextlib.suppress(OSError):
            os.write(child.pipe, message)


def _reap(children: dict[int, _Child]) -> list[tuple[_Child, int | str]]:
    """Remove the children that have exited; return them with their exit code or signal."""
    done: list[tuple[_Child, int | str]] = []
    for pid in list(children):
        code: int | str
        try:
            waited, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            code = "gone"
        else:
            if waited == 0:
                continue
            if os.WIFSIGNALED(status):
                code = signal.Signals(os.WTERMSIG(status)).name
            else:
                code = os.WEXITSTATUS(status)
        child = children.pop(pid)
        os.close(child.pipe)
        done.append((child, code))
    return done


def _signal_all(children: dict[int, _Child], signum: int) -> None:
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def queues_label(queues: Sequence[str] | None) -> str:
    return ", ".join(queues) if queues else "all"
