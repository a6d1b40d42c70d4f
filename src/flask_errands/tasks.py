"""``Task``: a function registered with ``@errands.task``, and how its calls become jobs."""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import inspect
import math
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, Protocol, TypeVar

from . import serialization
from .backends.base import QUEUED, SCHEDULED, JobRecord, random_id
from .durations import FORMS, parse_duration
from .exceptions import PayloadTooLarge
from .limits import Limit, encode

if TYPE_CHECKING:
    from .jobs import Job

P = ParamSpec("P")
R = TypeVar("R")

UniqueKey = str | Callable[..., str] | None

#: The priorities every store can hold (a signed 32-bit integer); higher runs first.
PRIORITY_RANGE = (-(2**31), 2**31 - 1)
#: The longest queue name, in characters.
MAX_QUEUE_LENGTH = 200
#: The longest unique key, in characters (PostgreSQL indexes keys of up to about 2,700 bytes).
MAX_UNIQUE_KEY_LENGTH = 500
#: The most retries a task may ask for (an explicit ``Retry`` is not counted against it).
MAX_RETRIES = 1000
#: The longest ``timeout``: a year, in seconds.
MAX_TIMEOUT = 365 * 86400.0
#: The latest instant a job may be due: the start of 31 December 9999, UTC.
MAX_ETA = dt.datetime(9999, 12, 31, tzinfo=dt.timezone.utc).timestamp()
#: How many call shapes (positional count, keyword names) a task remembers as valid.
MAX_SHAPES = 256


class Enqueuer(Protocol):
    """Where a task's calls go: the owner that stores them as jobs (``Errands``)."""

    def enqueue(self, records: list[JobRecord]) -> list[Job]:
        """Store new job records and return their jobs."""
        ...


@dataclasses.dataclass(frozen=True)
class TaskOptions:
    """How a task's jobs are queued and retried; set on the decorator, overridden per call.

    Every value is checked here, once, whatever the store: a wrong type raises
    ``TypeError``, a value out of its range ``ValueError`` naming the range,
    and an unknown option name ``TypeError`` listing the valid ones. ``delay``
    is seconds, a timedelta or a duration string (``"30s"``, ``"15m"``); a
    negative ``delay`` or a past ``at`` means now.
    """

    queue: str = "default"
    priority: int = 0
    retries: int = 0
    retry_delay: float = 1.0
    timeout: float | None = None
    unique_key: UniqueKey = None
    delay: float | dt.timedelta | str | None = None
    at: dt.datetime | None = None
    #: At most N starts per second, minute or hour (``"10/s"``), across the deployment.
    rate_limit: str | None = None
    #: At most N jobs of the task running at once, across the deployment.
    concurrency: int | None = None

    def __new__(cls, *args: Any, **kwargs: Any) -> TaskOptions:
        unknown = sorted(set(kwargs) - set(OPTION_NAMES))
        if unknown:
            raise TypeError(
                f"unknown task option(s) {', '.join(map(repr, unknown))}; "
                f"valid options are {', '.join(OPTION_NAMES)}"
            )
        return super().__new__(cls)

    def __post_init__(self) -> None:
        check_queue(self.queue)
        low, high = PRIORITY_RANGE
        _check_int("priority", self.priority, low, high)
        _check_int("retries", self.retries, 0, MAX_RETRIES)
        _check_seconds("retry_delay", self.retry_delay, 0.0, math.inf)
        if self.timeout is not None:
            _check_seconds("timeout", self.timeout, 0.0, MAX_TIMEOUT)
            if self.timeout == 0:
                raise ValueError(f"timeout must be positive seconds, not {self.timeout!r}")
        if self.unique_key is not None and not callable(self.unique_key):
            check_unique_key(self.unique_key)
        if self.delay is not None:
            _delay_seconds(self.delay)
        if self.at is not None:
            _at_timestamp(self.at)
            if self.delay is not None:
                raise ValueError("give delay= or at=, not both")
        Limit.of("task:", self.rate_limit, self.concurrency)

    def limits(self, task: str) -> str | None:
        """The task's limits as a job record carries them (``limits.encode``), or None."""
        if self.rate_limit is None and self.concurrency is None:
            return None
        return _task_limits(task, self.rate_limit, self.concurrency)

    def eta(self, now: float) -> float:
        """When a job enqueued ``now`` with these options is due: never before ``now``.

        Raises ``ValueError`` when that instant is past :data:`MAX_ETA`.
        """
        if self.at is not None:
            eta = _at_timestamp(self.at)
        elif self.delay is not None:
            eta = now + _delay_seconds(self.delay)
        else:
            return now
        if not eta <= MAX_ETA:
            given = f"at={self.at!r}" if self.at is not None else f"delay={self.delay!r}"
            raise ValueError(f"{given} is after 9999-12-31, the latest time a job can be due")
        return max(eta, now)


