"""When the embedded worker starts in a server process, and how it stops when that process ends.

A process that serves the app (``flask run``, a gunicorn worker) starts its
embedded worker as soon as the app has loaded, so schedules fire after a deploy
that no request has reached yet. Every other process that loads the app
(``flask shell``, migrations, other commands, a test suite, gunicorn's master
under ``--preload``) starts it only on a request or a ``.delay()`` outside the
CLI, as before. The process is judged while the app loads: ``flask run`` is the
click command running then, gunicorn is found on the loading thread's stack.

Stopping: SIGTERM gets the same grace as Ctrl-C. Where nobody handles SIGTERM,
a handler lets running jobs finish, then the process dies of SIGTERM as it would
have at once; where a server handles it (gunicorn's workers), the handler starts
the stop and passes the signal on. At exit the copies of a signal that arrive in
one burst (a terminal's process group, a master passing it on) count as one; a
later one stops at once and releases the running jobs to their queue.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from types import FrameType
from typing import Any, Protocol

import click

logger = logging.getLogger("flask_errands")

#: Copies of a stop signal arriving within this many seconds of the first are the same request.
BURST = 1.0
#: The longest the embedded worker waits for the code loading the app to return before starting.
LOAD_WAIT = 60.0

FLASK_RUN = "flask run"
GUNICORN_WORKER = "gunicorn worker"
GUNICORN_MASTER = "gunicorn master"

Handler = Callable[[int, FrameType | None], Any] | int | None


class Burst:
    """The one rule for stop signals: copies within ``BURST`` s of the first are one request.

    :meth:`arrive` says what a signal is: ``FIRST`` (start stopping), ``COPY``
    (the same request again, as a process group or a forwarding parent sends it)
    or ``AGAIN`` (a deliberate later one: stop now). A forked child starts afresh.
    """

    FIRST, COPY, AGAIN = "first", "copy", "again"

    def __init__(self) -> None:
        self._first: float | None = None
        self._pid = os.getpid()

    def start(self) -> None:
        """A stop began without a signal (at exit): signals from now on are copies or later."""
        self._first, self._pid = time.monotonic(), os.getpid()

    def arrive(self) -> str:
        """Classify a stop signal arriving now."""
        now = time.monotonic()
        if self._first is None or self._pid != os.getpid():
            self._first, self._pid = now, os.getpid()
            return self.FIRST
        return self.AGAIN if now - self._first >= BURST else self.COPY


class Stoppable(Protocol):
    """An embedded worker as seen here: asked to stop with a grace, then waited for."""

    def stop(self, grace: float, *, wait: bool = True) -> None: ...

    def join(self) -> None: ...

    def active_jobs(self) -> list[str]: ...


# -- is this process a server? ----------------------------------------------------


def server_role() -> str | None:
    """Which server this process is, judged while the app loads; None if it serves nothing."""
    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        if ctx.command.name != "run" or ctx.parent is None or ctx.parent.parent is not None:
            return None  # `flask shell`, `flask db upgrade`, `flask errands worker`, ...
        reload = ctx.params.get("reload")
        if reload is None:
            from flask.helpers import get_debug_flag

            reload = get_debug_flag()
        if reload and os.environ.get("WERKZEUG_RUN_MAIN") != "true":
            return None  # the reloader's watcher; its child process serves
        return FLASK_RUN
    stack = list(_frames(sys._getframe()))
    if any(_module(frame).startswith("gunicorn.workers") for frame in stack):
        return GUNICORN_WORKER
    if any(_module(frame) == "gunicorn.arbiter" for frame in stack):
        return GUNICORN_MASTER  # --preload: load in the master, serve in forked workers
    return None


def start_when_loaded(start: Callable[[], None]) -> None:
    """Call ``start`` in a new thread once the code that is loading the app has returned.

    That code (an app factory, a module body) may still configure the app after
    ``init_app``; a job run before it returns could find the app half built.
    """
    caller = next((f for f in _frames(sys._getframe()) if not _ours(f)), None)
    loader = threading.get_ident()

    def wait_then_start() -> None:
        nonlocal caller
        deadline = time.monotonic() + LOAD_WAIT
        while caller is not None and time.monotonic() < deadline:
            if not any(f is caller for f in _frames(sys._current_frames().get(loader))):
                break
            time.sleep(0.02)
        caller = None
        start()

    threading.Thread(target=wait_then_start, name="errands-start", daemon=True).start()


def start_in_forked_workers(start: Callable[[], None]) -> None:
    """Under ``gunicorn --preload``: call ``start`` in each forked worker, never the master."""

    def after_fork() -> None:
        if any(
            _module(f) == "gunicorn.arbiter" and f.f_code.co_name == "spawn_worker"
            for f in _frames(sys._getframe())
        ):
            threading.Thread(target=start, name="errands-start", daemon=True).start()

    os.register_at_fork(after_in_child=after_fork)


def _frames(frame: FrameType | None) -> Iterator[FrameType]:
    while frame is not None:
        yield frame
        frame = frame.f_back


def _module(frame: FrameType) -> str:
    return str(frame.f_globals.get("__name__", ""))


def _ours(frame: FrameType) -> bool:
    module = _module(frame)
    return module == "flask_errands" or module.startswith("flask_errands.")


# -- stopping when the process ends ----------------------------------------------


class Shutdown:
    """Stops this process's embedded workers on SIGTERM and at exit, giving each its grace.

    ``workers`` lists the running embedded workers of this process with their grace.
    """

    def __init__(self, workers: Callable[[], list[tuple[Stoppable, float]]]) -> None:
        self._workers = workers
        self._previous: Handler = signal.SIG_DFL
        self._burst = Burst()

    def watch_sigterm(self) -> None:
        """From the main thread: honour SIGTERM, chaining to a handler the server installed.

        Does nothing where SIGTERM is ignored, or handled outside Python.
        """
        if threading.current_thread() is not threading.main_thread():
            return
        current = signal.getsignal(signal.SIGTERM)
        if current == self._on_sigterm:
            return
        if current != signal.SIG_DFL and not callable(current):
            return
        self._previous = current
        signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum: int, frame: FrameType | None) -> None:
        if self._repeated():
            return
        workers = self._workers()
        self._begin(workers, "SIGTERM")
        previous = self._previous
        if callable(previous):
            previous(signum, frame)  # the server stops; the wait for jobs happens at exit
            return
        for worker, _ in workers:
            worker.join()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)  # die of it, as the default would have at once

    def at_exit(self) -> None:
        """Stop the schedulers at once and let running jobs finish within their grace."""
        workers = self._workers()
        if not workers:
            return
        self._burst.start()  # signals from now on are copies of what ended it, or later
        if threading.current_thread() is threading.main_thread():
            for signum in _stop_signals():
                with contextlib.suppress(OSError, ValueError):
                    signal.signal(signum, self._during_exit)
        self._begin(workers, None)
        for worker, _ in workers:
            worker.join()

    def _during_exit(self, signum: int, frame: FrameType | None) -> None:
        self._repeated(signal.Signals(signum).name)

    def _begin(self, workers: list[tuple[Stoppable, float]], why: str | None) -> None:
        busy = sum(len(worker.active_jobs()) for worker, _ in workers)
        if busy:
            grace = max(grace for _, grace in workers)
            logger.info(
                "%swaiting up to %gs for %d running job(s) to finish",
                f"{why}: " if why else "",
                grace,
                busy,
            )
        for worker, grace in workers:
            worker.stop(grace, wait=False)

    def _repeated(self, name: str = "SIGTERM") -> bool:
        """Whether a stop is under way; a copy in its burst is ignored, a later one hurries it."""
        arrival = self._burst.arrive()
        if arrival == Burst.FIRST:
            return False
        if arrival == Burst.AGAIN:
            workers = self._workers()
            if workers:
                logger.warning("%s again: releasing running jobs to their queue now", name)
            for worker, _ in workers:
                worker.stop(0.0, wait=False)
        return True


def _stop_signals() -> Iterable[int]:
    return (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT)
