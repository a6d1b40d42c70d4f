"""The JSON API: what the pages show and do, for scripts and the pages' own JavaScript.

Every route is described in ``openapi.json`` beside this file; a test keeps the
two in step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from flask import Blueprint, request
from werkzeug.exceptions import BadRequest, Conflict, NotFound

from ..admin import Admin
from ..exceptions import ErrandsError
from . import csrf
from .params import JobFilters, is_name
from .present import job_detail, job_summary, queue_dict, schedule_dict, worker_dict

Json = tuple[dict[str, Any], int] | dict[str, Any]


def name(value: str) -> str:
    if not is_name(value):
        raise NotFound("no such name")
    return value


def schedule_change(body: Any) -> dict[str, Any]:
    """The keyword arguments for ``change_schedule`` from a PATCH body, checked."""
    if not isinstance(body, dict) or len(body) != 1 or not {"every", "cron"} >= set(body):
        raise BadRequest('send a JSON object with one key: {"every": seconds} or {"cron": "..."}')
    every, cron = body.get("every"), body.get("cron")
    if "every" in body and (
        isinstance(every, bool) or not isinstance(every, int | float) or not math.isfinite(every)
    ):
        raise BadRequest("every must be a finite number of seconds")
    if "cron" in body and (not isinstance(cron, str) or not 0 < len(cron) <= 200):
        raise BadRequest("cron must be a cron expression of at most 200 characters")
    return {"every": every} if "every" in body else {"cron": cron}


def register(bp: Blueprint, admin: Callable[[], Admin]) -> None:
    """Add the ``api/...`` routes to ``bp``."""

    @bp.get("/api/csrf")
    def api_csrf() -> Json:
        return {"csrf_token": csrf.token(), "header": csrf.HEADER, "field": csrf.FIELD}

    @bp.get("/api/jobs")
    def api_jobs() -> Json:
        filters = JobFilters.parse(request.args, len(request.query_string))
        try:
            page = admin().job_page(
                filters.status,
                filters.queue,
                filters.task,
                limit=filters.limit,
                cursor=filters.cursor,
            )
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        return {"jobs": [job_summary(job) for job in page.jobs], "next_cursor": page.next_cursor}

    @bp.get("/api/jobs/<job_id>")
    def api_job(job_id: str) -> Json:
        return job_detail(admin().job(name(job_id)))

    @bp.post("/api/jobs/<job_id>/retry")
    def api_retry(job_id: str) -> Json:
        try:
            return job_detail(admin().retry(name(job_id)))
        except LookupError:
            raise
        except ValueError as exc:
            raise Conflict(str(exc)) from None

    @bp.post("/api/jobs/<job_id>/cancel")
    def api_cancel(job_id: str) -> Json:
        try:
            return job_detail(admin().cancel(name(job_id)))
        except LookupError:
            raise
        except ValueError as exc:
            raise Conflict(str(exc)) from None

    @bp.get("/api/queues")
    def api_queues() -> Json:
        limits = [limit.to_dict() for limit in admin().limits()]
        return {"queues": [queue_dict(queue) for queue in admin().queues()], "limits": limits}

    @bp.post("/api/queues/<path:queue>/pause")
    def api_pause_queue(queue: str) -> Json:
        try:
            admin().pause_queue(name(queue))
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        return {"name": queue, "paused": True}

    @bp.post("/api/queues/<path:queue>/resume")
    def api_resume_queue(queue: str) -> Json:
        try:
            admin().resume_queue(name(queue))
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        return {"name": queue, "paused": False}

    @bp.get("/api/schedules")
    def api_schedules() -> Json:
        return {"schedules": [schedule_dict(info) for info in admin().schedules()]}

    def one_schedule(schedule: str) -> Json:
        for info in admin().schedules():
            if info.name == schedule:
                return schedule_dict(info)
        raise LookupError(f"no schedule named {schedule!r}")

    @bp.post("/api/schedules/<path:schedule>/pause")
    def api_pause_schedule(schedule: str) -> Json:
        admin().pause_schedule(name(schedule))
        return one_schedule(schedule)

    @bp.post("/api/schedules/<path:schedule>/resume")
    def api_resume_schedule(schedule: str) -> Json:
        admin().resume_schedule(name(schedule))
        return one_schedule(schedule)

    @bp.post("/api/schedules/<path:schedule>/run")
    def api_run_schedule(schedule: str) -> Json:
        try:
            return job_detail(admin().run_schedule(name(schedule))), 202
        except LookupError:
            raise
        except (ValueError, ErrandsError) as exc:
            # max_running holds it back, its task is not registered here, or it just fired.
            raise Conflict(str(exc)) from None

    @bp.patch("/api/schedules/<path:schedule>")
    def api_change_schedule(schedule: str) -> Json:
        change = schedule_change(request.get_json(silent=True))
        try:
            info = admin().change_schedule(name(schedule), **change)
        except LookupError:
            raise
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        return schedule_dict(info)

    @bp.get("/api/workers")
    def api_workers() -> Json:
        return {"workers": [worker_dict(worker) for worker in admin().workers()]}

    @bp.get("/api/stats")
    def api_stats() -> Json:
        stats: dict[str, Any] = admin().stats().to_dict()
        return stats
