"""Background tasks and scheduling for Flask."""

from __future__ import annotations

from .context import RunningJob, current_job
from .exceptions import (
    BackendUnavailable,
    ConfigurationError,
    DuplicateJob,
    EnqueueError,
    ErrandsError,
    JobCancelled,
    JobFailed,
    PayloadTooLarge,
    Retry,
    UnknownTask,
)
from .extension import Errands
from .jobs import Job, JobStatus
from .logs import JobLogFilter
from .signals import job_enqueued, job_failed, job_retrying, job_started, job_succeeded
from .tasks import BoundTask, Task, TaskOptions

__all__ = [
    "BackendUnavailable",
    "BoundTask",
    "ConfigurationError",
    "DuplicateJob",
    "EnqueueError",
    "Errands",
    "ErrandsError",
    "Job",
    "JobCancelled",
    "JobFailed",
    "JobLogFilter",
    "JobStatus",
    "PayloadTooLarge",
    "Retry",
    "RunningJob",
    "Task",
    "TaskOptions",
    "UnknownTask",
    "current_job",
    "job_enqueued",
    "job_failed",
    "job_retrying",
    "job_started",
    "job_succeeded",
]
