"""``Errands``: the Flask extension that owns tasks and gives each app its backend and worker."""

from __future__ import annotations

import atexit
import datetime as dt
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, overload

import click
from flask import Flask, current_app

from . import signals
from .backends import Backend, JobRecord, backend_from_url
from .backends.base import QUEUED
from .backends.memory import MemoryBackend
from .config import DEFAULTS, Settings, parse_queues
from .exceptions import ConfigurationError, Retry
from .jobs import Job
from .runner import Runner, no_backoff
from .scheduler import Scheduler
from .schedules import Schedule, check_call, schedules_from_config
from .tasks import P, R, Task, TaskOptions, check_size
from .worker import Worker, new_worker_id

logger = logging.getLogger("flask_errands")

#: How long the embedded worker lets running jobs finish when the process exits.
EMBEDDED_GRACE = 25.0


class AppState:
    """What one app needs at run time: its settings, backend, runner and embedded worker."""

    def __init__(self, errands: Errands, app: Flask, settings: Settings, backend: Backend) -> None:
        self.errands = errands
        self.app = app
        self.settings = settings
        self.backend = backend
        self.runner = Runner(app, backend, errands.tasks)
        self.worker: Worker | None = None
        self._worker_pid: int | None = None
        self._lock = threading.Lock()
        self.eager_backend = MemoryBackend("memory://eager") if settings.eager else None
        self.eager_runner = (
            Runner(app, self.eager_backend, errands.tasks, retry_after=no_backoff)
            if self.eager_backend is not None
            else None
        )
        self.config_schedules: dict[str, Schedule] = {}
        self.scheduler: Scheduler | None = None

    @property
    def schedules(self) -> dict[str, Schedule]:
        """Every schedule of this app: those declared in code, then those of ERRANDS_SCHEDULE."""
        merged = dict(self.errands.schedules)
        for name, schedule in self.config_schedules.items():
            if merged.setdefault(name, schedule) != schedule:
                raise ConfigurationError(
                    f"schedule {name!r} is declared both in code and in ERRANDS_SCHEDULE; "
                    "rename one of them"
                )
        return merged

    @property
    def worker_started_here(self) -> bool:
        """Whether this process (not a parent it was forked from) started the worker."""
        return self._worker_pid == os.getpid()

    def ensure_embedded_worker(self) -> None:
        """Start the embedded worker once per process (again in a forked child)."""
        if not self.worker_started_here:
            self.start_worker()

    def start_worker(self) -> Worker:
        with self._lock:
            if self.worker is not None and self._worker_pid == os.getpid() and self.worker.running:
                return self.worker
            settings = self.settings
            self.worker = Worker(
                self.runner,
                queues=settings.queues,
                concurrency=settings.concurrency,
                lease_seconds=settings.lease_seconds,
                max_lost_leases=settings.max_lost_leases,
                result_ttl=settings.result_ttl,
            ).start()
            self._worker_pid = os.getpid()
            _started.add(self)
            if self.scheduler is not None:
                self.scheduler.stop(wait=False)
            self.scheduler = Scheduler(self).start() if settings.scheduler else None
            return self.worker

    def stop_worker(self, grace: float) -> None:
        with self._lock:
            worker, self.worker, self._worker_pid = self.worker, None, None
            scheduler, self.scheduler = self.scheduler, None
        if scheduler is not None:
            scheduler.stop()
        if worker is not None:
            worker.stop(grace)

    def drain(
        self,
        backend: Backend,
        runner: Runner,
        queues: Sequence[str] | None,
        on_job: Callable[[JobRecord], None] | None = None,
    ) -> int:
        """Run every due job in the calling thread until none is left; return how many ran."""
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
                on_job(records[0])


