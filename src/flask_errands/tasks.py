"""``Task``: a function registered with ``@errands.task``, and how its calls become jobs."""

from __future__ import annotations

import dataclasses
import datetime as dt
import inspect
import os
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, Protocol, TypeVar

from . import serialization
from .backends.base import QUEUED, SCHEDULED, JobRecord
from .exceptions import PayloadTooLarge

if TYPE_CHECKING:
    from .jobs import Job

P = ParamSpec("P")
R = TypeVar("R")

UniqueKey = str | Callable[..., str] | None


class Enqueuer(Protocol):
    """Where a task's calls go: the owner that stores them as jobs (``Errands``)."""

    def enqueue(self, records: list[JobRecord]) -> list[Job]:
        """Store new job records and return their jobs."""
        ...


@dataclasses.dataclass(frozen=True)
class TaskOptions:
    """How a task's jobs are queued and retried; set on the decorator, overridden per call."""

    queue: str = "default"
    priority: int = 0
    retries: int = 0
    retry_delay: float = 1.0
    timeout: float | None = None
    unique_key: UniqueKey = None
    delay: float | dt.timedelta | None = None
    at: dt.datetime | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.queue, str) or not self.queue:
            raise ValueError(f"queue must be a non-empty string, not {self.queue!r}")
        if isinstance(self.priority, bool) or not isinstance(self.priority, int):
            raise ValueError(f"priority must be an int, not {self.priority!r}")
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"retries must be a whole number >= 0, not {self.retries!r}")
        if self.retry_delay < 0:
            raise ValueError(f"retry_delay must be >= 0, not {self.retry_delay!r}")
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError(f"timeout must be positive seconds, not {self.timeout!r}")
        if self.at is not None and self.at.tzinfo is None:
            raise ValueError("at= needs an aware datetime (with tzinfo), so its instant is known")
        if self.at is not None and self.delay is not None:
            raise ValueError("give delay= or at=, not both")

    def eta(self, now: float) -> float:
        """When a job enqueued ``now`` with these options is due."""
        if self.at is not None:
            return self.at.timestamp()
        delay = self.delay
        if isinstance(delay, dt.timedelta):
            delay = delay.total_seconds()
        return now + (delay or 0.0)


class Task(Generic[P, R]):
    """A function that runs in the background; calling it directly still runs it inline."""

    def __init__(
        self, errands: Enqueuer, func: Callable[P, R], name: str, options: TaskOptions
    ) -> None:
        #: The owner this task was registered on; its ``enqueue`` stores the calls.
        self.errands = errands
        self.func = func
        self.name = name
        self.default_options = options
        self.signature = inspect.signature(func)
        self._bound = BoundTask(self, options)
        self.__doc__ = func.__doc__
        self.__wrapped__ = func

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        return self.func(*args, **kwargs)

    def delay(self, *args: P.args, **kwargs: P.kwargs) -> Job:
        """Enqueue a call and return its :class:`Job` at once."""
        return self._bound.delay(*args, **kwargs)

    def delay_many(self, calls: Iterable[Any]) -> list[Job]:
        """Enqueue many calls in one round trip and return their jobs.

        Each item is a tuple of positional arguments, an ``(args, kwargs)``
        pair, or a single argument.
        """
        return self._bound.delay_many(calls)

    def options(self, **overrides: Any) -> BoundTask[P, R]:
        """Return this task with options overridden for the calls made through it."""
        return BoundTask(self, dataclasses.replace(self.default_options, **overrides))

    def __repr__(self) -> str:
        return f"<Task {self.name}>"


class BoundTask(Generic[P, R]):
    """A task with per-call options; ``delay`` and ``delay_many`` use them."""

    def __init__(self, task: Task[P, R], options: TaskOptions) -> None:
        self.task = task
        self.opts = options

    def delay(self, *args: P.args, **kwargs: P.kwargs) -> Job:
        """Enqueue a call with these options and return its :class:`Job`."""
        return self.task.errands.enqueue([self.build(args, kwargs, time.time())])[0]

    def delay_many(self, calls: Iterable[Any]) -> list[Job]:
        """Enqueue many calls in one transaction; see :meth:`Task.delay_many`."""
        now = time.time()
        records = [self.build(*_split_call(call), now) for call in calls]
        return self.task.errands.enqueue(records) if records else []

    def build(self, args: tuple[Any, ...], kwargs: dict[str, Any], now: float) -> JobRecord:
        """Check and encode one call into a new job record; raise before anything is stored."""
        task, opts = self.task, self.opts
        try:
            task.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"{task.name}.delay(): {exc}") from None
        payload = encode_call(task, args, kwargs)
        unique_key = opts.unique_key
        if callable(unique_key):
            unique_key = unique_key(*args, **kwargs)
        eta = opts.eta(now)
        return JobRecord(
            id=os.urandom(16).hex(),
            task=task.name,
            payload=payload,
            queue=opts.queue,
            priority=opts.priority,
            status=SCHEDULED if eta > now else QUEUED,
            max_attempts=opts.retries + 1,
            retry_delay=float(opts.retry_delay),
            timeout=opts.timeout,
            unique_key=unique_key,
            eta=eta,
            enqueued_at=now,
        )


def check_size(record: JobRecord, max_payload: int) -> None:
    """Raise :class:`PayloadTooLarge` when encoded arguments exceed ``max_payload`` bytes."""
    payload = record.payload
    if len(payload) * 4 > max_payload and len(payload.encode()) > max_payload:
        raise PayloadTooLarge(
            f"the arguments of {record.task} encode to {len(payload.encode()):,} bytes, "
            f"over ERRANDS_MAX_PAYLOAD ({max_payload:,}); pass a file path or row id instead"
        )


def encode_call(task: Task[Any, Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """Encode arguments as JSON; a TypeError names the task and the argument that cannot go."""
    try:
        return serialization.dumps({"args": list(args), "kwargs": kwargs})
    except TypeError:
        for name, value in _named_arguments(task, args, kwargs):
            try:
                serialization.dumps(value)
            except TypeError as exc:
                raise TypeError(
                    f"argument {name!r} of task {task.name} cannot be encoded as JSON: {exc}; "
                    "pass plain values (str, int, float, bool, None, list, dict, tuple, "
                    "datetime, date, UUID, Decimal, bytes)"
                ) from None
        raise


def _named_arguments(
    task: Task[Any, Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> list[tuple[str, Any]]:
    """Each argument with the name a caller knows it by: ``b``, ``targets[1]``, ``when``."""
    named: list[tuple[str, Any]] = []
    bound = task.signature.bind(*args, **kwargs)
    for name, value in bound.arguments.items():
        kind = task.signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            named.extend((f"{name}[{i}]", item) for i, item in enumerate(value))
        elif kind is inspect.Parameter.VAR_KEYWORD:
            named.extend(value.items())
        else:
            named.append((name, value))
    return named


def _split_call(call: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if (
        type(call) is tuple
        and len(call) == 2
        and isinstance(call[0], tuple | list)
        and isinstance(call[1], dict)
    ):
        return tuple(call[0]), call[1]
    if type(call) is tuple:
        return call, {}
    return (call,), {}
