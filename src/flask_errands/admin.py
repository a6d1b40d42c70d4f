"""The admin API: look after an app's jobs, queues, workers and schedules from Python.

``errands.admin`` (inside an app context) returns an :class:`Admin` for the
current app. The ``flask errands`` commands call it and nothing else, and the
dashboard will too, so every surface shows and does the same things.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from .backends.base import ScheduleState, Timing, minute_of
from .exceptions import ErrandsError, JobNotFound, ScheduleNotFound, UnknownTask
from .jobs import Job
from .limits import Limit, decode
from .runtime import Runtime
from .schedules import UTC, Schedule
from .status import FINISHED, STATUSES, JobStatus
from .tasks import check_queue

#: The largest page :meth:`Admin.job_page` returns.
MAX_PAGE = 500
_CURSOR = re.compile(r"[A-Za-z0-9_-]{10}[AEIMQUYcgkosw048]")
#: How many minutes :meth:`Admin.stats` covers, the current one last.
STATS_MINUTES = 60


@dataclasses.dataclass(frozen=True)
class WorkerInfo:
    """A live worker, as it last reported itself to the store."""

    id: str
    host: str
    pid: int | None
    kind: str
    queues: tuple[str, ...] | None
    concurrency: int | None
    started_at: dt.datetime | None
    jobs_done: int
    current_jobs: tuple[str, ...]
    #: When it last reported itself (its heartbeat), or None for a worker too old to say.
    last_seen: dt.datetime | None = None

    @classmethod
    def from_report(cls, report: Mapping[str, Any]) -> WorkerInfo:
        started = report.get("started_at")
        seen = report.get("last_seen")
        queues = report.get("queues")
        return cls(
            id=str(report["id"]),
            host=str(report.get("host", "")),
            pid=report.get("pid"),
            kind=str(report.get("kind", "")),
            queues=tuple(queues) if queues else None,
            concurrency=report.get("concurrency"),
            started_at=None if started is None else dt.datetime.fromtimestamp(started, UTC),
            jobs_done=int(report.get("jobs_done") or 0),
            current_jobs=tuple(report.get("current_jobs") or ()),
            last_seen=None if seen is None else dt.datetime.fromtimestamp(seen, UTC),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values, times as ISO 8601 strings."""
        data = dataclasses.asdict(self)
        data["queues"] = list(self.queues) if self.queues else None
        data["current_jobs"] = list(self.current_jobs)
        data["started_at"] = _iso(self.started_at)
        data["last_seen"] = _iso(self.last_seen)
        return data


@dataclasses.dataclass(frozen=True)
class QueueInfo:
    """A queue: whether it is paused, and its jobs per status (every status present)."""

    name: str
    paused: bool
    counts: dict[JobStatus, int]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values, counts keyed by status name."""
        counts = {status.value: n for status, n in self.counts.items()}
        return {"name": self.name, "paused": self.paused, "counts": counts}


@dataclasses.dataclass(frozen=True)
class LimitInfo:
    """A task's or queue's limits, and how much of them is in use across the deployment."""

    #: ``task`` or ``queue``.
    kind: str
    name: str
    #: ``"10/s"``, or None without a rate limit.
    rate_limit: str | None
    concurrency: int | None
    #: Jobs running under a live lease now.
    running: int
    #: Starts in the last window of the rate limit (0 without one).
    recent_starts: int

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class JobPage:
    """One page of jobs, newest first, and the cursor of the next page (None on the last)."""

    jobs: list[Job]
    next_cursor: str | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values."""
        return {"jobs": [job.to_dict() for job in self.jobs], "next_cursor": self.next_cursor}


