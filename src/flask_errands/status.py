"""``JobStatus``: where a job is in its life, the one status type of stores, jobs and the CLI."""

from __future__ import annotations

import enum


class JobStatus(str, enum.Enum):
    """Where a job is in its life; members compare equal to their string values.

    ``pending`` is never stored: it is the status of a job enqueued inside
    ``errands.transaction()`` whose transaction has not committed yet.
    """

    PENDING = "pending"
    #: A workflow step waiting for its upstream steps to succeed: stored, never reserved.
    BLOCKED = "blocked"
    QUEUED = "queued"
    SCHEDULED = "scheduled"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value

    #: Hash as the plain string does, so a status and its value are one dict key.
    __hash__ = str.__hash__

    @property
    def waiting(self) -> bool:
        """Queued or scheduled: it has not started (or waits for another attempt)."""
        return self in WAITING

    @property
    def live(self) -> bool:
        """Waiting or running: it still holds its unique key."""
        return self in LIVE

    @property
    def finished(self) -> bool:
        """Succeeded, failed or cancelled: it will not run again unless re-run."""
        return self in FINISHED


#: Every status a store holds, in the order a job passes through them.
STATUSES = tuple(status for status in JobStatus if status is not JobStatus.PENDING)
WAITING = (JobStatus.QUEUED, JobStatus.SCHEDULED)
LIVE = (*WAITING, JobStatus.RUNNING)
FINISHED = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)
#: Each status by its string: a dict lookup costs a fraction of calling ``JobStatus``.
BY_VALUE: dict[str, JobStatus] = {status.value: status for status in JobStatus}
