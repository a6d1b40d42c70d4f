"""Jobs, queues, workers and schedules as the JSON the API answers and the pages show."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ..admin import ScheduleInfo, WorkerInfo
from ..jobs import Job
from ..serialization import to_plain


def job_summary(job: Job) -> dict[str, Any]:
    """A job as a listing shows it: no arguments, result or traceback."""
    data = job.to_dict()
    data.pop("result", None)
    data["worker_id"] = job.worker_id
    return data


def job_detail(job: Job) -> dict[str, Any]:
    """Everything about a job: arguments, result, error and traceback too."""
    data = job.to_dict()
    data["worker_id"] = job.worker_id
    data["args"] = to_plain(job.args)
    data["kwargs"] = to_plain(job.kwargs)
    data["traceback"] = job.traceback
    return data


def counts_dict(counts: Mapping[Any, int]) -> dict[str, int]:
    """Counts keyed by status name, as JSON numbers whatever number type the store gave."""
    return {str(status): int(n) for status, n in counts.items()}


def queue_dict(queue: Any) -> dict[str, Any]:
    return {"name": queue.name, "paused": queue.paused, "counts": counts_dict(queue.counts)}


def worker_dict(worker: WorkerInfo) -> dict[str, Any]:
    return worker.to_dict()


def schedule_dict(info: ScheduleInfo) -> dict[str, Any]:
    return info.to_dict()


def pretty(value: Any) -> str:
    """JSON text for people to read in a ``<pre>``; escaping is the template's job."""
    return json.dumps(to_plain(value), indent=2, ensure_ascii=False, sort_keys=True)
