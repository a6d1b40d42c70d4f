"""``flask errands …``: run workers and look after queues from the shell.

Commands parse their options and call the engine; output fits 80 columns, and
``--json`` gives scripts the same data. Exit codes: 0 success, 1 not found or
failed, 2 usage.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
import time
from typing import Any

import click
from flask import current_app
from flask.cli import AppGroup

from . import durations, serialization
from .backends import hide_password
from .backends.base import FINISHED, RUNNING, STATUSES, JobRecord
from .config import parse_queues
from .extension import AppState
from .jobs import Job
from .process import WorkerOptions, queues_label, run_worker

errands_cli = AppGroup("errands", help="Run background workers and look after job queues.")

_STATE = click.Choice(STATUSES)


def _state() -> AppState:
    state = current_app.extensions.get("errands")
    if not isinstance(state, AppState):
        raise click.UsageError("flask-errands is not registered on this app (Errands(app)).")
    return state


def _fail(message: str) -> None:
    click.echo(f"Error: {message}", err=True)
    sys.exit(1)


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return dt.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _find(state: AppState, job_id: str) -> JobRecord:
    record = state.backend.get(job_id)
    if record is None:
        _fail(f"no job with id {job_id}")
    assert record is not None
    return record


def parse_duration(text: str) -> float:
    """Seconds in ``30``, ``45s``, ``15m``, ``12h``, ``7d`` or ``2w``."""
    try:
        return durations.parse_duration(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


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
    state = _state()
    settings = state.settings
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
    sys.exit(run_worker(state, options))


@errands_cli.command()
def scheduler() -> None:
    """Fire periodic jobs only (no job runs here); stop with SIGTERM/SIGINT."""
    state = _state()
    _configure_logging()
    try:
        from .scheduler import Scheduler
    except ImportError:
        _fail("this version has no scheduler")
    from .process import StopSignals

    stop = StopSignals(on_second=lambda: None).install()
    click.echo(f"flask-errands scheduler\n  backend: {hide_password(state.settings.url)}")
    Scheduler(state).run(stop.requested)


@errands_cli.command()
@click.option("-q", "--queues", help="Comma-separated queues to drain (default: all).")
def drain(queues: str | None) -> None:
    """Run every due job now in this process, then exit."""
    state = _state()
    names = parse_queues(queues)
    counts = state.backend.counts()
    due = sum(
        n
        for (queue, status), n in counts.items()
        if status in ("queued", "scheduled") and (names is None or queue in names)
    )
    failed = 0
    with click.progressbar(length=due, label="Draining", file=sys.stderr) as bar:

        def progress(record: JobRecord) -> None:
            nonlocal failed
            after = state.backend.get(record.id)
            failed += after is not None and after.status == "failed"
            bar.update(1)

        ran = state.drain(state.backend, state.runner, names, on_job=progress)
    click.echo(f"Ran {ran} job(s), {failed} failed.")
    if failed:
        sys.exit(1)


# -- looking --------------------------------------------------------------------


@errands_cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(as_json: bool) -> None:
    """Job counts per queue and state, and the live workers."""
    state = _state()
    counts = state.backend.counts()
    workers = state.backend.list_workers(time.time())
    if as_json:
        by_queue: dict[str, dict[str, int]] = {}
        for (queue, job_status), n in sorted(counts.items()):
            by_queue.setdefault(queue, {})[job_status] = n
        _print_json({"queues": by_queue, "workers": workers})
        return
    click.echo(f"backend: {_clip(hide_password(state.settings.url), 71)}\n")
    queues = sorted({queue for queue, _ in counts})
    header = f"{'queue':<16}" + "".join(f"{s:>10}" for s in STATUSES)
    click.echo(header)
    for queue in queues or []:
        row = "".join(f"{counts.get((queue, s), 0):>10}" for s in STATUSES)
        click.echo(f"{_clip(queue, 16):<16}{row}")
    if not queues:
        click.echo("(no jobs)")
    click.echo(f"\n{len(workers)} live worker(s)")
    for info in workers:
        click.echo(
            f"  {_clip(str(info['id']), 36):<36} {info.get('kind', ''):<8} "
            f"{info.get('concurrency', '?')} thr  {info.get('jobs_done', 0)} done  "
            f"{len(info.get('current_jobs') or [])} running"
        )


@errands_cli.command()
@click.option("--state", "status_", type=_STATE, help="Only jobs in this state.")
@click.option("--queue", help="Only jobs in this queue.")
@click.option("--limit", type=click.IntRange(1), default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def jobs(status_: str | None, queue: str | None, limit: int, as_json: bool) -> None:
    """List jobs, newest first."""
    state = _state()
    records = state.backend.list_jobs(status=status_, queue=queue, limit=limit)
    if as_json:
        _print_json([Job(record, state.backend).to_dict() for record in records])
        return
    if not records:
        click.echo("(no jobs)")
        return
    click.echo(f"{'id':<32} {'status':<9} {'try':>3} {'task'}")
    for record in records:
        attempts = f"{record.attempts}/{record.max_attempts}"
        click.echo(f"{record.id:<32} {record.status:<9} {attempts:>3} {_clip(record.task, 33)}")


@errands_cli.command()
@click.argument("job_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def show(job_id: str, as_json: bool) -> None:
    """Everything about one job, traceback included."""
    state = _state()
    record = _find(state, job_id)
    job = Job(record, state.backend)
    if as_json:
        data = job.to_dict()
        data.update(
            args=serialization.to_plain(list(job.args)),
            kwargs=serialization.to_plain(job.kwargs),
            traceback=record.traceback,
        )
        _print_json(data)
        return
    lines = [
        ("id", record.id),
        ("task", record.task),
        ("status", record.status + (" (cancel requested)" if record.cancel_requested else "")),
        ("queue", f"{record.queue} (priority {record.priority})"),
        ("attempts", f"{record.attempts} of {record.max_attempts}"),
        ("args", json.dumps(serialization.to_plain(list(job.args)))),
        ("kwargs", json.dumps(serialization.to_plain(job.kwargs))),
        ("enqueued", _when(record.enqueued_at)),
        ("due", _when(record.eta)),
        ("started", _when(record.started_at)),
        ("finished", _when(record.finished_at)),
    ]
    if record.progress is not None:
        lines.append(("progress", f"{record.progress:.0%} {record.progress_message or ''}"))
    if record.result is not None:
        lines.append(
            ("result", json.dumps(serialization.to_plain(serialization.loads(record.result))))
        )
    if record.error:
        lines.append(("error", record.error))
    for name, value in lines:
        click.echo(f"{name + ':':<10} {value}")
    if record.traceback:
        click.echo("\n" + record.traceback.rstrip())


@errands_cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def schedules(as_json: bool) -> None:
    """Periodic jobs, with their next run (in their zone and UTC) and last outcome."""
    from .scheduler import describe_schedules

    infos = describe_schedules(_state())
    if as_json:
        _print_json([info.to_dict() for info in infos])
        return
    if not infos:
        click.echo("(no schedules)")
        return
    for info in infos:
        click.echo(f"{_clip(info.name, 30):<30} {_clip(info.description, 49)}")
        next_run = info.next_run.strftime("%Y-%m-%d %H:%M:%S %Z")
        line = f"  next: {next_run} ({info.next_run_utc:%H:%M:%S} UTC)"
        if info.last_run is not None:
            outcome = info.last_status.value if info.last_status else "pruned"
            line += f"  last: {info.last_run:%m-%d %H:%M} {outcome}"
        click.echo(_clip(line, 80))


# -- acting ---------------------------------------------------------------------


@errands_cli.command()
@click.argument("job_id", required=False)
@click.option("--failed", "all_failed", is_flag=True, help="Re-run every failed job.")
@click.option("--queue", help="With --failed: only this queue.")
def retry(job_id: str | None, all_failed: bool, queue: str | None) -> None:
    """Run a finished job again under the same id (or every failed job)."""
    state = _state()
    if all_failed == (job_id is not None):
        raise click.UsageError("give a JOB_ID or --failed, not both")
    now = time.time()
    if job_id is not None:
        record = _find(state, job_id)
        if record.status not in FINISHED:
            _fail(f"job {job_id} is {record.status}; only finished jobs can be re-run")
        state.backend.requeue(job_id, now)
        click.echo(f"Job {job_id} queued again.")
        return
    seen: set[str] = set()
    while page := [
        r
        for r in state.backend.list_jobs(status="failed", queue=queue, limit=500)
        if r.id not in seen
    ]:
        for record in page:
            seen.add(record.id)
            state.backend.requeue(record.id, now)
    click.echo(f"Queued {len(seen)} failed job(s) again.")


@errands_cli.command()
@click.argument("job_id")
def cancel(job_id: str) -> None:
    """Cancel a job: a waiting one never starts, a running one is asked to stop."""
    state = _state()
    record = _find(state, job_id)
    if record.status in FINISHED:
        _fail(f"job {job_id} already {record.status}")
    after = state.backend.cancel(job_id, time.time())
    if after is not None and after.status == RUNNING:
        click.echo(f"Job {job_id} is running; asked it to stop.")
    else:
        click.echo(f"Job {job_id} cancelled.")


@errands_cli.command()
@click.option(
    "--state",
    "status_",
    type=click.Choice([s for s in STATUSES if s != RUNNING]),
    help="Only jobs in this state (default: finished ones).",
)
@click.option("--queue", help="Only jobs in this queue.")
@click.option("--older-than", type=parse_duration, help="Only jobs older than this (7d, 12h).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def purge(status_: str | None, queue: str | None, older_than: float | None, yes: bool) -> None:
    """Delete jobs (never running ones)."""
    state = _state()
    states = [status_] if status_ else list(FINISHED)
    what = f"{'/'.join(states)} jobs" + (f" in queue {queue}" if queue else "")
    if older_than is not None:
        what += f" older than {_age(older_than)}"
    if not yes:
        click.confirm(f"Delete {what}?", abort=True)
    before = None if older_than is None else time.time() - older_than
    deleted = sum(state.backend.purge(status=s, queue=queue, before=before) for s in states)
    click.echo(f"Deleted {deleted} job(s).")


@errands_cli.command()
@click.argument("task_name")
@click.argument("args_json", required=False)
@click.option("--queue", help="Queue to use instead of the task's.")
@click.option("--priority", type=int, help="Priority instead of the task's.")
@click.option("--delay", type=parse_duration, help="Run after this long (30s, 5m).")
def enqueue(
    task_name: str,
    args_json: str | None,
    queue: str | None,
    priority: int | None,
    delay: float | None,
) -> None:
    """Enqueue a task by name; ARGS_JSON is a list of arguments or an object of keywords."""
    state = _state()
    task = state.errands.tasks.get(task_name)
    if task is None:
        known = sorted(state.errands.tasks)
        close = [name for name in known if task_name.split(".")[-1] in name]
        hint = f"; did you mean {', '.join(close[:3])}?" if close else ""
        _fail(f"no task named {task_name!r}{hint}")
    assert task is not None
    args, kwargs = _parse_arguments(args_json)
    overrides: dict[str, Any] = {}
    if queue is not None:
        overrides["queue"] = queue
    if priority is not None:
        overrides["priority"] = priority
    if delay is not None:
        overrides["delay"] = delay
    try:
        job = task.options(**overrides).delay(*args, **kwargs)
    except (TypeError, ValueError) as exc:
        _fail(str(exc))
    click.echo(job.id)


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