OPTION_NAMES = tuple(sorted(field.name for field in dataclasses.fields(TaskOptions)))


@functools.lru_cache(maxsize=256)
def _task_limits(task: str, rate_limit: str | None, concurrency: int | None) -> str | None:
    return encode([Limit.of(f"task:{task}", rate_limit, concurrency)])


def check_queue(queue: object) -> None:
    """Refuse a queue name no store can hold: empty, too long, or with control characters."""
    if not isinstance(queue, str):
        raise TypeError(f"queue must be a string, not {queue!r}")
    if not 1 <= len(queue) <= MAX_QUEUE_LENGTH:
        raise ValueError(
            f"queue must be 1 to {MAX_QUEUE_LENGTH} characters long, not {len(queue)}"
        )
    _check_text("queue", queue)


def check_unique_key(key: object) -> None:
    """Refuse a unique key no store can index: not a string, too long, or holding NUL."""
    if not isinstance(key, str):
        raise TypeError(f"unique_key must be a string or a function returning one, not {key!r}")
    if len(key) > MAX_UNIQUE_KEY_LENGTH:
        raise ValueError(
            f"unique_key must be at most {MAX_UNIQUE_KEY_LENGTH} characters long, not {len(key)}"
        )
    _check_text("unique_key", key, controls=True)


