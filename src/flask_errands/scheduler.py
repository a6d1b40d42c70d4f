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
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import signals
from .backends.base import JobRecord
from .jobs import Job, JobStatus
from .schedules import UTC, Schedule

if TYPE_CHECKING:
    from .extension import AppState

logger = logging.getLogger("flask_errands")

#: The longest the scheduler sleeps, so it notices clock changes and late-registered schedules.
MAX_WAIT = 30.0
#: The pause before trying again after the backend failed.
ERROR_WAIT = 1.0


@dataclasses.dataclass(frozen=True)
class Fired:
    """A tick this scheduler recorded; ``job_id`` is None when max_running skipped its job."""

    schedule: str
    fire_time: dt.datetime
    job_id: str | None


class Scheduler:
    """Fires the periodic jobs of one app; run it in any number of processes at once."""

    def __init__(self, state: AppState, *, clock: Callable[[], float] = time.time) -> None:
        self.state = state
        self.clock = clock
        #: Ticks this scheduler won (another scheduler may have fired the rest).
        self.ticks_fired = 0
        self._watching_since: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- one step ------------------------------------------------------------

    def tick(self, now: float | None = None) -> list[Fired]:
        """Fire every schedule due at ``now`` (seconds since the epoch); return the ticks won.

        A schedule is due when its latest fire time at or before ``now`` has no
        tick in the backend yet. Missed ticks fire once, as that latest one
        (``catch_up=False`` skips them instead); a schedule this scheduler has
        just met with no tick recorded starts at its next fire time, never a past one.
        """
        now = self.clock() if now is None else now
        schedules = self.state.schedules
        if not schedules:
            return []
        last_ticks = self.state.backend.last_ticks()
        fired = []
        with self.state.app.app_context():
            for schedule in schedules.values():
                fire_time = self.due(schedule, now, last_ticks.get(schedule.name))
                if fire_time is None:
                    continue
                try:
                    won = self._fire(schedule, fire_time, now)
                except Exception:
                    logger.exception("schedule %s: could not fire its tick", schedule.name)
                    continue
                if won is not None:
                    fired.append(won)
        return fired

    def due(
        self, schedule: Schedule, now: float, last: tuple[float, str | None] | None
    ) -> dt.datetime | None:
        """The fire time ``schedule`` is due for at ``now``, or None; ``last`` is its last tick."""
        since = self._watching_since.setdefault(schedule.name, now)
        latest = schedule.latest_run(dt.datetime.fromtimestamp(now, UTC))
        at = latest.timestamp()
        if last is not None and at <= last[0]:
            return None
        if (last is None or not schedule.catch_up) and at < since:
            return None  # it fell before this scheduler was watching: a past tick
        return latest

    def seconds_to_next_tick(self, now: float) -> float:
        """How long to sleep before the next fire time of any schedule, at most MAX_WAIT."""
        after = dt.datetime.fromtimestamp(now, UTC)
        waits = [s.next_run(after).timestamp() - now for s in self.state.schedules.values()]
        return max(0.0, min([MAX_WAIT, *waits]))

    def _fire(self, schedule: Schedule, fire_time: dt.datetime, now: float) -> Fired | None:
        state = self.state
        task = state.errands.tasks.get(schedule.task)
        if task is None:
            logger.error(
                "schedule %s: no task named %r is registered", schedule.name, schedule.task
            )
            return None
        overrides: dict[str, Any] = {**schedule.options, "at": fire_time, "delay": None}
        if schedule.max_running is not None:
            overrides["unique_key"] = f"schedule:{schedule.name}"
        record = task.options(**overrides).build(tuple(schedule.args), dict(schedule.kwargs), now)
        if not state.backend.fire_tick(schedule.name, fire_time.timestamp(), record, now):
            return None  # another scheduler fired this tick first
        self.ticks_fired += 1
        local = fire_time.astimezone(schedule.zone).isoformat()
        if schedule.max_running is not None and state.backend.get(record.id) is None:
            logger.warning(
                "schedule %s: tick %s skipped, its previous run is still queued or running "
                "(max_running=1)",
                schedule.name,
                local,
            )
            return Fired(schedule.name, fire_time, None)
        logger.debug(
            "schedule %s: tick %s enqueued job %s",
            schedule.name,
            local,
            record.id,
            extra={"job_id": record.id, "task": record.task},
        )
        if signals.job_enqueued.receivers:
            signals.job_enqueued.send(state.app, job=Job(record, state.backend))
        return Fired(schedule.name, fire_time, record.id)

    # -- the loop ------------------------------------------------------------

    def run(self, stop: threading.Event | None = None) -> None:
        """Fire ticks until ``stop`` is set, sleeping until the next fire time in between."""
        stop = self._stop if stop is None else stop
        while not stop.is_set():
            try:
                self.tick()
                wait = self.seconds_to_next_tick(self.clock())
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


@dataclasses.dataclass(frozen=True)
class ScheduleInfo:
    """A schedule as ``flask errands schedules`` and the dashboard show it."""

    schedule: Schedule
    #: The next fire time, in the schedule's zone.
    next_run: dt.datetime
    #: The fire time of the latest tick recorded, in the schedule's zone, or None.
    last_run: dt.datetime | None
    #: The job that tick enqueued, or None (no tick yet, or the job was pruned).
    last_job: Job | None

    @property
    def name(self) -> str:
        return self.schedule.name

    @property
    def description(self) -> str:
        return self.schedule.description

    @property
    def next_run_utc(self) -> dt.datetime:
        return self.next_run.astimezone(UTC)

    @property
    def last_status(self) -> JobStatus | None:
        return None if self.last_job is None else self.last_job.status

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values, times as ISO 8601 strings."""
        return {
            "name": self.name,
            "task": self.schedule.task,
            "description": self.description,
            "next_run": self.next_run.isoformat(),
            "next_run_utc": self.next_run_utc.isoformat(),
            "last_run": None if self.last_run is None else self.last_run.isoformat(),
            "last_job_id": None if self.last_job is None else self.last_job.id,
            "last_status": None if self.last_status is None else self.last_status.value,
        }


def describe_schedules(state: AppState, now: float | None = None) -> list[ScheduleInfo]:
    """Every schedule of the app, by name, with its next run and its last tick's job."""
    after = dt.datetime.fromtimestamp(time.time() if now is None else now, UTC)
    backend = state.backend
    last_ticks = backend.last_ticks()
    found = []
    for name, schedule in sorted(state.schedules.items()):
        last_run = last_job = None
        if name in last_ticks:
            fire_time, job_id = last_ticks[name]
            last_run = dt.datetime.fromtimestamp(fire_time, schedule.zone)
            record: JobRecord | None = None if job_id is None else backend.get(job_id)
            last_job = None if record is None else Job(record, backend)
        found.append(
            ScheduleInfo(
                schedule, schedule.next_run(after).astimezone(schedule.zone), last_run, last_job
            )
        )
    return found
