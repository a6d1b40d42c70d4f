"""``Errands``: the Flask extension that owns tasks and gives each app its backend and worker."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, overload

from flask import Blueprint, Flask, current_app

from . import metrics, transactions
from .admin import Admin
from .backends import Backend, JobRecord, backend_from_url
from .cli import errands_cli
from .config import DEFAULTS, Settings, parse_queues
from .dashboard import Authorize, mount
from .exceptions import ConfigurationError, Retry
from .jobs import Job
from .runtime import EMBEDDED_GRACE, Runtime
from .schedules import Schedule, check_call, schedules_from_config
from .tasks import P, R, Task, TaskOptions
from .transactions import Transaction
from .worker import Worker

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry


class Errands:
    """Background tasks and schedules for Flask apps.

    Create it with an app, or without one and call :meth:`init_app` in an app
    factory; one ``Errands`` object serves every app it was initialised with.
    """

    #: Raise ``errands.Retry(delay=...)`` inside a task to ask for another attempt.
    Retry = Retry

    def __init__(self, app: Flask | None = None, *, backend: Backend | None = None) -> None:
        self.tasks: dict[str, Task[Any, Any]] = {}
        self.schedules: dict[str, Schedule] = {}
        self._backend = backend
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask, *, backend: Backend | None = None) -> None:
        """Register the extension on ``app``: read its config and open its store.

        ``backend`` (here or on the constructor) is a store object to use
        instead of the one ``ERRANDS_URL`` names; the caller closes it.
        """
        if "errands" in app.extensions:
            raise RuntimeError("flask-errands is already registered on this app")
        for key, value in DEFAULTS.items():
            app.config.setdefault(key, value)
        backend = backend or self._backend
        url = backend.url if backend is not None else None
        settings = Settings.from_config(app.config, app.instance_path, url=url)
        config_schedules = {}
        for entry in schedules_from_config(settings.schedule):
            if entry.task is None or entry.task.errands is not self:
                self.task(name=entry.schedule.task)(entry.func)
            config_schedules[entry.schedule.name] = entry.schedule
        if backend is None:
            options = {
                "prefix": app.config["ERRANDS_REDIS_PREFIX"],
                "result_ttl": settings.result_ttl,
                "broker_url": settings.broker_url,
            }
            backend = backend_from_url(
                settings.url, instance_path=app.instance_path, options=options
            )
        runtime = Runtime(app, settings, backend, self.tasks, self.schedules, config_schedules)
        app.extensions["errands"] = runtime
        if settings.embedded_worker and not settings.eager:
            app.before_request(runtime.ensure_embedded_worker)
            runtime.start_when_served()
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
        rate_limit: str | None = None,
        concurrency: int | None = None,
    ) -> Callable[[Callable[P, R]], Task[P, R]]: ...

    def task(
        self,
        func: Callable[P, R] | None = None,
        *,
        name: str | None = None,
        **options: Any,
    ) -> Task[P, R] | Callable[[Callable[P, R]], Task[P, R]]:
        """Register a function as a task; use bare or with options.

        ``rate_limit="10/s"`` (per ``s``, ``m`` or ``h``) and ``concurrency=2`` hold across
        every worker of the deployment; a malformed one raises ``ValueError`` here.
        """
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

    # -- using the current app's runtime -------------------------------------

    @property
    def runtime(self) -> Runtime:
        """The current app's runtime; needs an app context."""
        try:
            app = current_app._get_current_object()  # type: ignore[attr-defined]
        except RuntimeError:
            raise RuntimeError(
                "flask-errands needs an app context: enqueue inside a request or CLI command, "
                "or under `with app.app_context():`"
            ) from None
        runtime = app.extensions.get("errands")
        if not isinstance(runtime, Runtime) or runtime.tasks is not self.tasks:
            raise RuntimeError(
                "flask-errands is not registered on the current app; did you call "
                "errands.init_app(app)?"
            )
        return runtime

    @property
    def settings(self) -> Settings:
        return self.runtime.settings

    @property
    def backend(self) -> Backend:
        return self.runtime.backend

    @property
    def admin(self) -> Admin:
        """The admin API of the current app: re-run, cancel, purge, counts, workers, schedules."""
        return Admin(self.runtime)

    def init_dashboard(
        self, app: Flask, *, url_prefix: str = "/errands", authorize: Authorize | None = None
    ) -> Blueprint:
        """Mount the web dashboard on ``app`` at ``url_prefix``; nothing is mounted otherwise.

        ``authorize`` is required: called on every dashboard request (``request``
        is available), it returns ``"admin"`` (may act), ``"viewer"`` (may look)
        or None (refused). :class:`BasicAuth` is a ready one. ``ValueError``
        without it, or when the app has no ``secret_key`` for CSRF tokens.
        """
        return mount(app, lambda: self.admin, url_prefix=url_prefix, authorize=authorize)

    def init_metrics(
        self, app: Flask, *, path: str = "/metrics", authorize: Authorize | None = None
    ) -> CollectorRegistry:
        """Serve Prometheus metrics of the whole deployment at ``path`` on ``app``.

        Every figure is read from the store at each scrape, so any process of the
        app shows every process's work. ``authorize`` is required and works as
        the dashboard's: ``"admin"`` or ``"viewer"`` may scrape; None is refused
        (401 with a challenge under HTTP Basic, else 403). Needs
        ``pip install 'flask-errands[prometheus]'``. Returns the registry served.
        """
        return metrics.mount(app, lambda: self.admin, path=path, authorize=authorize)

    def enqueue(self, records: list[JobRecord]) -> list[Job]:
        """Store new job records for the current app and return their jobs; ``delay()`` uses it."""
        return self.runtime.enqueue(records)

    def transaction(self, session_or_connection: Any) -> AbstractContextManager[Transaction]:
        """Make the jobs enqueued in the block, in this thread, part of the app's transaction.

        Takes a SQLAlchemy ``Session`` (``db.session``), a SQLAlchemy
        ``Connection`` or a psycopg 3 connection; commits nothing itself. On
        PostgreSQL in the same database the jobs are written in the
        transaction; elsewhere a session's jobs are enqueued right after its
        commit and dropped on rollback. Until the commit, ``job.status`` is
        ``pending``.
        """
        return transactions.transaction(session_or_connection)

    def job(self, job_id: str) -> Job | None:
        """Find any job by id, from any process sharing the backend; None if unknown."""
        return self.runtime.job(job_id)

    def drain(self, queues: Sequence[str] | str | None = None, *, backoff: bool = True) -> int:
        """Run every due job now, in this thread, against the real backend; return how many.

        ``backoff=False`` runs a failed job's retries at once, in the same drain,
        so a test of a retrying task needs no ``sleep()``.
        """
        return self.runtime.drain(parse_queues(queues), backoff=backoff)

    def start_worker(self) -> Worker:
        """Start this process's worker threads for the current app, whatever the config says."""
        return self.runtime.start_worker()

    def stop_worker(self, grace: float = EMBEDDED_GRACE) -> None:
        """Stop the current app's worker threads, letting running jobs finish for ``grace`` s."""
        self.runtime.stop_worker(grace)
