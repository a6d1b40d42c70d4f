"""The per-app runtime below the Flask facade: store, runner, the one enqueue path, workers.

``Errands`` (the facade) builds one :class:`Runtime` per app in ``init_app``
and hands it only what it needs: the settings, the store, the live task and
schedule mappings. Everything that runs jobs or fires ticks goes through
here, so ``.delay()``, ``delay_many()`` and schedules pass the same checks
and send the same signals, and the embedded worker and ``flask errands
worker`` are built the same way.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as dt
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import click
from flask import Flask

from . import serving, signals, transactions
from .backends import Backend, JobRecord
from .backends.base import BLOCKED, QUEUED
from .backends.memory import MemoryBackend
from .config import Settings
from .exceptions import ConfigurationError
from .jobs import Job
from .limits import with_queue_limit
from .runner import Runner
from .scheduler import Fired, Scheduler
from .schedules import Schedule
from .service import Service
from .tasks import Task, check_size
from .tracing import Tracing
from .worker import Worker, new_worker_id

if TYPE_CHECKING:
    from .backends.outbox import Outbox

logger = logging.getLogger("flask_errands")

#: How long the embedded worker lets running jobs finish when stopped (ERRANDS_SHUTDOWN_GRACE
#: at the end of the process).
EMBEDDED_GRACE = 25.0


class Runtime:
    """What one app needs at run time: settings, store, runner, enqueue path, workers."""

    def __init__(
        self,
        app: Flask,
        settings: Settings,
        backend: Backend,
        tasks: Mapping[str, Task[Any, Any]],
        code_schedules: Mapping[str, Schedule],
        config_schedules: Mapping[str, Schedule],
    ) -> None:
        self.app = app
        self.settings = settings
        self.backend = backend
        self.tasks = tasks
        self._code_schedules = code_schedules
        self._config_schedules = config_schedules
        self.tracing = Tracing() if settings.tracing else None
        self.runner = Runner(app, backend, tasks, tracing=self.tracing)
        self._no_backoff_runner: Runner | None = None
        self.eager_backend = MemoryBackend("memory://eager") if settings.eager else None
        self.eager_runner = (
            Runner(app, self.eager_backend, tasks, backoff=False, tracing=self.tracing)
            if self.eager_backend is not None
            else None
        )
        self.outbox: Outbox | None = None
        if settings.outbox_url is not None:
            try:
                from .backends.outbox import Outbox  # SQLAlchemy, only when asked for
            except ImportError as exc:
                raise ConfigurationError(
                    f"ERRANDS_OUTBOX_URL needs SQLAlchemy ({exc.name or exc}); "
                    "pip install 'flask-errands[sqlalchemy]'"
                ) from exc
            self.outbox = Outbox(settings.outbox_url)
        self._embedded: Service | None = None
        self._embedded_pid: int | None = None
        self._lock = threading.Lock()
        if settings.queue_limits or any(
            task.default_options.limits(name) for name, task in tasks.items()
        ):
            backend.expect_limits()  # claims look at limits from the first one
        self.schedules  # noqa: B018 - a name declared twice fails here, not in the scheduler

    @property
    def schedules(self) -> dict[str, Schedule]:
        """Every schedule of this app: those declared in code, then those of ERRANDS_SCHEDULE."""
        merged = dict(self._code_schedules)
        for name, schedule in self._config_schedules.items():
            if merged.setdefault(name, schedule) != schedule:
                raise ConfigurationError(
                    f"schedule {name!r} is declared both in code and in ERRANDS_SCHEDULE; "
                    "rename one of them"
                )
        return merged

    # -- the one enqueue path --------------------------------------------------

    def enqueue(self, records: list[JobRecord]) -> list[Job]:
        """Check new jobs, then store them now, or in (or after) ``errands.transaction()``'s."""
        self._check(records)
        if self.tracing is not None:
            with self.tracing.enqueuing(records):
                return self._enqueue(records)
        return self._enqueue(records)

    def _enqueue(self, records: list[JobRecord]) -> list[Job]:
        transaction = transactions.current()
        if transaction is not None:
            return transaction.enqueue(self, records)
        return self.store(records)

    @property
    def eager(self) -> bool:
        """Whether jobs run inline (``ERRANDS_EAGER``) instead of going to the store."""
        return self.eager_backend is not None

    def store(self, records: list[JobRecord]) -> list[Job]:
        """Store checked jobs now (run them, when eager) and return their handles."""
        if self.eager_backend is not None:
            return self._run_eagerly(records)
        return self.written(self.backend.enqueue(records))

    def written(self, records: list[JobRecord]) -> list[Job]:
        """Handles on jobs just written: start the embedded worker if due; ``job_enqueued``."""
        jobs = [Job(record, self.backend) for record in records]
        if (
            self.settings.embedded_worker
            and not self.worker_started_here
            and click.get_current_context(silent=True) is None  # never in `flask shell` & co
        ):
            self.start_worker()
        self._announce(jobs)
        return jobs

    def fire(self, schedule: Schedule, fire_time: dt.datetime, now: float) -> Fired | None:
        """Enqueue one tick's job through the store's ``fire_tick``; None if another won.

        The job passes the same checks and sends the same signal as ``.delay()``.
        """
        task = self.tasks.get(schedule.task)
        if task is None:
            logger.error(
                "schedule %s: no task named %r is registered", schedule.name, schedule.task
            )
            return None
        overrides: dict[str, Any] = {**schedule.options, "at": fire_time, "delay": None}
        if schedule.max_running is not None:
            overrides["unique_key"] = f"schedule:{schedule.name}"
        with self.app.app_context():
            record = task.options(**overrides).build(
                tuple(schedule.args), dict(schedule.kwargs), now
            )
            record.eta = fire_time.timestamp()  # a tick's job is due at its tick, even a late one
            self._check([record])
            with self.tracing.enqueuing([record]) if self.tracing else contextlib.nullcontext():
                fired = self.backend.fire_tick(schedule.name, fire_time.timestamp(), record, now)
            if not fired:
                return None
            local = fire_time.astimezone(schedule.zone).isoformat()
            if schedule.max_running is not None and self.backend.get(record.id) is None:
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
            self._announce([Job(record, self.backend)])
        return Fired(schedule.name, fire_time, record.id)

    def _check(self, records: Sequence[JobRecord]) -> None:
        """Refuse a job too large; give each the limits of its queue (``ERRANDS_QUEUE_LIMITS``)."""
        queue_limits = self.settings.queue_limits
        for record in records:
            check_size(record, self.settings.max_payload)
            if queue_limits and record.queue in queue_limits:
                record.limits = with_queue_limit(record.limits, queue_limits[record.queue])
            if record.limits is not None:
                self.backend.expect_limits()

    def _announce(self, jobs: list[Job]) -> None:
        if signals.job_enqueued.receivers:
            for job in jobs:
                signals.job_enqueued.send(self.app, job=job)

    def _run_eagerly(self, records: list[JobRecord]) -> list[Job]:
        eager, runner = self.eager_backend, self.eager_runner
        assert eager is not None and runner is not None
        now = time.time()
        for record in records:
            record.eta = min(record.eta, now)
            record.limits = None  # inline, one at a time: a limit would only stop the run
            if record.status != BLOCKED:
                record.status = QUEUED
        stored = eager.enqueue(records)
        self._announce([Job(record, eager) for record in stored])
        self._drain(eager, runner, None)
        return [Job(eager.get(record.id) or record, eager) for record in stored]

    # -- looking up and running jobs here ----------------------------------------

    def job(self, job_id: str) -> Job | None:
        """Find any job by id in this app's store (or its eager store); None if unknown."""
        stores = (
            [self.backend] if self.eager_backend is None else [self.eager_backend, self.backend]
        )
        for store in stores:
            record = store.get(job_id)
            if record is not None:
                return Job(record, store)
        return None

    def drain(
        self,
        queues: Sequence[str] | None = None,
        *,
        backoff: bool = True,
        on_job: Callable[[Job], None] | None = None,
    ) -> int:
        """Run every due job in the calling thread until none is left; return how many ran.

        ``backoff=False`` makes a failed attempt's retry due at once, so it runs
        in the same drain. ``on_job`` sees each job after its attempt.
        """
        runner = self.runner
        if not backoff:
            if self._no_backoff_runner is None:
                self._no_backoff_runner = Runner(
                    self.app, self.backend, self.tasks, backoff=False, tracing=self.tracing
                )
            runner = self._no_backoff_runner
        return self._drain(self.backend, runner, queues, on_job)

    def _drain(
        self,
        backend: Backend,
        runner: Runner,
        queues: Sequence[str] | None,
        on_job: Callable[[Job], None] | None = None,
    ) -> int:
        worker_id = new_worker_id()
        ran = 0
        while True:
            records = backend.reserve(
                queues,
                1,
                worker_id,
                self.settings.lease_seconds,
                runner.clock(),
                max_lost_leases=self.settings.max_lost_leases,
            )
            if not records:
                return ran
            runner.run(runner.start(records[0]))
            ran += 1
            if on_job is not None:
                on_job(Job(records[0], backend))

    # -- workers ---------------------------------------------------------------

    def service(
        self,
        *,
        queues: Sequence[str] | None,
        concurrency: int,
        scheduler: bool,
        kind: str,
        hard_timeouts: bool = False,
    ) -> Service:
        """Build (not start) a worker for this app, with the scheduler if asked."""
        worker = Worker(
            self.runner,
            queues=queues,
            concurrency=concurrency,
            async_concurrency=self.settings.async_concurrency,
            lease_seconds=self.settings.lease_seconds,
            max_lost_leases=self.settings.max_lost_leases,
            result_ttl=self.settings.result_ttl,
            kind=kind,
            hard_timeouts=hard_timeouts,
        )
        relay = None
        if self.outbox is not None:
            from .backends.outbox import Relay

            relay = Relay(self.outbox, self.backend)
        return Service(worker, Scheduler(self) if scheduler else None, relay)

    @property
    def worker(self) -> Worker | None:
        """This app's embedded worker in this process, if started."""
        return self._embedded.worker if self._embedded is not None else None

    @property
    def scheduler(self) -> Scheduler | None:
        """The scheduler running beside the embedded worker, if any."""
        return self._embedded.scheduler if self._embedded is not None else None

    @property
    def worker_started_here(self) -> bool:
        """Whether this process (not a parent it was forked from) started the worker."""
        return self._embedded_pid == os.getpid()

    def ensure_embedded_worker(self) -> None:
        """Start the embedded worker once per process (again in a forked child)."""
        if not self.worker_started_here:
            self.start_worker()

    def start_when_served(self) -> None:
        """In a server process, start the embedded worker once the app has loaded.

        Elsewhere (the CLI, a test suite, gunicorn's master under ``--preload``)
        it waits for a request or a ``.delay()``, as before; see :mod:`serving`.
        """
        role = serving.server_role()
        if role is None:
            return
        ref = weakref.ref(self)

        def start() -> None:
            runtime = ref()
            if runtime is not None:
                runtime.ensure_embedded_worker()

        if role == serving.GUNICORN_MASTER:
            serving.start_in_forked_workers(start)
            return
        _shutdown.watch_sigterm()
        serving.start_when_loaded(start)

    def start_worker(self) -> Worker:
        """Start this process's worker threads (and scheduler, per ``ERRANDS_SCHEDULER``)."""
        with self._lock:
            service = self._embedded
            if service is not None and self.worker_started_here and service.running:
                return service.worker
            if service is not None and service.scheduler is not None:
                service.scheduler.stop(wait=False)
            settings = self.settings
            service = self.service(
                queues=settings.queues,
                concurrency=settings.concurrency,
                scheduler=settings.scheduler,
                kind="embedded",
            ).start()
            self._embedded, self._embedded_pid = service, os.getpid()
            _started.add(self)
        _shutdown.watch_sigterm()
        return service.worker

    def stop_worker(self, grace: float = EMBEDDED_GRACE) -> None:
        """Stop the embedded worker, letting running jobs finish for ``grace`` seconds."""
        with self._lock:
            service, self._embedded, self._embedded_pid = self._embedded, None, None
        if service is not None:
            service.stop(grace)


_started: weakref.WeakSet[Runtime] = weakref.WeakSet()


def _running_here() -> list[tuple[serving.Stoppable, float]]:
    """This process's running embedded workers, each with its app's shutdown grace."""
    return [
        (service, runtime.settings.shutdown_grace)
        for runtime in list(_started)
        if (service := runtime._embedded) is not None
        and runtime.worker_started_here
        and service.running
    ]


_shutdown = serving.Shutdown(_running_here)
atexit.register(_shutdown.at_exit)
