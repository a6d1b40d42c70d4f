"""``flask errands …``: run workers and look after queues from the shell.

Commands parse their options and call the engine; output fits 80 columns, and
``--json`` gives scripts the same data. Exit codes: 0 success, 1 not found or
failed, 2 usage.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import click
from flask import current_app
from flask.cli import AppGroup

from . import durations, serialization
from .admin import MAX_PAGE, Admin, ScheduleInfo
from .backends import hide_password
from .config import parse_queues
from .exceptions import ErrandsError, JobNotFound, ScheduleNotFound, UnknownTask
from .jobs import Job
from .process import WorkerOptions, queues_label, run_worker
from .runtime import Runtime
from .status import FINISHED, STATUSES, JobStatus

T = TypeVar("T")

_STATE = click.Choice([s.value for s in STATUSES])


class ErrandsGroup(AppGroup):
    """The ``flask errands`` group: an error is one ``Error:`` line and exit 1.

    ``--traceback`` (or ``FLASK_DEBUG``) shows the whole traceback instead.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
            raise
        except Exception as exc:
            if ctx.meta.get("errands.traceback") or _debug():
                raise
            message = str(exc) if isinstance(exc, ErrandsError) else f"{type(exc).__name__}: {exc}"
            click.echo(f"Error: {' '.join(message.split())}", err=True)
            click.echo("(run with --traceback for details)", err=True)
            sys.exit(1)