class Errands:
    """Background tasks and schedules for Flask apps.

    Create it with an app, or without one and call :meth:`init_app` in an app
    factory; one ``Errands`` object serves every app it was initialised with.
    """

    #: Raise ``errands.Retry(delay=...)`` inside a task to ask for another attempt.
    Retry = Retry

    def __init__(self, app: Flask | None = None) -> None:
        self.tasks: dict[str, Task[Any, Any]] = {}
        self.schedules: dict[str, Schedule] = {}
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Register the extension on ``app``: read its config and open its backend."""
        if "errands" in app.extensions:
            raise RuntimeError("flask-errands is already registered on this app")
        for key, value in DEFAULTS.items():
            app.config.setdefault(key, value)
        settings = Settings.from_config(app.config, app.instance_path)
        config_schedules = schedules_from_config(settings.schedule, self)
        options = {
            "prefix": app.config["ERRANDS_REDIS_PREFIX"],
            "result_ttl": settings.result_ttl,
        }
        backend = backend_from_url(settings.url, instance_path=app.instance_path, options=options)
        state = AppState(self, app, settings, backend)
        state.config_schedules = config_schedules
        state.schedules  # noqa: B018 - a name declared twice fails here, not in the scheduler
        app.extensions["errands"] = state
        if settings.embedded_worker and not settings.eager:
            app.before_request(state.ensure_embedded_worker)
        from .cli import errands_cli

        app.cli.add_command(errands_cli)

    # -- declaring tasks -----------------------------------------------------

    @overload
    def task(self, func: Callable[P, R]) -> Task[P, R]: ...

    @overload
    def task(
        self,
        func: None = None,
        *,
        name: str | None = None,
        queue: str = "default",
        priority: int = 0,
        retries: int = 0,
        retry_delay: float = 1.0,
        timeout: float | None = None,
        unique_key: str | Callable[..., str] | None = None,
    ) -> Callable[[Callable[P, R]], Task[P, R]]: ...

    def task(
        self,
        func: Callable[P, R] | None = None,
        *,
        name: str | None = None,
        **options: Any,
    ) -> Task[P, R] | Callable[[Callable[P, R]], Task[P, R]]:
        """Register a function as a task; use bare or with options."""
        task_options = TaskOptions(**options)

        def register(func: Callable[P, R]) -> Task[P, R]:
            task_name = name or f"{func.__module__}.{func.__qualname__}"
            existing = self.tasks.get(task_name)
            if existing is not None and existing.func is not func:
                raise ValueError(
                    f"a different task is already registered as {task_name!r}; pass name=..."
                )
            task = Task(self, func, task_name, task_options)
            self.tasks[task_name] = task
            return task

        return register if func is None else register(func)

    def periodic(
        self,
        *,
        every: float | dt.timedelta | None = None,
        cron: str | None = None,
        timezone: str | None = None,
        name: str | None = None,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        catch_up: bool = True,
        max_running: int | None = None,
        **options: Any,
    ) -> Callable[[Callable[P, R]], Task[P, R]]:
        """Register a function as a task that also runs by itself, on ``every`` or ``cron``.

        ``name`` names the schedule (default: the task's name); other keywords
        are task options as for :meth:`task`. A bad schedule raises
        ``ValueError`` here, at decoration.
        """

        def register(func: Callable[P, R]) -> Task[P, R]:
            own_task = func if isinstance(func, Task) and func.errands is self else None
            target = func.func if isinstance(func, Task) else func
            task_name = own_task.name if own_task else f"{target.__module__}.{target.__qualname__}"
            schedule = Schedule(
                name or task_name,
                task_name,
                every=every.total_seconds() if isinstance(every, dt.timedelta) else every,
                cron=cron,
                timezone=timezone,
                args=args,
                kwargs=dict(kwargs or {}),
                catch_up=catch_up,
                max_running=max_running,
            )
            check_call(schedule, target)
            if self.schedules.get(schedule.name, schedule) != schedule:
                raise ConfigurationError(
                    f"schedule {schedule.name!r} is already registered; pass name=..."
                )
            if own_task is not None and options:
                raise ValueError("give task options to @errands.task or to @errands.periodic")
            task = own_task or self.task(name=task_name, **options)(target)
            self.schedules[schedule.name] = schedule
            return task

        return register

    # -- using the current app's backend -------------------------------------

    @property
    def state(self) -> AppState:
        """The current app's state; needs an app context."""
        try:
            app = current_app._get_current_object()  # type: ignore[attr-defined]
        except RuntimeError:
            raise RuntimeError(
                "flask-errands needs an app context: enqueue inside a request or CLI command, "
                "or under `with app.app_context():`"
            ) from None
        state = app.extensions.get("errands")
        if not isinstance(state, AppState) or state.errands is not self:
            raise RuntimeError(
                "flask-errands is not registered on the current app; did you call "
                "errands.init_app(app)?"
            )
        return state

    @property
    def settings(self) -> Settings:
        return self.state.settings

    @property
    def backend(self) -> Backend:
        return self.state.backend

    def enqueue(self, task: Task[Any, Any], records: list[JobRecord]) -> list[Job]:
        """Store new jobs of ``task`` and return their handles; used by ``delay()``."""
        state = self.state
        for record in records:
            check_size(record, state.settings.max_payload)
        if state.eager_backend is not None:
            return self._run_eagerly(state, records)
        stored = state.backend.enqueue(records)
        jobs = [Job(record, state.backend) for record in stored]
        if (
            state.settings.embedded_worker
            and not state.worker_started_here
            and click.get_current_context(silent=True) is None  # never in `flask shell` & co
        ):
            state.start_worker()
        if signals.job_enqueued.receivers:
            for job in jobs:
                signals.job_enqueued.send(state.app, job=job)
        return jobs

    def job(self, job_id: str) -> Job | None:
        """Find any job by id, from any process sharing the backend; None if unknown."""
        state = self.state
        for backend in (state.eager_backend, state.backend):
            record = backend.get(job_id) if backend is not None else None
            if record is not None:
                return Job(record, backend)  # type: ignore[arg-type]
        return None

    def drain(self, queues: Sequence[str] | str | None = None) -> int:
        """Run every due job now, in this thread, against the real backend; return how many."""
        state = self.state
        return state.drain(state.backend, state.runner, parse_queues(queues))

    def start_worker(self) -> Worker:
        """Start this process's worker threads for the current app, whatever the config says."""
        return self.state.start_worker()

    def stop_worker(self, grace: float = EMBEDDED_GRACE) -> None:
        """Stop the current app's worker threads, letting running jobs finish for ``grace`` s."""
        self.state.stop_worker(grace)

    def _run_eagerly(self, state: AppState, records: list[JobRecord]) -> list[Job]:
        eager, runner = state.eager_backend, state.eager_runner
        assert eager is not None and runner is not None
        now = time.time()
        for record in records:
            record.eta, record.status = min(record.eta, now), QUEUED
        stored = eager.enqueue(records)
        state.drain(eager, runner, None)
        return [Job(eager.get(record.id) or record, eager) for record in stored]


_started: weakref.WeakSet[AppState] = weakref.WeakSet()


@atexit.register
def _stop_embedded_workers() -> None:
    """At exit, stop schedulers at once and give running jobs ``EMBEDDED_GRACE`` to finish."""
    states = [s for s in _started if s.worker is not None and s.worker.running]
    busy = sum(len(s.worker.active_jobs()) for s in states if s.worker is not None)
    if busy:
        logger.info("waiting up to %gs for %d running job(s) to finish", EMBEDDED_GRACE, busy)
    for state in states:
        if state.scheduler is not None:
            state.scheduler.stop(wait=False)
        if state.worker is not None:
            state.worker.stop(EMBEDDED_GRACE, wait=False)
    for state in states:
        if state.worker is not None:
            state.worker.join()
