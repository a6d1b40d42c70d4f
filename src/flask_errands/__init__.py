"""Background tasks and scheduling for Flask."""

from __future__ import annotations

from .admin import Admin, JobPage, LimitInfo, QueueInfo, ScheduleInfo, Stats, Totals, WorkerInfo
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
    ScheduleNotFound,
    UnknownTask,
)
from .extension import Errands
from .jobs import Job
from .logs import JobLogFilter
from .signals import job_enqueued, job_failed, job_retrying, job_started, job_succeeded
from .status import JobStatus
from .tasks import BoundTask, Signature, Task, TaskOptions
from .workflows import Chain, Chord, Group, GroupResult, WorkflowJob, chain, chord, group

__all__ = [
    "Admin",
    "BackendUnavailable",
    "BasicAuth",
    "BoundTask",
    "Chain",
    "Chord",
    "ConfigurationError",
    "DuplicateJob",
    "EnqueueError",
    "Errands",
    "ErrandsError",
    "Group",
    "GroupResult",
    "Job",
    "JobCancelled",
    "JobFailed",
    "JobLogFilter",
    "JobNotFound",
    "JobPage",
    "JobStatus",
    "LimitInfo",
    "PayloadTooLarge",
    "QueueInfo",
    "Retry",
    "RunningJob",
    "ScheduleInfo",
    "ScheduleNotFound",
    "Signature",
    "Stats",
    "Task",
    "TaskOptions",
    "Totals",
    "UnknownTask",
    "WorkerInfo",
    "WorkflowJob",
    "chain",
    "chord",
    "current_job",
    "group",
    "job_enqueued",
    "job_failed",
    "job_retrying",
    "job_started",
    "job_succeeded",
]
