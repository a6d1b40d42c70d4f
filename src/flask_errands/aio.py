"""The event loop ``async def`` tasks run on: one per worker, started on first use.

A worker hands coroutines to its :class:`LoopThread`, which runs them on a loop
in a daemon thread of its own, beside the worker's threads for plain tasks, and
ends with the worker; a forked child starts a loop of its own. Eager mode and ``drain()`` run one
coroutine at a time in the calling thread with :func:`run_here` instead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

logger = logging.getLogger("flask_errands")

#: How long tasks still on a loop that ends get to finish once cancelled, before it is closed.
STOP_PATIENCE = 1.0


class LoopThread:
    """An event loop running forever in a daemon thread, made when first asked for."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pid = -1
        self._thread: threading.Thread | None = None

    def loop(self) -> asyncio.AbstractEventLoop:
        """This process's loop, started now if it is not running yet (or was the parent's)."""
        with self._lock:
            if self._loop is None or self._pid != os.getpid():
                loop = asyncio.new_event_loop()
                name = "errands-asyncio"
                self._thread = threading.Thread(target=loop.run_forever, name=name, daemon=True)
                self._thread.start()
                self._loop, self._pid = loop, os.getpid()
            return self._loop

    def stop(self) -> None:
        """End the loop and its thread, if this process started one, cancelling what is left."""
        with self._lock:
            loop, thread, self._loop = self._loop, self._thread, None
        if loop is None or thread is None or self._pid != os.getpid():
            return
        with contextlib.suppress(concurrent.futures.TimeoutError):
            cancelled = asyncio.run_coroutine_threadsafe(_cancel_others(STOP_PATIENCE), loop)
            cancelled.result(timeout=2 * STOP_PATIENCE)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=STOP_PATIENCE * 5)
        if thread.is_alive():  # a coroutine blocks the loop (time.sleep, a busy loop)
            logger.warning(
                "errands: a coroutine blocks the event loop and would not stop; "
                "its thread is left behind (a daemon thread, it ends with the process)"
            )
            return
        loop.close()

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coroutine`` on the loop from any thread; its future says when it ended."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop())


async def _cancel_others(patience: float) -> None:
    """Cancel every task on the running loop but this one; wait ``patience`` for them to end.

    Not longer: a coroutine that swallows its cancellation must not hold up a stop.
    """
    others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in others:
        task.cancel()
    if others:
        await asyncio.wait(others, timeout=patience)


def run_here(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` to its end and return its value, from synchronous code.

    On a new loop in this thread; in a thread of its own when this one already
    runs a loop (an ``async def`` view calling ``.delay()`` in eager mode).
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return _run(coroutine)
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="errands-eager") as pool:
        return pool.submit(_run, coroutine).result()


def _run(coroutine: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run``, but tasks left over get ``STOP_PATIENCE`` to end, not for ever.

    A task that timed out and swallowed its cancellation is left over: it is cancelled
    again and abandoned with its loop.
    """
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(coroutine)
    finally:
        try:
            loop.run_until_complete(_cancel_others(STOP_PATIENCE))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            loop.close()