def _check_text(name: str, text: str, *, controls: bool = False) -> None:
    """Refuse NUL and lone surrogates, and other control characters unless ``controls``."""
    if "\x00" in text or (
        not controls
        and not text.isprintable()
        and any(ord(c) < 32 or 127 <= ord(c) < 160 for c in text)
    ):
        what = "NUL" if controls else "control characters or NUL"
        raise ValueError(f"{name} must not contain {what}, not {text!r}")
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            raise ValueError(
                f"{name} must be valid Unicode (no lone surrogate), not {text!r}"
            ) from None


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int from {low} to {high}, not {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be from {low} to {high}, not {value!r}")


def _check_seconds(name: str, value: object, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds, not {value!r}")
    limit = "" if high == math.inf else f" and at most {high:,.0f}"
    if not low <= value <= high or not math.isfinite(value):
        raise ValueError(f"{name} must be finite, at least {low:g}{limit} seconds, not {value!r}")
    return float(value)


def _delay_seconds(delay: object) -> float:
    """``delay=`` as seconds: a number, a timedelta or a duration string; finite, or ValueError."""
    if isinstance(delay, dt.timedelta):
        seconds = delay.total_seconds()
    elif isinstance(delay, str):
        seconds = parse_duration(delay)
    elif isinstance(delay, int | float) and not isinstance(delay, bool):
        seconds = float(delay)
    else:
        raise TypeError(f"delay= must be {FORMS}, or a timedelta; not {delay!r}")
    if not math.isfinite(seconds):
        raise ValueError(f"delay= must be a finite number of seconds, not {delay!r}")
    return seconds


def _at_timestamp(at: object) -> float:
    """``at=`` as a timestamp, or an error saying why it names no possible instant."""
    if not isinstance(at, dt.datetime):
        raise TypeError(f"at= must be an aware datetime, not {at!r}")
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError("at= needs an aware datetime (with tzinfo), so its instant is known")
    try:
        return at.timestamp()
    except (OverflowError, ValueError):
        raise ValueError(f"at={at!r} is not an instant that can be stored") from None


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
        #: Call shapes, ``(positional count, keyword names)``, the signature is known to accept.
        self.shapes: set[tuple[int, tuple[str, ...]]] = set()
        #: An ``async def`` task runs on the worker's event loop, not on one of its threads.
        self.is_async = inspect.iscoroutinefunction(func)
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

    def s(self, *args: Any, **kwargs: Any) -> Signature:
        """A call to make later, as a step of a workflow (``chain``, ``group``, ``chord``).

        A step after another receives its result (or a group's list of results)
        before ``args``.
        """
        return self._bound.s(*args, **kwargs)

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

    def s(self, *args: Any, **kwargs: Any) -> Signature:
        """A call with these options, to make later as a workflow step; see :meth:`Task.s`."""
        return Signature(self, args, kwargs)

    def build(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        now: float,
        *,
        takes_input: bool = False,
    ) -> JobRecord:
        """Check and encode one call into a new job record; raise before anything is stored.

        ``takes_input``: the call gets an upstream result as first argument when it runs.
        """
        task, opts = self.task, self.opts
        # Whether a call binds depends on its shape alone, not on its values: check each
        # shape once (``Signature.bind`` costs more than the rest of the build together).
        shape = (len(args) + takes_input, tuple(kwargs))
        if shape not in task.shapes:
            try:
                task.signature.bind(*((None,) if takes_input else ()), *args, **kwargs)
            except TypeError as exc:
                raise TypeError(f"{task.name}.delay(): {exc}") from None
            if len(task.shapes) < MAX_SHAPES:
                task.shapes.add(shape)
        payload = encode_call(task, args, kwargs)
        unique_key = opts.unique_key
        if callable(unique_key):
            unique_key = unique_key(*args, **kwargs)
            check_unique_key(unique_key)
        eta = opts.eta(now)
        return JobRecord(
            id=random_id(),
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
            limits=opts.limits(task.name),
        )


class Signature:
    """A task with its arguments and options, not enqueued: one step of a workflow."""

    def __init__(
        self, bound: BoundTask[Any, Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        self.bound = bound
        self.args = args
        self.kwargs = kwargs

    @property
    def task(self) -> Task[Any, Any]:
        return self.bound.task

    def options(self, **overrides: Any) -> Signature:
        """The same call with options overridden, as ``task.options()`` does."""
        options = dataclasses.replace(self.bound.opts, **overrides)
        return Signature(BoundTask(self.bound.task, options), self.args, self.kwargs)

    def delay(self) -> Job:
        """Enqueue the call alone and return its :class:`Job`."""
        return self.bound.delay(*self.args, **self.kwargs)

    def build(self, now: float, *, takes_input: bool) -> JobRecord:
        """Check and encode this step into a new job record (see :meth:`BoundTask.build`)."""
        if self.bound.opts.unique_key is not None:
            raise ValueError(f"{self.task.name}: a workflow step cannot have a unique_key")
        return self.bound.build(self.args, self.kwargs, now, takes_input=takes_input)

    def __repr__(self) -> str:
        call = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"{self.task.name}.s({', '.join(call)})"


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
    if not args and not kwargs:
        return serialization.NO_ARGUMENTS
    try:
        return serialization.dumps({"args": list(args), "kwargs": kwargs})
    except TypeError as whole:
        for name, value in _named_arguments(task, args, kwargs):
            try:
                serialization.dumps(value)
            except TypeError as exc:
                raise TypeError(
                    f"argument {name!r} of task {task.name} cannot be encoded as JSON: {exc}; "
                    "pass plain values (str, int, float, bool, None, list, dict, tuple, "
                    "datetime, date, UUID, Decimal, bytes)"
                ) from None
        # Each argument alone fits; together they nest one level too deep.
        raise TypeError(f"the arguments of task {task.name}: {whole}") from None


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
