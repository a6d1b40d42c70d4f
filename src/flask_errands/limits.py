"""Rate and concurrency limits: how they are written, carried on a job, and enforced.

A limit belongs to a task (``@errands.task(rate_limit="10/s", concurrency=2)``) or a queue
(``ERRANDS_QUEUE_LIMITS``). Each job carries the limits that apply to it as JSON text in its
record (``JobRecord.limits``), so any worker of the deployment enforces the same ones, even
one that does not know the task. Stores enforce them in their claim, atomically, through a
:class:`Gate`: concurrency counts the running jobs of the task (or queue) whose lease has not
expired, so a dead worker's slot comes back with its lease; a rate limit allows a start only
while fewer than N starts of the task (or queue) fall in the last window, a sliding log kept
in the store (the start N before this one must be a whole window old).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

#: The seconds in each unit a rate limit may be given per.
UNITS = {
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
}
#: How soon a claim looks again at a job held back by a concurrency limit (a slot may free
#: up in another process, which sends no wake-up when its job ends).
CONCURRENCY_RECHECK = 0.1
#: A store deletes the starts a rate limit no longer needs once per this many starts.
FORGET_EVERY = 32

_RATE = re.compile(r"^\s*(\d+)\s*/\s*([a-z]+?)s?\s*$")


def parse_rate(value: object) -> tuple[int, float]:
    """``"10/s"``, ``"100/m"``, ``"5/hour"`` as ``(starts, seconds)``; ValueError naming it."""
    if not isinstance(value, str):
        raise TypeError(f"rate_limit must be a string such as '10/s', not {value!r}")
    found = _RATE.match(value.lower())
    per = UNITS.get(found.group(2)) if found else None
    if found is None or per is None or int(found.group(1)) < 1:
        raise ValueError(
            f"rate_limit {value!r} is not N starts per s, m or h (N at least 1), "
            "such as '10/s', '100/m' or '5/hour'"
        )
    return int(found.group(1)), per


def check_concurrency(value: object) -> int:
    """``concurrency=`` as a whole number of at least 1; ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"concurrency must be a whole number of at least 1, not {value!r}")
    if value < 1:
        raise ValueError(f"concurrency must be at least 1, not {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class Limit:
    """The limits of one task or queue: ``key`` is ``task:<name>`` or ``queue:<name>``."""

    key: str
    rate: int | None = None
    per: float | None = None
    concurrency: int | None = None

    @classmethod
    def of(cls, key: str, rate_limit: str | None, concurrency: int | None) -> Limit | None:
        """Check and build a limit; None when neither is given."""
        if rate_limit is None and concurrency is None:
            return None
        rate, per = parse_rate(rate_limit) if rate_limit is not None else (None, None)
        if concurrency is not None:
            check_concurrency(concurrency)
        return cls(key, rate, per, concurrency)

    @property
    def kind(self) -> str:
        """``task`` or ``queue``: the job column a concurrency limit counts running jobs by."""
        return self.key.partition(":")[0]

    @property
    def name(self) -> str:
        return self.key.partition(":")[2]

    def describe(self) -> dict[str, Any]:
        """The limit as people read it: ``{"rate_limit": "5/s", "concurrency": 2}``."""
        rate = None
        if self.rate is not None and self.per is not None:
            unit = {1.0: "s", 60.0: "m", 3600.0: "h"}.get(self.per, f"{self.per:g}s")
            rate = f"{self.rate}/{unit}"
        return {"rate_limit": rate, "concurrency": self.concurrency}


def queue_limits(value: Mapping[str, Any] | None) -> dict[str, Limit]:
    """``ERRANDS_QUEUE_LIMITS`` checked: ``{queue: Limit}``; ValueError naming a bad value."""
    limits: dict[str, Limit] = {}
    for queue, spec in (value or {}).items():
        if not isinstance(spec, Mapping) or set(spec) - {"rate_limit", "concurrency"}:
            raise ValueError(
                f"ERRANDS_QUEUE_LIMITS[{queue!r}] must be a dict of rate_limit and/or "
                f"concurrency, not {spec!r}"
            )
        try:
            limit = Limit.of(f"queue:{queue}", spec.get("rate_limit"), spec.get("concurrency"))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"ERRANDS_QUEUE_LIMITS[{queue!r}]: {exc}") from None
        if limit is not None:
            limits[queue] = limit
    return limits


def encode(limits: Iterable[Limit | None]) -> str | None:
    """The limits of a job as the JSON text its record carries; None when it has none."""
    rows = [[lim.key, lim.rate, lim.per, lim.concurrency] for lim in limits if lim is not None]
    return json.dumps(rows, separators=(",", ":")) if rows else None


