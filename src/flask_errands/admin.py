"""The admin API: look after an app's jobs, queues, workers and schedules from Python.

``errands.admin`` (inside an app context) returns an :class:`Admin` for the
current app. The ``flask errands`` commands call it and nothing else, and the
dashboard will too, so every surface shows and does the same things.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from .exceptions import JobNotFound, UnknownTask
from .jobs import Job
from .runtime import Runtime
from .schedules import UTC, Schedule
from .status import FINISHED, STATUSES, JobStatus


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

    @classmethod
    def from_report(cls, report: Mapping[str, Any]) -> WorkerInfo:
        started = report.get("started_at")
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
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready values, times as ISO 8601 strings."""
        data = dataclasses.asdict(self)
        data["queues"] = list(self.queues) if self.queues else None
        data["current_jobs"] = list(self.current_jobs)
        data["started_at"] = None if self.started_at is None else self.started_at.isoformat()
        return data


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

    def workers(self) -> list[WorkerInfo]:
        """Every live worker (its registration has not expired), by id."""
        reports = self._backend.list_workers(self._clock())
        return sorted((WorkerInfo.from_report(r) for r in reports), key=lambda w: w.id)

    def schedules(self, now: float | None = None) -> list[ScheduleInfo]:
        """Every schedule of the app, by name, with its next run and its last tick's job."""
        after = dt.datetime.fromtimestamp(self._clock() if now is None else now, UTC)
        last_ticks = self._backend.last_ticks()
        found = []
        for name, schedule in sorted(self._runtime.schedules.items()):
            last_run = last_job = None
            if name in last_ticks:
                fire_time, job_id = last_ticks[name]
                last_run = dt.datetime.fromtimestamp(fire_time, schedule.zone)
                last_job = None if job_id is None else self._runtime.job(job_id)
            next_run = schedule.next_run(after).astimezone(schedule.zone)
            found.append(ScheduleInfo(schedule, next_run, last_run, last_job))
        return found

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
