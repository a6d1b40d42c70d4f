"""How long a store call in this thread may keep retrying a server it cannot reach.

A store retries a lost connection for a while before it raises
:class:`~flask_errands.exceptions.BackendUnavailable`. That suits a job thread
finishing its job, but not the worker's dispatcher: it must report an outage at
once and never sit in a reconnection loop while asked to stop. The dispatcher
runs its store calls under :func:`limited`; stores ask :func:`patience` and
:func:`given_up` how long to keep trying.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

_limit = threading.local()


@contextlib.contextmanager
def limited(seconds: float, stop: threading.Event | None = None) -> Iterator[None]:
    """Here, this thread's store calls retry for ``seconds`` at most, none once ``stop`` is set."""
    previous = getattr(_limit, "value", None)
    _limit.value = (seconds, stop)
    try:
        yield
    finally:
        _limit.value = previous


def patience(default: float) -> float:
    """How long a store call in this thread may retry: ``default``, less under :func:`limited`."""
    value: tuple[float, threading.Event | None] | None = getattr(_limit, "value", None)
    if value is None:
        return default
    seconds, stop = value
    return 0.0 if stop is not None and stop.is_set() else min(default, seconds)


def given_up() -> bool:
    """Whether the stop event of the enclosing :func:`limited` block is set."""
    value: tuple[float, threading.Event | None] | None = getattr(_limit, "value", None)
    return value is not None and value[1] is not None and value[1].is_set()