@functools.lru_cache(maxsize=256)
def with_queue_limit(limits: str | None, queue: Limit) -> str | None:
    """A job's ``limits`` text with its queue's limit added."""
    return encode([*(decode(limits) if limits else ()), queue])


@functools.lru_cache(maxsize=256)
def decode(text: str) -> tuple[Limit, ...]:
    """The limits in a record's ``limits`` text."""
    rows = json.loads(text)
    return tuple(Limit(str(k), r, None if p is None else float(p), c) for k, r, p, c in rows)


#: ``running(kind, name)``: the jobs of a task (kind ``task``) or queue under a live lease.
Running = Callable[[str, str], int]
#: ``starts(key, rate, window)``: ``(done, {n: time})``, the starts of ``key`` so far and the
#: times of those numbered (from 0) ``done - rate`` to ``done - rate + window - 1`` still held.
Starts = Callable[[str, int, int], tuple[int, dict[int, float]]]


class Gate:
    """Which of a claim's candidates may start now; one per claim, inside its atomic step.

    The store hands each candidate's ``limits`` text to :meth:`admit` in claim order; a job
    admitted counts at once against the jobs after it. Afterwards :attr:`started` holds the
    starts to log (``{key: (starts so far, [times])}``) and :attr:`free_at` when a job held
    back may next start (a hint for the worker's sleep).
    """

    def __init__(self, now: float, running: Running, starts: Starts, window: int) -> None:
        self.now = now
        self._running_of = running
        self._starts_of = starts
        self._window = window
        self._running: dict[str, int] = {}
        self._starts: dict[str, tuple[int, dict[int, float]]] = {}
        #: The keys a job was held back by in this claim.
        self.held: set[str] = set()
        #: The earliest time a held job may start, or None when none was held.
        self.free_at: float | None = None
        #: New starts by key: the number of the first, and their times.
        self.started: dict[str, tuple[int, list[float]]] = {}
        self._rates: dict[str, int] = {}

    def admit(self, text: str | None) -> bool:
        """Whether a job with these limits may start now; if so it is counted."""
        if text is None:
            return True
        limits = decode(text)
        for limit in limits:
            if limit.key in self.held:
                return False
            if limit.concurrency is not None:
                if limit.key not in self._running:
                    self._running[limit.key] = self._running_of(limit.kind, limit.name)
                if self._running[limit.key] >= limit.concurrency:
                    return self._hold(limit.key, self.now + CONCURRENCY_RECHECK)
            if limit.rate is not None and limit.per is not None:
                self._rates[limit.key] = limit.rate
                done, times = self._load(limit.key, limit.rate)
                new = self._new(limit.key)
                back = done + len(new) - limit.rate  # the start ``rate`` before this one
                earlier = new[back - done] if back >= done else times.get(back)
                if earlier is not None and earlier > self.now - limit.per:
                    return self._hold(limit.key, earlier + limit.per)
        for limit in limits:
            if limit.concurrency is not None:
                self._running[limit.key] += 1
            if limit.rate is not None:
                self._new(limit.key).append(self.now)
        return True

    def _load(self, key: str, rate: int) -> tuple[int, dict[int, float]]:
        if key not in self._starts:
            # The starts this claim may look back to: ``rate`` before each it may admit.
            self._starts[key] = self._starts_of(key, rate, self._window)
        return self._starts[key]

    def _new(self, key: str) -> list[float]:
        if key not in self.started:
            self.started[key] = (self._starts[key][0], [])
        return self.started[key][1]

    def _hold(self, key: str, until: float) -> bool:
        self.held.add(key)
        self.free_at = until if self.free_at is None else min(self.free_at, until)
        return False

    def log(self) -> list[tuple[str, list[tuple[int, float]], int | None]]:
        """The starts to log, per key: ``(key, [(n, time)], keep_from)``.

        Starts numbered below ``keep_from`` are no longer needed: a store deletes them when
        it is not None, which it is once every :data:`FORGET_EVERY` starts.
        """
        rows = []
        for key, (first, times) in self.started.items():
            if not times:
                continue
            keep_from = first + len(times) - self._rates[key]
            crossed = keep_from // FORGET_EVERY != (keep_from - len(times)) // FORGET_EVERY
            rows.append((key, list(enumerate(times, first)), keep_from if crossed else None))
        return rows

    def held_names(self, kind: str) -> list[str]:
        """The tasks (``kind="task"``) or queues held back, for a store to skip in SQL."""
        return sorted(key.partition(":")[2] for key in self.held if key.startswith(kind + ":"))
