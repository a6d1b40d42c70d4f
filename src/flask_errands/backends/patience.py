"""How long a store call in this thread may keep retrying a server it cannot reach.

A store retries a lost connection for a while before it raises
:class:`~flask_errands.exceptions.BackendUnavailable`. That suits a job thread
finishing its job, but not the worker's dispatcher: it must report an outage at
once and never sit in a reconnection loop while asked to stop. The dispatcher
runs its store calls under :func:`limited`; stores ask :func:`patience` and
:func:`given_up` how long to keep trying.

Stores also run each call under :data:`STORE_CALL`, so the worker never stops a
timed-out job's thread with an exception while it holds a store's lock or
connection: :func:`interrupt` delivers it as the call returns instead.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator


class _Limit(threading.local):
    """This thread's limit, ``None`` outside :func:`limited`: a class default, so reading it
    never costs the ``AttributeError`` that ``getattr`` with a default raises and catches."""

    value: tuple[float, threading.Event | None] | None = None


_limit = _Limit()


@contextlib.contextmanager
def limited(seconds: float, stop: threading.Event | None = None) -> Iterator[None]:
    """Here, this thread's store calls retry for ``seconds`` at most, none once ``stop`` is set."""
    previous = _limit.value
    _limit.value = (seconds, stop)
    try:
        yield
    finally:
        _limit.value = previous


def patience(default: float) -> float:
    """How long a store call in this thread may retry: ``default``, less under :func:`limited`."""
    value = _limit.value
    if value is None:
        return default
    seconds, stop = value
    return 0.0 if stop is not None and stop.is_set() else min(default, seconds)


def given_up() -> bool:
    """Whether the stop event of the enclosing :func:`limited` block is set."""
    value = _limit.value
    return value is not None and value[1] is not None and value[1].is_set()


_store_depth: dict[int, int] = {}
_pending: dict[int, type[BaseException]] = {}
_guard = threading.Lock()
_get_ident = threading.get_ident


class StoreCall:
    """Marks this thread as inside a store call for a ``with`` block (calls may nest).

    An interrupt asked for meanwhile (:func:`interrupt`) is raised here as the
    outermost call returns, when no lock or connection of the store is held.
    A class with no state of its own (use :data:`STORE_CALL`), not a generator:
    it runs on every store call, and costs a third as much.
    """

    __slots__ = ()

    def __enter__(self) -> None:
        ident = _get_ident()
        before = -1
        try:
            with _guard:
                before = _store_depth.get(ident, 0)
                _store_depth[ident] = before + 1
        except BaseException:
            # An interrupt delivered just before this call began lands here: undo the
            # mark, as __exit__ will not run (this thread alone writes its own depth).
            if before >= 0:
                _restore(ident, before)
            raise

    def __exit__(self, *exc_info: object) -> None:
        ident = _get_ident()
        with _guard:
            depth = _store_depth.pop(ident, 1) - 1
            if depth:
                _store_depth[ident] = depth
                return
            pending = _pending.pop(ident, None) if _pending else None
        if pending is not None:
            raise pending


#: The one :class:`StoreCall`: ``with STORE_CALL:`` around a store's way in.
STORE_CALL = StoreCall()


def _restore(ident: int, depth: int) -> None:
    with _guard:
        if depth:
            _store_depth[ident] = depth
        else:
            _store_depth.pop(ident, None)


def interrupt(
    thread_id: int, exc_type: type[BaseException], deliver: Callable[[], object]
) -> None:
    """Have ``exc_type`` raised in thread ``thread_id``: now through ``deliver`` if it is
    outside any store call, else as its store call returns."""
    with _guard:
        if thread_id in _store_depth:
            _pending[thread_id] = exc_type
        else:
            deliver()


def forget_interrupt() -> None:
    """Drop an interrupt still pending for this thread: the job it was meant for has ended."""
    if _pending:  # nearly always empty: no lock taken then
        with _guard:
            _pending.pop(_get_ident(), None)