def _show_traceback(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value:
        ctx.meta["errands.traceback"] = True


errands_cli = ErrandsGroup("errands", help="Run background workers and look after job queues.")
errands_cli.params.append(
    click.Option(
        ["--traceback"],
        is_flag=True,
        expose_value=False,
        is_eager=True,
        callback=_show_traceback,
        help="Show the full traceback of an error.",
    )
)


def _debug() -> bool:
    return os.environ.get("FLASK_DEBUG", "").lower() in ("1", "true", "yes", "on")


def _runtime() -> Runtime:
    runtime = current_app.extensions.get("errands")
    if not isinstance(runtime, Runtime):
        raise click.UsageError("flask-errands is not registered on this app (Errands(app)).")
    return runtime


def _admin() -> Admin:
    return Admin(_runtime())


def _fail(message: str) -> NoReturn:
    click.echo(f"Error: {message}", err=True)
    sys.exit(1)


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _when(moment: dt.datetime | None) -> str:
    """A time in the local zone, as people read it in a terminal."""
    if moment is None:
        return "-"
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def duration(value: str | float) -> float:
    """Click's converter for duration options; its name is the metavar help shows."""
    return float(value) if isinstance(value, int | float) else durations.parse_duration(value)


# -- running ------------------------------------------------------------------


@errands_cli.command()
@click.option("-q", "--queues", help="Comma-separated queues to serve (default: all).")
@click.option("-c", "--concurrency", type=click.IntRange(1), help="Threads per process.")
@click.option(
    "--processes",
    type=click.IntRange(1),
    default=1,
    show_default=True,
    help="Worker processes, for CPU-bound jobs.",
)
@click.option(
    "--max-jobs-per-child",
    type=click.IntRange(1),
    help="Replace a worker process after this many jobs (caps memory).",
)
@click.option(
    "--scheduler/--no-scheduler",
    default=None,
    help="Also fire periodic jobs (default: ERRANDS_SCHEDULER).",
)
@click.option(
    "--grace",
    type=click.FloatRange(0),
    default=30.0,
    show_default=True,
    help="Seconds running jobs get to finish after SIGTERM/SIGINT.",
)
def worker(
    queues: str | None,
    concurrency: int | None,
    processes: int,
    max_jobs_per_child: int | None,
    scheduler: bool | None,
    grace: float,
) -> None:
    """Run jobs until stopped (SIGTERM/SIGINT finish running jobs first)."""
    runtime = _runtime()
    settings = runtime.settings
    options = WorkerOptions(
        queues=parse_queues(queues) or settings.queues,
        concurrency=concurrency or settings.concurrency,
        scheduler=settings.scheduler if scheduler is None else scheduler,
        grace=grace,
        processes=processes,
        max_jobs_per_child=max_jobs_per_child,
    )
    _configure_logging()
    per = f"{options.concurrency} threads" + (f" x {processes} processes" if processes > 1 else "")
    click.echo(
        f"flask-errands worker\n"
        f"  backend:     {hide_password(settings.url)}\n"
        f"  queues:      {queues_label(options.queues)}\n"
        f"  concurrency: {per}\n"
        f"  scheduler:   {'on' if options.scheduler else 'off'}"
    )
    if settings.url.startswith("memory:"):
        click.echo(
            "Warning: memory:// jobs live in one process; this worker runs only the jobs it "
            "enqueues itself. Use sqlite://, redis:// or postgresql:// to share jobs.",
            err=True,
        )
    sys.exit(run_worker(runtime, options))


@errands_cli.command()
def scheduler() -> None:
    """Fire periodic jobs only (no job runs here); stop with SIGTERM/SIGINT."""
    from .process import StopSignals
    from .scheduler import Scheduler

    runtime = _runtime()
    _configure_logging()
    stop = StopSignals().install()
    click.echo(f"flask-errands scheduler\n  backend: {hide_password(runtime.settings.url)}")
    Scheduler(runtime).run(stop.requested)


@errands_cli.command()
@click.option("-q", "--queues", help="Comma-separated queues to drain (default: all).")
def drain(queues: str | None) -> None:
    """Run every due job now in this process, then exit (1 if an attempt failed)."""
    admin = _admin()
    names = parse_queues(queues)
    failed = retrying = 0
    with click.progressbar(length=admin.due(names), label="Draining", file=sys.stderr) as bar:

        def progress(job: Job) -> None:
            nonlocal failed, retrying
            failed += job.status == JobStatus.FAILED
            retrying += job.status == JobStatus.SCHEDULED
            bar.update(1)

        ran = admin.drain(names, on_job=progress)
    retries = f" ({retrying} will retry)" if retrying else ""
    click.echo(f"Ran {ran} job(s), {failed + retrying} failed{retries}.")
    if failed or retrying:
        sys.exit(1)


# -- looking --------------------------------------------------------------------


@errands_cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(as_json: bool) -> None:
    """Job counts per queue and state, and the live workers."""
    admin = _admin()
    queues = admin.queues()
    workers = admin.workers()
    limits = admin.limits()
    paused = [row.name for row in queues if row.paused]
    if as_json:
        by_queue = {
            row.name: {status.value: n for status, n in row.counts.items() if n} for row in queues
        }
        _print_json(
            {
                "queues": by_queue,
                "paused_queues": paused,
                "workers": [w.to_dict() for w in workers],
                "limits": [limit.to_dict() for limit in limits],
            }
        )
        return
    click.echo(f"backend: {_clip(hide_password(_runtime().settings.url), 71)}\n")
    # Each state's column is as wide as its name and a space: seven states fit in 80 columns.
    click.echo(f"{'queue':<16}" + "".join(f" {s.value}" for s in STATUSES))
    for row in queues:
        name = _clip(row.name, 14) + (" ‖" if row.paused else "")
        cells = "".join(f"{row.counts[s]:>{len(s.value) + 1}}" for s in STATUSES)
        click.echo(f"{name:<16}{cells}")
    if not queues:
        click.echo("(no jobs)")
    if paused:
        click.echo(_clip(f"paused (‖), no worker claims from: {', '.join(paused)}", 80))
    click.echo(f"\n{len(workers)} live worker(s)")
    for info in workers:
        click.echo(
            f"  {_clip(info.id, 36):<36} {info.kind:<8} "
            f"{info.concurrency or '?'} thr  {info.jobs_done} done  "
            f"{len(info.current_jobs)} running"
        )
    if limits:
        click.echo("\nlimits (across every worker)")
        for limit in limits:
            parts = []
            if limit.concurrency is not None:
                parts.append(f"{limit.running}/{limit.concurrency} running")
            if limit.rate_limit is not None:
                parts.append(f"{limit.recent_starts} of {limit.rate_limit} started")
            label = f"{limit.kind} {limit.name}"
            click.echo(_clip(f"  {_clip(label, 30):<30} " + ", ".join(parts), 80))


@errands_cli.command()
@click.option("--state", "status_", type=_STATE, help="Only jobs in this state.")
@click.option("--queue", help="Only jobs in this queue.")
@click.option("--task", help="Only jobs of this task.")
@click.option("--limit", type=click.IntRange(1, MAX_PAGE), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def jobs(
    status_: str | None, queue: str | None, task: str | None, limit: int, as_json: bool
) -> None:
    """List jobs, newest first."""
    found = _admin().job_page(status_, queue, task, limit=limit).jobs
    if as_json:
        _print_json([job.to_dict() for job in found])
        return
    if not found:
        click.echo("(no jobs)")
        return
    click.echo(f"{'id':<32} {'status':<9} {'try':>3} {'task'}")
    for job in found:
        attempts = f"{job.attempts}/{job.max_attempts}"
        click.echo(f"{job.id:<32} {job.status.value:<9} {attempts:>3} {_clip(job.task, 33)}")


@errands_cli.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def show(job_id: str, as_json: bool) -> None:
    """Everything about one job, traceback included."""
    job = _find(job_id)
    data = job.to_dict()
    args = serialization.to_plain(list(job.args))
    kwargs = serialization.to_plain(job.kwargs)
    if as_json:
        data.update(args=args, kwargs=kwargs, traceback=job.traceback)
        _print_json(data)
        return
    lines = [
        ("id", job.id),
        ("task", job.task),
        ("status", job.status.value + (" (cancel requested)" if job.cancel_requested else "")),
        ("queue", f"{job.queue} (priority {job.priority})"),
        ("attempts", f"{job.attempts} of {job.max_attempts}"),
        ("args", json.dumps(args)),
        ("kwargs", json.dumps(kwargs)),
        ("enqueued", _when(job.enqueued_at)),
        ("due", _when(job.scheduled_for)),
        ("started", _when(job.started_at)),
        ("finished", _when(job.finished_at)),
    ]
    if job.waiting_for:
        lines.insert(3, ("waits for", _waits_for(job)))
    if job.progress is not None:
        lines.append(("progress", f"{job.progress:.0%} {job.progress_message or ''}"))
    if "result" in data:  # succeeded jobs only, as result() returns nothing else
        lines.append(("result", json.dumps(data["result"])))
    if job.error:
        lines.append(("error", job.error))
    for name, value in lines:
        click.echo(f"{name + ':':<10} {value}")
    if job.traceback:
        click.echo("\n" + job.traceback.rstrip())


def _waits_for(job: Job) -> str:
    """What a blocked workflow step waits for: ``2 of its 3 upstream steps to succeed``."""
    steps = "step" if job.upstream_steps == 1 else "steps"
    return f"{job.waiting_for} of its {job.upstream_steps} upstream {steps} to succeed"


@errands_cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def schedules(as_json: bool) -> None:
    """Periodic jobs, with their next run (in their zone and UTC) and last outcome."""
    infos = _admin().schedules()
    if as_json:
        _print_json([info.to_dict() for info in infos])
        return
    if not infos:
        click.echo("(no schedules)")
        return
    for info in infos:
        described = info.description + ("  PAUSED" if info.paused else "")
        click.echo(f"{_clip(info.name, 30):<30} {_clip(described, 49)}")
        next_run = info.next_run.strftime("%Y-%m-%d %H:%M:%S %Z")
        line = f"  next: {next_run} ({info.next_run_utc:%H:%M:%S} UTC)"
        if info.last_run is not None:
            outcome = info.last_status.value if info.last_status else "pruned"
            line += f"  last: {info.last_run:%m-%d %H:%M} {outcome}"
        click.echo(_clip(line, 80))


# -- acting ---------------------------------------------------------------------


@errands_cli.group()
def queue() -> None:
    """Pause and resume queues, for every worker of the app."""


@queue.command("pause")
@click.argument("name")
def pause_queue(name: str) -> None:
    """Stop workers claiming jobs of queue NAME (jobs still enqueue)."""
    _admin().pause_queue(name)
    click.echo(f"Queue {name} paused: no worker claims its jobs until it is resumed.")


@queue.command("resume")
@click.argument("name")
def resume_queue(name: str) -> None:
    """Let workers claim jobs of queue NAME again."""
    _admin().resume_queue(name)
    click.echo(f"Queue {name} resumed.")


@errands_cli.group()
def schedule() -> None:
    """Pause, resume, run or re-time a schedule, for every process of the app."""


@schedule.command("pause")
@click.argument("name")
def pause_schedule(name: str) -> None:
    """Stop schedule NAME firing until it is resumed."""
    _schedule_action(lambda admin: admin.pause_schedule(name))
    click.echo(f"Schedule {name} paused.")


@schedule.command("resume")
@click.argument("name")
def resume_schedule(name: str) -> None:
    """Let schedule NAME fire again, from its next tick (missed ticks never fire)."""
    _schedule_action(lambda admin: admin.resume_schedule(name))
    info = _admin().schedule(name)
    click.echo(f"Schedule {name} resumed; next run {_next_run(info)}.")


@schedule.command("run")
@click.argument("name")
def run_schedule(name: str) -> None:
    """Enqueue schedule NAME's job now, once; prints the job id."""
    job = _schedule_action(lambda admin: admin.run_schedule(name))
    click.echo(job.id)


@schedule.command("set")
@click.argument("name")
@click.option("--every", type=duration, help="Fire every this long (90, 5m, 1h).")
@click.option("--cron", help="Fire at the times of this cron expression, in the schedule's zone.")
def set_schedule(name: str, every: float | None, cron: str | None) -> None:
    """Change when schedule NAME fires (stored for every process, kept across restarts)."""
    if (every is None) == (cron is None):
        raise click.UsageError("give exactly one of --every and --cron")
    info = _schedule_action(lambda admin: admin.change_schedule(name, every=every, cron=cron))
    click.echo(f"Schedule {name}: {info.description}; next run {_next_run(info)}.")


def _schedule_action(action: Callable[[Admin], T]) -> T:
    try:
        return action(_admin())
    except (ScheduleNotFound, UnknownTask, ValueError) as exc:
        _fail(str(exc))


def _next_run(info: ScheduleInfo) -> str:
    return f"{info.next_run:%Y-%m-%d %H:%M:%S %Z} ({info.next_run_utc:%H:%M:%S} UTC)"


@errands_cli.command()
@click.argument("job_id", required=False)
@click.option("--failed", "all_failed", is_flag=True, help="Re-run every failed job.")
@click.option("--queue", help="With --failed: only this queue.")
def retry(job_id: str | None, all_failed: bool, queue: str | None) -> None:
    """Run a finished job again under the same id (or every failed job)."""
    if job_id is None and not all_failed:
        raise click.UsageError(
            "give the JOB_ID of a finished job, or --failed for all failed jobs"
        )
    if job_id is not None and all_failed:
        raise click.UsageError("give a JOB_ID or --failed, not both")
    admin = _admin()
    if job_id is None:
        click.echo(f"Queued {admin.retry_failed(queue)} failed job(s) again.")
        return
    try:
        job = admin.retry(job_id)
    except (JobNotFound, ValueError) as exc:
        _fail(str(exc))
    if job.status.finished:
        _fail(f"job {job_id} stays {job.status}: a live job holds its unique key")
    if job.status == JobStatus.BLOCKED:
        click.echo(f"Job {job_id} waits again for its upstream steps (blocked).")
    else:
        click.echo(f"Job {job_id} queued again.")


@errands_cli.command()
@click.argument("job_id")
def cancel(job_id: str) -> None:
    """Cancel a job: a waiting one never starts, a running one is asked to stop."""
    try:
        job = _admin().cancel(job_id)
    except (JobNotFound, ValueError) as exc:
        _fail(str(exc))
    if job.status == JobStatus.RUNNING:
        click.echo(f"Job {job_id} is running; asked it to stop.")
    else:
        click.echo(f"Job {job_id} cancelled.")


@errands_cli.command()
@click.option(
    "--state",
    "status_",
    type=click.Choice([s.value for s in STATUSES if s != JobStatus.RUNNING]),
    help="Only jobs in this state (default: finished ones).",
)
@click.option("--queue", help="Only jobs in this queue.")
@click.option("--older-than", type=duration, help="Only jobs older than this (7d, 12h).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def purge(status_: str | None, queue: str | None, older_than: float | None, yes: bool) -> None:
    """Delete jobs (never running ones)."""
    states = [JobStatus(status_)] if status_ else list(FINISHED)
    what = f"{'/'.join(s.value for s in states)} jobs" + (f" in queue {queue}" if queue else "")
    if older_than is not None:
        what += f" older than {_age(older_than)}"
    if not yes:
        click.confirm(f"Delete {what}?", abort=True)
    deleted = _admin().purge(states, queue, older_than)
    click.echo(f"Deleted {deleted} job(s).")


@errands_cli.command()
@click.argument("task_name")
@click.argument("args_json", required=False)
@click.option("--queue", help="Queue to use instead of the task's.")
@click.option("--priority", type=int, help="Priority instead of the task's.")
@click.option("--delay", type=duration, help="Run after this long (30s, 5m).")
def enqueue(
    task_name: str,
    args_json: str | None,
    queue: str | None,
    priority: int | None,
    delay: float | None,
) -> None:
    """Enqueue a task by name; ARGS_JSON is a list of arguments or an object of keywords."""
    args, kwargs = _parse_arguments(args_json)
    overrides = {
        key: value
        for key, value in (("queue", queue), ("priority", priority), ("delay", delay))
        if value is not None
    }
    try:
        job = _admin().enqueue(task_name, args, kwargs, **overrides)
    except (UnknownTask, TypeError, ValueError) as exc:
        _fail(str(exc))
    click.echo(job.id)


def _find(job_id: str) -> Job:
    try:
        return _admin().job(job_id)
    except JobNotFound as exc:
        _fail(str(exc))


def _parse_arguments(text: str | None) -> tuple[list[Any], dict[str, Any]]:
    if not text:
        return [], {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="ARGS_JSON") from None
    if isinstance(value, list):
        return value, {}
    if isinstance(value, dict):
        return [], value
    return [value], {}


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s"


def _configure_logging() -> None:
    """Log one line per job to stderr unless the app has set up logging itself."""
    package_logger = logging.getLogger("flask_errands")
    if not logging.getLogger().handlers and not package_logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s"))
        package_logger.addHandler(handler)
    if package_logger.level == logging.NOTSET:
        package_logger.setLevel(logging.INFO)
