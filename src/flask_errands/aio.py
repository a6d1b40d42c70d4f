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
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


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
            asyncio.run_coroutine_threadsafe(_cancel_others(), loop).result(timeout=1.0)
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coroutine`` on the loop from any thread; its future says when it ended."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop())


async def _cancel_others() -> None:
    """Cancel every task on the running loop but this one, and wait for them to end."""
    others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in others:
        task.cancel()
    await asyncio.gather(*others, return_exceptions=True)


def run_here(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run ``coroutine`` to its end and return its value, from synchronous code.

    ``asyncio.run`` in this thread; in a thread of its own when this one already
    runs a loop (an ``async def`` view calling ``.delay()`` in eager mode).
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="errands-eager") as pool:
        return pool.submit(asyncio.run, coroutine).result()