@dataclasses.dataclass(frozen=True)
class Stats:
    """Figures for the last hour, one point per minute, the current minute last.

    ``succeeded`` and ``failed`` count attempts that ended in that minute;
    ``queued``, ``scheduled`` and ``running`` are the jobs in that state when
    a worker sampled the minute (the current one is counted now if no worker
    has yet), or None for a minute nobody sampled.
    """

    minutes: list[dt.datetime]
    succeeded: list[int]
    failed: list[int]
    queued: list[int | None]
    scheduled: list[int | None]
    running: list[int | None]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values, minutes as ISO 8601 strings."""
        data = dataclasses.asdict(self)
        data["minutes"] = [minute.isoformat() for minute in self.minutes]
        return data


@dataclasses.dataclass(frozen=True)
class Totals:
    """The whole deployment's figures since the store began, as metrics show them.

    Read from the store, whichever process asks: ``enqueued`` per ``(queue,
    task)``; ``finished`` per ``(queue, task, outcome)`` (succeeded, failed,
    cancelled, retried), from the per-minute counts the dashboard charts;
    ``timings`` per ``(timing, queue, task)`` (``duration`` of attempts, ``wait``
    from due to start); ``counts`` per queue and status now; ``workers`` live now.
    """

    enqueued: dict[tuple[str, str], int]
    finished: dict[tuple[str, str, str], int]
    timings: dict[tuple[str, str, str], Timing]
    counts: dict[str, dict[JobStatus, int]]
    workers: int


@dataclasses.dataclass(frozen=True)
class ScheduleInfo:
    """A schedule with its next run and the outcome of its last tick."""

    schedule: Schedule
    #: The next fire time, in the schedule's zone.
    next_run: dt.datetime
    #: The fire time of the latest tick recorded, in the schedule's zone, or None.
    last_run: dt.datetime | None
    #: The job that tick enqueued, or None (no tick yet, or the job was pruned).
    last_job: Job | None
    #: Paused at run time: it does not fire until resumed (``next_run`` is when it would).
    paused: bool = False

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
            "every": self.schedule.every,
            "cron": self.schedule.cron,
            "timezone": str(self.schedule.zone),
            "paused": self.paused,
            "next_run": self.next_run.isoformat(),
            "next_run_utc": self.next_run_utc.isoformat(),
            "last_run": None if self.last_run is None else self.last_run.isoformat(),
            "last_job_id": None if self.last_job is None else self.last_job.id,
            "last_status": None if self.last_status is None else self.last_status.value,
        }


class Admin:
    """Jobs, queues, workers and schedules of one app, for people and the tools they use."""

    def __init__(self, runtime: Runtime, *, clock: Callable[[], float] = time.time) -> None:
        self._runtime = runtime
        self._backend = runtime.backend
        self._clock = clock

    # -- jobs --------------------------------------------------------------------

    def job(self, job_id: str) -> Job:
        """The job with this id; raises :class:`JobNotFound`."""
        job = self._runtime.job(job_id)
        if job is None:
            raise JobNotFound(f"no job with id {job_id}")
        return job

    def jobs(
        self,
        status: JobStatus | str | None = None,
        queue: str | None = None,
        *,
        limit: int = 50,
        offset: int = 0,
    ) -> list[Job]:
        """Jobs newest first, optionally only those in ``status`` and ``queue``."""
        state = None if status is None else JobStatus(status)
        records = self._backend.list_jobs(status=state, queue=queue, limit=limit, offset=offset)
        return [Job(record, self._backend) for record in records]

    def job_page(
        self,
        status: JobStatus | str | None = None,
        queue: str | None = None,
        task: str | None = None,
        *,
        limit: int = 50,
        cursor: str | None = None,
    ) -> JobPage:
        """A page of jobs newest first, by status, queue and task; ``cursor`` from the last page.

        Keyset pagination: a deep page costs what the first does. Raises
        ``ValueError`` for a ``limit`` outside 1 to :data:`MAX_PAGE`, an unknown
        status or a malformed cursor.
        """
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
            raise ValueError(f"limit must be a whole number from 1 to {MAX_PAGE}, not {limit!r}")
        state = None if status is None or status == "" else _status(status)
        for name, value in (("queue", queue), ("task", task)):
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name} must be a string, not {value!r}")
        before = None if cursor is None or cursor == "" else decode_cursor(cursor)
        records, position = self._backend.job_page(
            state, queue or None, task or None, limit=limit, before=before
        )
        jobs = [Job(record, self._backend) for record in records]
        return JobPage(jobs, None if position is None else encode_cursor(position))

    def enqueue(
        self,
        task_name: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> Job:
        """Enqueue a registered task by name, with task options overridden by ``options``.

        Raises :class:`UnknownTask` (naming close matches) for a name no task has.
        """
        task = self._runtime.tasks.get(task_name)
        if task is None:
            close = [
                name for name in sorted(self._runtime.tasks) if task_name.split(".")[-1] in name
            ]
            hint = f"; did you mean {', '.join(close[:3])}?" if close else ""
            raise UnknownTask(f"no task named {task_name!r}{hint}")
        bound = task.options(**options) if options else task
        return bound.delay(*args, **dict(kwargs or {}))

    def retry(self, job_id: str) -> Job:
        """Run a finished job again under the same id, with its attempts reset.

        Raises :class:`JobNotFound`, or ``ValueError`` for a job still queued or
        running. A job whose unique key a live job holds stays as it was.
        """
        job = self.job(job_id)
        if not job.status.finished:
            raise ValueError(f"job {job_id} is {job.status}; only finished jobs can be re-run")
        record = self._backend.requeue(job_id, self._clock())
        if record is None:
            raise JobNotFound(f"no job with id {job_id}")
        return Job(record, self._backend)

    def retry_failed(self, queue: str | None = None) -> int:
        """Run every failed job (of ``queue``, or all) again under its id; return how many."""
        seen: set[str] = set()
        now = self._clock()
        while page := [
            record
            for record in self._backend.list_jobs(status=JobStatus.FAILED, queue=queue, limit=500)
            if record.id not in seen
        ]:
            for record in page:
                seen.add(record.id)
                self._backend.requeue(record.id, now)
        return len(seen)

    def cancel(self, job_id: str) -> Job:
        """Cancel a job: a waiting one never starts, a running one sees ``cancel_requested``.

        Raises :class:`JobNotFound`, or ``ValueError`` for a job already finished.
        """
        job = self.job(job_id)
        if job.status.finished:
            raise ValueError(f"job {job_id} already {job.status}")
        record = self._backend.cancel(job_id, self._clock())
        if record is None:
            raise JobNotFound(f"no job with id {job_id}")
        return Job(record, self._backend)

    def delete(self, job_id: str) -> None:
        """Delete one finished job; raises :class:`JobNotFound`, or ``ValueError`` if live."""
        job = self.job(job_id)
        if not job.status.finished:
            raise ValueError(f"job {job_id} is {job.status}; only finished jobs can be deleted")
        if not self._backend.delete(job_id):
            raise ValueError(f"job {job_id} changed meanwhile and was not deleted")

    def purge(
        self,
        statuses: Iterable[JobStatus | str] = FINISHED,
        queue: str | None = None,
        older_than: float | dt.timedelta | None = None,
    ) -> int:
        """Delete jobs in ``statuses`` (never running ones), of ``queue``, older than given.

        Age counts from when a job finished, or was enqueued if it has not.
        Returns how many were deleted.
        """
        if isinstance(older_than, dt.timedelta):
            older_than = older_than.total_seconds()
        before = None if older_than is None else self._clock() - older_than
        states = [JobStatus(status) for status in statuses]
        if JobStatus.RUNNING in states:
            raise ValueError("running jobs cannot be purged; cancel them first")
        return sum(self._backend.purge(status=s, queue=queue, before=before) for s in states)

    # -- queues, workers, schedules ----------------------------------------------

    def counts(self) -> dict[str, dict[JobStatus, int]]:
        """Jobs per queue and status, every status present (0 for none), queues sorted."""
        per_queue: dict[str, dict[JobStatus, int]] = {}
        for (queue, status), n in sorted(self._backend.counts().items()):
            row = per_queue.setdefault(queue, dict.fromkeys(STATUSES, 0))
            row[JobStatus(status)] += n
        return per_queue

    def queues(self) -> list[QueueInfo]:
        """Every queue that holds jobs or is paused, by name, with its counts."""
        counts = self.counts()
        paused = self._backend.paused_queues()
        return [
            QueueInfo(name, name in paused, counts.get(name) or dict.fromkeys(STATUSES, 0))
            for name in sorted(set(counts) | paused)
        ]

    def limits(self, now: float | None = None) -> list[LimitInfo]:
        """Every limit this app declares (tasks, their schedules, ``ERRANDS_QUEUE_LIMITS``),
        by task then queue, with how much of it is in use now."""
        runtime = self._runtime
        found: dict[str, Limit] = {}
        for name, task in runtime.tasks.items():
            text = task.default_options.limits(name)
            if text is not None:
                found.update((lim.key, lim) for lim in decode(text))
        for schedule in runtime.schedules.values():
            options = schedule.options
            limit = Limit.of(
                f"task:{schedule.task}", options.get("rate_limit"), options.get("concurrency")
            )
            if limit is not None:
                found.setdefault(limit.key, limit)
        found.update((lim.key, lim) for lim in runtime.settings.queue_limits.values())
        limits = sorted(found.values(), key=lambda lim: (lim.kind != "task", lim.name))
        usage = self._backend.limit_usage(limits, self._clock() if now is None else now)
        infos = []
        for lim in limits:
            running, recent = usage.get(lim.key, (0, 0))
            shown = lim.describe()
            rate, concurrency = shown["rate_limit"], shown["concurrency"]
            infos.append(LimitInfo(lim.kind, lim.name, rate, concurrency, running, recent))
        return infos

    def pause_queue(self, name: str) -> None:
        """Stop every worker claiming jobs of queue ``name`` until resumed; jobs still enqueue."""
        check_queue(name)
        self._backend.pause_queue(name, self._clock())

    def resume_queue(self, name: str) -> None:
        """Let workers claim jobs of queue ``name`` again."""
        check_queue(name)
        self._backend.resume_queue(name)

    def stats(self, now: float | None = None) -> Stats:
        """Throughput and queue depth over the last hour, one point per minute.

        Reads the per-minute counts the store keeps as attempts end and the
        depth samples workers take each minute; it writes nothing.
        """
        now = self._clock() if now is None else now
        last = minute_of(now)
        first = last - STATS_MINUTES + 1
        ended = {"succeeded": [0] * STATS_MINUTES, "failed": [0] * STATS_MINUTES}
        for minute, _queue, _task, outcome, n in self._backend.finished_counts(first):
            if outcome in ended and first <= minute <= last:
                ended[outcome][minute - first] += n
        samples = self._backend.depth_samples(first)
        if last not in samples:  # no worker sampled this minute yet: count now, store nothing
            samples[last] = {
                (queue, status): n
                for (queue, status), n in self._backend.counts().items()
                if not JobStatus(status).finished
            }
        depth: dict[str, list[int | None]] = {}
        for status in ("queued", "scheduled", "running"):
            depth[status] = [
                None
                if (sample := samples.get(minute)) is None
                else sum(n for (_, state), n in sample.items() if state == status)
                for minute in range(first, last + 1)
            ]
        return Stats(
            minutes=[
                dt.datetime.fromtimestamp(minute * 60, UTC) for minute in range(first, last + 1)
            ],
            succeeded=ended["succeeded"],
            failed=ended["failed"],
            queued=depth["queued"],
            scheduled=depth["scheduled"],
            running=depth["running"],
        )

    def totals(self) -> Totals:
        """The figures since the store began, of every process (see :class:`Totals`)."""
        finished: dict[tuple[str, str, str], int] = {}
        for _minute, queue, task, outcome, n in self._backend.finished_counts(0):
            finished[queue, task, outcome] = finished.get((queue, task, outcome), 0) + n
        return Totals(
            enqueued=self._backend.enqueued_counts(),
            finished=finished,
            timings=self._backend.timings(),
            counts=self.counts(),
            workers=len(self._backend.list_workers(self._clock())),
        )

    def workers(self) -> list[WorkerInfo]:
        """Every live worker (its registration has not expired), by id."""
        reports = self._backend.list_workers(self._clock())
        return sorted((WorkerInfo.from_report(r) for r in reports), key=lambda w: w.id)

    def schedules(self, now: float | None = None) -> list[ScheduleInfo]:
        """Every schedule of the app, by name, as in force now, with its next run and last tick.

        A schedule changed at run time shows its new timing, and whether it is paused.
        """
        states = self._backend.schedule_states()
        last_ticks = self._backend.last_ticks()
        return [
            self._info(schedule, states.get(name), last_ticks.get(name), now)
            for name, schedule in sorted(self._runtime.schedules.items())
        ]

    def schedule(self, name: str, now: float | None = None) -> ScheduleInfo:
        """The schedule ``name`` as :meth:`schedules` shows it; raises ``ScheduleNotFound``."""
        schedule = self._schedule(name)
        state = self._backend.schedule_states().get(name)
        return self._info(schedule, state, self._backend.last_ticks().get(name), now)

    def pause_schedule(self, name: str) -> None:
        """Stop the schedule firing, in every process, until resumed."""
        self._schedule(name)
        self._backend.set_schedule_paused(name, True, self._clock())

    def resume_schedule(self, name: str) -> None:
        """Let a paused schedule fire again from its next tick; missed ticks never fire."""
        self._schedule(name)
        self._backend.set_schedule_paused(name, False, self._clock())

    def run_schedule(self, name: str) -> Job:
        """Enqueue the schedule's job now, once, as a tick does (it shows as its last run).

        Raises ``ScheduleNotFound``, ``UnknownTask`` when its task is not
        registered here, and ``ValueError`` when ``max_running=1`` holds it back.
        """
        schedule = self._schedule(name).with_state(self._backend.schedule_states().get(name))
        if schedule.task not in self._runtime.tasks:
            raise UnknownTask(f"schedule {name!r} runs {schedule.task!r}, which no task is here")
        now = self._clock()
        fired = self._runtime.fire(schedule, dt.datetime.fromtimestamp(now, UTC), now)
        if fired is None:
            raise ErrandsError(f"schedule {name!r} fired at this very instant already; try again")
        if fired.job_id is None:
            raise ValueError(
                f"schedule {name!r} did not run: its previous run is still queued or running "
                "(max_running=1)"
            )
        return self.job(fired.job_id)

    def change_schedule(
        self,
        name: str,
        *,
        every: float | dt.timedelta | None = None,
        cron: str | None = None,
    ) -> ScheduleInfo:
        """Give the schedule another timing, in every process, from its next tick on.

        Exactly one of ``every`` (seconds or a timedelta) and ``cron``, checked
        as at decoration (``ValueError``); a cron keeps the schedule's zone.
        """
        changed = self._schedule(name).retimed(every=every, cron=cron)
        self._backend.set_schedule_timing(name, changed.every, changed.cron, self._clock())
        return self.schedule(name)

    def _schedule(self, name: str) -> Schedule:
        schedule = self._runtime.schedules.get(name)
        if schedule is None:
            raise ScheduleNotFound(f"no schedule named {name!r}")
        return schedule

    def _info(
        self,
        schedule: Schedule,
        state: ScheduleState | None,
        last_tick: tuple[float, str | None] | None,
        now: float | None,
    ) -> ScheduleInfo:
        schedule = schedule.with_state(state)
        after = dt.datetime.fromtimestamp(self._clock() if now is None else now, UTC)
        last_run = last_job = None
        if last_tick is not None:
            fire_time, job_id = last_tick
            last_run = dt.datetime.fromtimestamp(fire_time, schedule.zone)
            last_job = None if job_id is None else self._runtime.job(job_id)
        next_run = schedule.next_run(after).astimezone(schedule.zone)
        paused = state is not None and state.paused
        return ScheduleInfo(schedule, next_run, last_run, last_job, paused)

    def due(self, queues: Sequence[str] | None = None) -> int:
        """How many jobs are waiting (queued or scheduled) in ``queues`` (None: all)."""
        return sum(
            n
            for (queue, status), n in self._backend.counts().items()
            if JobStatus(status).waiting and (queues is None or queue in queues)
        )

    def drain(
        self,
        queues: Sequence[str] | None = None,
        *,
        backoff: bool = True,
        on_job: Callable[[Job], None] | None = None,
    ) -> int:
        """Run every due job now in this thread; ``on_job`` sees each job after its attempt."""
        return self._runtime.drain(queues, backoff=backoff, on_job=on_job)


def encode_cursor(position: int) -> str:
    """An opaque, URL-safe cursor for a store's page position."""
    return base64.urlsafe_b64encode(position.to_bytes(8, "big", signed=True)).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    """The page position in a cursor from :func:`encode_cursor`; ``ValueError`` if malformed."""
    if not isinstance(cursor, str) or not _CURSOR.fullmatch(cursor):
        raise ValueError("malformed cursor; pass the next_cursor of a page, unchanged")
    return int.from_bytes(base64.urlsafe_b64decode(cursor + "="), "big", signed=True)


def _status(status: JobStatus | str) -> JobStatus:
    try:
        return JobStatus(status)
    except ValueError:
        names = ", ".join(s.value for s in STATUSES)
        raise ValueError(f"unknown status {status!r}; use one of {names}") from None


def _iso(moment: dt.datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()
