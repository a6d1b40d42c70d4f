"""Background tasks and scheduling for Flask."""

from __future__ import annotations

from .admin import Admin, ScheduleInfo, WorkerInfo
from .context import RunningJob, current_job
from .dashboard import BasicAuth
from .exceptions import (
    BackendUnavailable,
    ConfigurationError,
    DuplicateJob,
    EnqueueError,
    ErrandsError,
    JobCancelled,
    JobFailed,
    JobNotFound,
    PayloadTooLarge,
    Retry,
    UnknownTask,
)
from .extension import Errands
from .jobs import Job
from .logs import JobLogFilter
from .signals import job_enqueued, job_failed, job_retrying, job_started, job_succeeded
from .status import JobStatus
from .tasks import BoundTask, Task, TaskOptions

__all__ = [
    "Admin",
    "BackendUnavailable",
    "BasicAuth",
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
    "JobNotFound",
    "JobStatus",
    "PayloadTooLarge",
    "Retry",
    "RunningJob",
    "ScheduleInfo",
    "Task",
    "TaskOptions",
    "UnknownTask",
    "WorkerInfo",
    "current_job",
    "job_enqueued",
    "job_failed",
    "job_retrying",
    "job_started",
    "job_succeeded",
]
