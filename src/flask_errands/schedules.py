"""Schedule definitions: every and cron parsed and checked once, fire times as pure functions.

A schedule's fire times depend on nothing but its definition, so every
scheduler in every process computes the same instants and the backend can
key each tick by (schedule name, fire time). ``every`` ticks fall on whole
multiples of the interval since the Unix epoch (``every=60`` fires at the top
of each UTC minute); cron ticks are wall-clock times in the schedule's time
zone, parsed and iterated by ``cronsim``, which fires a time skipped by a DST
change once at the transition and a time that occurs twice only once.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib
import inspect
import logging
import math
import zoneinfo
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

from cronsim import CronSim, CronSimError

from . import serialization
from .backends.base import ScheduleState
from .exceptions import ConfigurationError
from .tasks import Task, TaskOptions

UTC = dt.timezone.utc

logger = logging.getLogger("flask_errands")

#: The ``@macros`` a cron expression may use, and the five fields each stands for.
MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}

#: Keys an ``ERRANDS_SCHEDULE`` entry may have.
CONFIG_KEYS = frozenset(
    {
        "name",
        "task",
        "every",
        "cron",
        "timezone",
        "args",
        "kwargs",
        "queue",
        "priority",
        "catch_up",
        "max_running",
        "rate_limit",
        "concurrency",
    }
)

_SECOND = dt.timedelta(seconds=1)

#: Each cron field by position, and the values it takes, for error messages.
CRON_FIELDS = (
    ("minute", "0-59"),
    ("hour", "0-23"),
    ("day-of-month", "1-31"),
    ("month", "1-12 or jan-dec"),
    ("day-of-week", "0-7 or sun-sat (0 and 7 are Sunday)"),
)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """When a task runs by itself: every N seconds, or at the times of a cron expression.

    Built from the ``@errands.periodic`` decorator or an ``ERRANDS_SCHEDULE``
    entry; every bad value raises :class:`ConfigurationError` (a ``ValueError``)
    naming the schedule, so a typo fails at start-up, not at 3 a.m.
    """

    name: str
    task: str
    every: float | None = None
    cron: str | None = None
    timezone: str | None = None
    args: Sequence[Any] = ()
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    catch_up: bool = True
    max_running: int | None = None
    #: Task options (``queue``, ``priority``) applied to this schedule's jobs only.
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    _fields: str = dataclasses.field(default="", init=False, repr=False, compare=False)
    _zone: dt.tzinfo = dataclasses.field(default=UTC, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ConfigurationError(f"a schedule needs a non-empty name, not {self.name!r}")
        if (self.every is None) == (self.cron is None):
            self._invalid("give exactly one of every= (seconds) or cron= (an expression)")
        if self.every is not None:
            object.__setattr__(self, "every", self._interval(self.every))
            if self.timezone is not None:
                self._invalid("timezone= applies to cron schedules; every= counts seconds in UTC")
        else:
            object.__setattr__(self, "_zone", self._load_zone(self.timezone or "UTC"))
            object.__setattr__(self, "_fields", self._parse_cron(self.cron))
        if not isinstance(self.catch_up, bool):
            self._invalid(f"catch_up must be True or False, not {self.catch_up!r}")
        if self.max_running is not None and (
            isinstance(self.max_running, bool) or self.max_running != 1
        ):
            self._invalid(
                f"max_running must be 1 (skip a tick while the last run is live) or None "
                f"(no limit), not {self.max_running!r}"
            )
        if not isinstance(self.args, Sequence) or isinstance(self.args, str | bytes):
            self._invalid(f"args must be a list or tuple, not {self.args!r}")
        if not isinstance(self.kwargs, Mapping) or not all(
            isinstance(k, str) for k in self.kwargs
        ):
            self._invalid(f"kwargs must be a dict with string keys, not {self.kwargs!r}")
        object.__setattr__(self, "args", tuple(self.args))

    # -- fire times ----------------------------------------------------------

    @property
    def zone(self) -> dt.tzinfo:
        """The zone fire times are computed and shown in: UTC for ``every``."""
        return self._zone

    @property
    def description(self) -> str:
        """How the schedule reads in a listing: ``every 60s`` or ``cron 0 3 * * * (UTC)``."""
        if self.every is not None:
            return f"every {self.every:g}s"
        return f"cron {self.cron} ({self.timezone or 'UTC'})"

    def next_run(self, after: dt.datetime) -> dt.datetime:
        """The first fire time strictly after ``after`` (an aware datetime), in :attr:`zone`."""
        moment = _timestamp(after)
        if self.every is not None:
            step = self.every
            k = math.floor(moment / step) + 1
            while k * step <= moment:
                k += 1
            return dt.datetime.fromtimestamp(k * step, UTC)
        for candidate in CronSim(self._fields, after.astimezone(self._zone)):
            # cronsim may answer with the first occurrence of a repeated hour
            # when ``after`` lies in the second one; that time has passed.
            if candidate.timestamp() > moment:
                return candidate
        raise AssertionError("unreachable: a validated cron expression always fires again")

    def latest_run(self, until: dt.datetime) -> dt.datetime:
        """The last fire time at or before ``until`` (an aware datetime), in :attr:`zone`."""
        moment = _timestamp(until)
        if self.every is not None:
            step = self.every
            k = math.floor(moment / step)
            while k * step > moment:
                k -= 1
            return dt.datetime.fromtimestamp(k * step, UTC)
        start = (until + dt.timedelta(microseconds=1)).astimezone(self._zone)
        candidate = next(CronSim(self._fields, start, reverse=True))
        while candidate.timestamp() > moment:  # defensive: reverse iteration near a fold
            candidate = next(CronSim(self._fields, candidate - _SECOND, reverse=True))
        # Reverse iteration can step over a fire time in a repeated hour; walk forward to it.
        following = self.next_run(candidate)
        while following.timestamp() <= moment:
            candidate, following = following, self.next_run(following)
        return candidate

    def retimed(
        self, *, every: float | dt.timedelta | None = None, cron: str | None = None
    ) -> Schedule:
        """This schedule with another timing, checked as at decoration (``ConfigurationError``).

        Exactly one of ``every`` and ``cron``; a cron keeps this schedule's zone
        (UTC for one that was ``every``), as ``every`` always counts in UTC.
        """
        if (every is None) == (cron is None):
            self._invalid("give exactly one of every= (seconds) or cron= (an expression)")
        zone = self.timezone if cron is not None else None
        return dataclasses.replace(self, every=every, cron=cron, timezone=zone)  # type: ignore[arg-type]

    def with_state(self, state: ScheduleState | None) -> Schedule:
        """The schedule in force: its timing as changed at run time, if it was.

        A stored timing this version refuses (it cannot be, unless written by
        hand) is ignored with a warning, so one bad row never stops the others.
        """
        if state is None or (state.every is None and state.cron is None):
            return self
        try:
            return self.retimed(every=state.every, cron=state.cron)
        except ConfigurationError as exc:
            logger.warning("%s; keeping the timing given in code", exc)
            return self

    # -- validation ----------------------------------------------------------

    def _invalid(self, why: str) -> NoReturn:
        raise ConfigurationError(f"schedule {self.name!r}: {why}")

    def _interval(self, every: Any) -> float:
        if isinstance(every, dt.timedelta):
            every = every.total_seconds()
        if isinstance(every, bool) or not isinstance(every, int | float) or not every > 0:
            self._invalid(
                f"every must be a positive number of seconds or a timedelta, not {every!r}"
            )
        if not math.isfinite(every):
            self._invalid(f"every must be finite, not {every!r}")
        return float(every)

    def _load_zone(self, name: Any) -> dt.tzinfo:
        if not isinstance(name, str) or not name:
            self._invalid(f"timezone must be a zone name such as 'Europe/Paris', not {name!r}")
        try:
            return zoneinfo.ZoneInfo(name)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            self._invalid(f"unknown time zone {name!r}; use an IANA name such as 'Europe/Paris'")

    def _parse_cron(self, expression: Any) -> str:
        """Return the five fields of ``expression``, with ``@macros`` expanded, once checked."""
        if not isinstance(expression, str):
            self._invalid(f"cron must be a string, not {expression!r}")
        text = " ".join(expression.split())
        if not text:
            self._invalid("cron expression is empty; e.g. cron='0 3 * * *' for 03:00 daily")
        if text.startswith("@"):
            if text.lower() not in MACROS:
                self._invalid(f"unknown cron macro {text!r}; use one of {', '.join(MACROS)}")
            text = MACROS[text.lower()]
        fields = text.split(" ")
        if len(fields) != 5:
            self._invalid(
                f"cron {expression!r} has {len(fields)} field(s); it needs five: "
                "minute hour day-of-month month day-of-week"
            )
        try:
            CronSim(text, dt.datetime(2000, 1, 1, tzinfo=self._zone))
        except CronSimError as exc:
            self._invalid(f"bad cron expression {expression!r}: {_explain(fields, exc)}")
        return text


def _explain(fields: list[str], exc: CronSimError) -> str:
    """Which field is wrong and the values it takes (``hour must be 0-23, got 25``).

    A day-of-month that is valid on its own but never meets its month says so.
    """
    reason = str(exc)
    if "day-of-month" in reason:
        try:
            CronSim(f"0 0 {fields[2]} * *", dt.datetime(2000, 1, 1, tzinfo=UTC))
        except CronSimError:
            pass
        else:
            return f"day {fields[2]} never occurs in month {fields[3]}, so it can never fire"
    for position, (name, valid) in enumerate(CRON_FIELDS):
        if reason == f"Bad {name}":
            return f"{name} must be {valid}, got {fields[position]}"
    return reason


def _timestamp(moment: dt.datetime) -> float:
    if moment.tzinfo is None:
        raise ValueError("schedules need an aware datetime (with tzinfo), so its instant is known")
    return moment.timestamp()


# -- checking a schedule's call and reading the config ---------------------------


def check_call(schedule: Schedule, func: Callable[..., Any]) -> None:
    """Refuse ``args``/``kwargs`` that do not fit ``func`` or cannot be encoded as JSON."""
    try:
        inspect.signature(func).bind(*schedule.args, **schedule.kwargs)
    except TypeError as exc:
        schedule._invalid(f"args/kwargs do not fit {schedule.task}: {exc}")
    try:
        serialization.dumps({"args": list(schedule.args), "kwargs": dict(schedule.kwargs)})
    except TypeError as exc:
        schedule._invalid(f"args/kwargs cannot be encoded as JSON: {exc}")


@dataclasses.dataclass(frozen=True)
class ConfigSchedule:
    """An ``ERRANDS_SCHEDULE`` entry, checked: its schedule and the function it runs.

    ``task`` is the imported object when it is already a registered task,
    else None: the caller registers ``func`` under ``schedule.task`` itself.
    """

    schedule: Schedule
    func: Callable[..., Any]
    task: Task[Any, Any] | None


def schedules_from_config(entries: Sequence[Any]) -> list[ConfigSchedule]:
    """Validate ``ERRANDS_SCHEDULE`` and import each entry's function; register nothing.

    Each problem raises :class:`ConfigurationError` naming the entry and what is wrong.
    """
    found: dict[str, ConfigSchedule] = {}
    for position, entry in enumerate(entries):
        label = f"ERRANDS_SCHEDULE[{position}]"
        if not isinstance(entry, Mapping):
            raise ConfigurationError(f"{label} must be a dict, not {entry!r}")
        path = entry.get("task")
        name = entry.get("name", path)
        if isinstance(name, str) and name:
            label = f"schedule {name!r}"
        unknown = sorted(set(entry) - CONFIG_KEYS)
        if unknown:
            raise ConfigurationError(
                f"{label}: unknown key(s) {', '.join(map(repr, unknown))}; "
                f"expected {', '.join(sorted(CONFIG_KEYS))}"
            )
        if not isinstance(path, str) or not path:
            raise ConfigurationError(
                f"{label}: 'task' must name a function as 'package.module:function'"
            )
        target = import_path(path, label)
        task = target if isinstance(target, Task) else None
        if task is not None:
            func, task_name = task.func, task.name
        elif callable(target):
            func = getattr(target, "func", target)
            task_name = f"{func.__module__}.{func.__qualname__}"
        else:
            raise ConfigurationError(f"{label}: {path!r} is {target!r}, not a function")
        options = {
            key: entry[key]
            for key in ("queue", "priority", "rate_limit", "concurrency")
            if key in entry
        }
        schedule = Schedule(
            name=name,
            task=task_name,
            every=entry.get("every"),
            cron=entry.get("cron"),
            timezone=entry.get("timezone"),
            args=entry.get("args", ()),
            kwargs=entry.get("kwargs") or {},
            catch_up=entry.get("catch_up", True),
            max_running=entry.get("max_running"),
            options=options,
        )
        try:
            TaskOptions(**options)
        except (TypeError, ValueError) as exc:
            schedule._invalid(str(exc))
        check_call(schedule, func)
        if schedule.name in found:
            schedule._invalid("the name is used by another ERRANDS_SCHEDULE entry")
        found[schedule.name] = ConfigSchedule(schedule, func, task)
    return list(found.values())


def import_path(path: str, label: str) -> Any:
    """Import ``package.module:attribute`` (or ``package.module.attribute``) and return it."""
    module_name, _, attribute = path.partition(":") if ":" in path else path.rpartition(".")
    if not module_name or not attribute:
        raise ConfigurationError(
            f"{label}: task {path!r} must look like 'package.module:function'"
        )
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except Exception as exc:
        raise ConfigurationError(
            f"{label}: task {path!r} does not import: {type(exc).__name__}: {exc}"
        ) from None
    return target
