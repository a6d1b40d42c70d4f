"""The HTML pages: server-rendered from package templates, every action a POST form."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable
from typing import Any

from flask import Blueprint, flash, redirect, render_template, request, url_for
from werkzeug.exceptions import BadRequest, NotFound
from werkzeug.wrappers import Response

from ..admin import Admin
from ..exceptions import ErrandsError
from ..status import STATUSES, JobStatus
from .params import JobFilters, is_name
from .present import pretty

__all__ = ["page_url", "pretty", "register", "when"]


def when(value: dt.datetime | None, zone: dt.tzinfo | None = dt.timezone.utc) -> str:
    """A time as people read it, in ``zone`` with the zone's name; an em dash for none."""
    if value is None:
        return "\u2014"
    return value.astimezone(zone).strftime("%Y-%m-%d %H:%M:%S %Z")


def checked_name(name: str) -> str:
    """A job id, queue or schedule name from the path; one no store could hold is not found."""
    if not is_name(name):
        raise NotFound("no such name")
    return name


def page_url(endpoint: str, filters: JobFilters, cursor: str | None) -> str:
    """The link to another page of a listing, with the same filters."""
    values: dict[str, Any] = filters.query(cursor=cursor)
    return url_for(f".{endpoint}", **values)


def parse_every(raw: str) -> float:
    try:
        every = float(raw)
    except ValueError:
        raise BadRequest("every must be a number of seconds") from None
    if not math.isfinite(every):
        raise BadRequest("every must be a finite number of seconds")
    return every


def act(action: Callable[[], object], done: str) -> None:
    """Run an admin action and flash ``done``, or the reason the admin API refused it."""
    try:
        action()
        flash(done, "ok")
    except ValueError as exc:
        flash(str(exc), "error")


def on_failed(each: Callable[[str], object], every: Callable[[str | None], int]) -> int:
    """Apply ``each`` to the failed jobs the form selected, or ``every`` to its queue's.

    Returns how many jobs it applied to; a selected job that has changed meanwhile is skipped.
    """
    queue = request.form.get("queue") or None
    if queue is not None:
        checked_name(queue)
    ids = request.form.getlist("job_id")
    if not ids:
        return every(queue)
    done = 0
    for job_id in ids[:500]:
        try:
            each(checked_name(job_id))
            done += 1
        except (ValueError, LookupError):
            pass
    return done


def register(bp: Blueprint, admin: Callable[[], Admin]) -> None:
    """Add the pages and their form actions to ``bp``."""

    def job_page(filters: JobFilters, status: str | None) -> Any:
        try:
            return admin().job_page(
                status, filters.queue, filters.task, limit=filters.limit, cursor=filters.cursor
            )
        except ValueError as exc:
            raise BadRequest(str(exc)) from None

    @bp.get("/")
    def overview() -> str:
        api = admin()
        counts = api.counts()
        totals = {status: sum(row[status] for row in counts.values()) for status in STATUSES}
        return render_template(
            "errands_dashboard/overview.html",
            counts=counts,
            totals=totals,
            statuses=STATUSES,
            workers=api.workers(),
        )

    @bp.get("/jobs")
    def jobs() -> str:
        filters = JobFilters.parse(request.args, len(request.query_string))
        page = job_page(filters, filters.status)
        return render_template(
            "errands_dashboard/jobs.html",
            page=page,
            filters=filters,
            statuses=STATUSES,
        )

    @bp.get("/jobs/<job_id>")
    def job(job_id: str) -> str:
        found = admin().job(checked_name(job_id))
        return render_template("errands_dashboard/job.html", job=found)

    @bp.post("/jobs/<job_id>/retry")
    def retry(job_id: str) -> Response:
        act(lambda: admin().retry(checked_name(job_id)), "The job is queued again.")
        return redirect(url_for(".job", job_id=job_id))

    @bp.post("/jobs/<job_id>/cancel")
    def cancel(job_id: str) -> Response:
        act(lambda: admin().cancel(checked_name(job_id)), "The job is cancelled.")
        return redirect(url_for(".job", job_id=job_id))

    @bp.get("/failed")
    def failed() -> str:
        filters = JobFilters.parse(request.args, len(request.query_string))
        page = job_page(filters, JobStatus.FAILED.value)
        return render_template(
            "errands_dashboard/failed.html",
            page=page,
            filters=filters,
        )

    @bp.post("/failed/retry")
    def retry_failed() -> Response:
        api = admin()
        done = on_failed(api.retry, lambda queue: api.retry_failed(queue))
        flash(f"{done} failed job{'s' if done != 1 else ''} queued again.", "ok")
        return redirect(url_for(".failed"))

    @bp.post("/failed/purge")
    def purge_failed() -> Response:
        api = admin()
        done = on_failed(api.delete, lambda queue: api.purge([JobStatus.FAILED], queue))
        flash(f"{done} failed job{'s' if done != 1 else ''} deleted.", "ok")
        return redirect(url_for(".failed"))

    @bp.get("/queues")
    def queues() -> str:
        return render_template(
            "errands_dashboard/queues.html",
            queues=admin().queues(),
            statuses=STATUSES,
            limits=admin().limits(),
        )

    @bp.post("/queues/<path:name>/pause")
    def pause_queue(name: str) -> Response:
        act(
            lambda: admin().pause_queue(checked_name(name)),
            f"Queue {name} paused: workers take nothing from it.",
        )
        return redirect(url_for(".queues"))

    @bp.post("/queues/<path:name>/resume")
    def resume_queue(name: str) -> Response:
        act(lambda: admin().resume_queue(checked_name(name)), f"Queue {name} resumed.")
        return redirect(url_for(".queues"))

    @bp.get("/schedules")
    def schedules() -> str:
        return render_template("errands_dashboard/schedules.html", schedules=admin().schedules())

    @bp.post("/schedules/<path:name>/pause")
    def pause_schedule(name: str) -> Response:
        admin().pause_schedule(checked_name(name))
        flash(f"Schedule {name} paused.", "ok")
        return redirect(url_for(".schedules"))

    @bp.post("/schedules/<path:name>/resume")
    def resume_schedule(name: str) -> Response:
        admin().resume_schedule(checked_name(name))
        flash(f"Schedule {name} resumed.", "ok")
        return redirect(url_for(".schedules"))

    @bp.post("/schedules/<path:name>/run")
    def run_schedule(name: str) -> Response:
        try:
            job = admin().run_schedule(checked_name(name))
        except LookupError:
            raise
        except (ValueError, ErrandsError) as exc:
            flash(f"Schedule {name} did not run: {exc}", "error")
            return redirect(url_for(".schedules"))
        flash(f"Schedule {name} enqueued job {job.id}.", "ok")
        return redirect(url_for(".job", job_id=job.id))

    @bp.post("/schedules/<path:name>/edit")
    def edit_schedule(name: str) -> Response:
        kind = request.form.get("kind")
        value = (request.form.get("value") or "").strip()
        if kind not in ("every", "cron") or not value or len(value) > 200:
            raise BadRequest("choose every or cron and give a value")
        try:
            if kind == "every":
                admin().change_schedule(checked_name(name), every=parse_every(value))
            else:
                admin().change_schedule(checked_name(name), cron=value)
            flash(f"Schedule {name} now runs on {kind} {value}.", "ok")
        except (ValueError, BadRequest) as exc:
            flash(f"Schedule {name} unchanged: {exc}", "error")
        return redirect(url_for(".schedules"))

    @bp.get("/workers")
    def workers() -> str:
        return render_template("errands_dashboard/workers.html", workers=admin().workers())
