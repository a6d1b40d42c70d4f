"""The scheduler: fires each due tick of an app's schedules, once per tick across every process.

No process-local flag decides whether a tick fired: the backend records the
(schedule name, fire time) pair and enqueues the tick's job in one atomic
step, and only the first scheduler to ask wins. ``Scheduler.run()`` is a loop
around ``tick(now)``, so tests drive the scheduler with an injected clock.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Protocol

from .backends.base import Backend
from .backends.patience import limited
from .exceptions import BackendUnavailable
from .schedules import UTC, Schedule

logger = logging.getLogger("flask_errands")

#: The longest the scheduler sleeps, so it notices clock changes and late-registered schedules.
MAX_WAIT = 30.0
#: The pause before trying again after the backend failed.
ERROR_WAIT = 1.0
#: How long one store call retries a lost connection before the outage is reported.
STORE_PATIENCE = 1.0


@dataclasses.dataclass(frozen=True)
class Fired:
    """A tick this scheduler recorded; ``job_id`` is None when max_running skipped its job."""

    schedule: str
    fire_time: dt.datetime
    job_id: str | None


class TickHost(Protocol):
    """What a scheduler is handed: the schedules, their store, and the app's enqueue path."""

    @property
    def backend(self) -> Backend: ...

    @property
    def schedules(self) -> Mapping[str, Schedule]: ...

    def fire(self, schedule: Schedule, fire_time: dt.datetime, now: float) -> Fired | None:
        """Enqueue the tick's job unless another scheduler fired it first (then None)."""
        ...


class Scheduler:
    """Fires the periodic jobs of one app; run it in any number of processes at once."""

    def __init__(self, host: TickHost, *, clock: Callable[[], float] = time.time) -> None:
        self.host = host
        self.clock = clock
        #: Ticks this scheduler won (another scheduler may have fired the rest).
        self.ticks_fired = 0
        self._watching_since: dict[str, float] = {}
        #: The schedules in force at the last tick (changes made at run time applied), unpaused.
        self._in_force: dict[str, Schedule] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- one step ------------------------------------------------------------

    def tick(self, now: float | None = None) -> list[Fired]:
        """Fire every schedule due at ``now`` (seconds since the epoch); return the ticks won.

        A schedule is due when its latest fire time at or before ``now`` has no
        tick in the backend yet. Missed ticks fire once, as that latest one
        (``catch_up=False`` skips them instead); a schedule this scheduler has
        just met with no tick recorded starts at its next fire time, never a past one.

        Changes made at run time through the store (``Admin.pause_schedule``,
        ``change_schedule``) apply here: a paused schedule does not fire, and
        a tick before its latest resume or change is a past one.
        """
        now = self.clock() if now is None else now
        schedules = self.host.schedules
        if not schedules:
            self._in_force = {}
            return []
        states = self.host.backend.schedule_states()
        last_ticks = self.host.backend.last_ticks()
        in_force = {}
        for name, code in schedules.items():
            state = states.get(name)
            if state is None or not state.paused:
                in_force[name] = code.with_state(state)
        self._in_force = in_force
        fired = []
        for schedule in in_force.values():
            state = states.get(schedule.name)
            since = 0.0 if state is None else state.since
            fire_time = self.due(schedule, now, last_ticks.get(schedule.name), since=since)
            if fire_time is None:
                continue
            try:
                won = self.host.fire(schedule, fire_time, now)
            except BackendUnavailable:
                raise  # the loop reports it once, not once per schedule
            except Exception:
                logger.exception("schedule %s: could not fire its tick", schedule.name)
                continue
            if won is not None:
                self.ticks_fired += 1
                fired.append(won)
        return fired

    def due(
        self,
        schedule: Schedule,
        now: float,
        last: tuple[float, str | None] | None,
        *,
        since: float = 0.0,
    ) -> dt.datetime | None:
        """The fire time ``schedule`` is due for at ``now``, or None; ``last`` is its last tick.

        ``since`` is when it was last resumed or re-timed: a tick before it never fires.
        """
        watching = self._watching_since.setdefault(schedule.name, now)
        latest = schedule.latest_run(dt.datetime.fromtimestamp(now, UTC))
        at = latest.timestamp()
        if last is not None and at <= last[0]:
            return None
        if (last is None or not schedule.catch_up) and at < watching:
            return None  # it fell before this scheduler was watching: a past tick
        if at < since:
            return None  # it fell while paused, or under the timing it had before
        return latest

    def seconds_to_next_tick(self, now: float) -> float:
        """How long to sleep before the next fire time of any schedule, at most MAX_WAIT.

        Uses the schedules in force at the last tick; a change made elsewhere
        since is seen within MAX_WAIT.
        """
        after = dt.datetime.fromtimestamp(now, UTC)
        schedules = self.host.schedules if self._in_force is None else self._in_force
        waits = [s.next_run(after).timestamp() - now for s in schedules.values()]
        return max(0.0, min([MAX_WAIT, *waits]))

    # -- the loop ------------------------------------------------------------

    def run(self, stop: threading.Event | None = None) -> None:
        """Fire ticks until ``stop`` is set, sleeping until the next fire time in between."""
        stop = self._stop if stop is None else stop
        with limited(STORE_PATIENCE, stop):
            self._loop(stop)

    def _loop(self, stop: threading.Event) -> None:
        store_down = False
        while not stop.is_set():
            try:
                self.tick()
                wait = self.seconds_to_next_tick(self.clock())
                if store_down:
                    logger.warning("errands scheduler: the store is reachable again")
                    store_down = False
            except BackendUnavailable as exc:
                if not store_down:
                    logger.warning("errands scheduler: %s; retrying until it is back", exc)
                    store_down = True
                wait = ERROR_WAIT
            except Exception:
                logger.exception("errands scheduler: tick failed, retrying in %gs", ERROR_WAIT)
                wait = ERROR_WAIT
            stop.wait(wait)

    def start(self) -> Scheduler:
        """Run the loop in a daemon thread; returns at once."""
        self._stop.clear()
        self._thread = threading.Thread(
            target=self.run, args=(self._stop,), name="errands-scheduler", daemon=True
        )
        self._thread.start()
        return self

    def stop(self, *, wait: bool = True) -> None:
        """Stop the loop started by :meth:`start`; a tick in progress completes first."""
        self._stop.set()
        thread = self._thread
        if wait and thread is not None and thread is not threading.current_thread():
            thread.join()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()
