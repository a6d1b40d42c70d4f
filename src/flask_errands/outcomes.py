"""How an attempt ends: the one rule that turns what happened into the job's next state.

The runner, the timeout watchdog and eager mode all ask :func:`decide`, so a
change to the retry policy is a change here and nowhere else. A job whose
worker died is the one ending decided in the store instead (``reserve``
counts lost leases atomically, across hosts); :func:`decide` does not see it.
"""

from __future__ import annotations

import dataclasses
import enum
import math

from .status import JobStatus

#: The longest pause between two attempts, whatever the back-off says.
MAX_BACKOFF = 3600.0
#: The longest pause a task may ask for with ``Retry(delay=...)``: a year.
MAX_REQUESTED_DELAY = 365 * 86400.0


class Ending(enum.Enum):
    """What happened to an attempt, before any policy is applied."""

    #: The task returned a value.
    RETURNED = "returned"
    #: The task raised an exception.
    RAISED = "raised"
    #: The task raised ``Retry``: another attempt, whatever ``retries`` says.
    RETRY_REQUESTED = "retry requested"
    #: The task raised ``JobCancelled``.
    CANCELLED = "cancelled"
    #: The attempt ran past its timeout and was stopped.
    TIMED_OUT = "timed out"
    #: The job cannot run here at all (its task is unknown): failed, never retried.
    REFUSED = "refused"


@dataclasses.dataclass(frozen=True)
class Decision:
    """The job's next state; ``delay`` is the wait before the next attempt when scheduled."""

    status: JobStatus
    delay: float | None = None

    @property
    def retrying(self) -> bool:
        return self.status is JobStatus.SCHEDULED


def decide(
    ending: Ending,
    *,
    attempts: int,
    max_attempts: int,
    cancel_requested: bool,
    retry_delay: float,
    requested_delay: float | None = None,
    backoff: bool = True,
    jitter: float = 1.0,
) -> Decision:
    """Decide what follows an attempt.

    A cancel request wins over everything, so a cancelled job is never retried.
    An explicit retry is always honoured, after ``requested_delay`` if given; a
    failure or timeout is retried while ``attempts < max_attempts``, after an
    exponential back-off from ``retry_delay`` scaled by ``jitter`` (0.5 to 1).
    ``backoff=False`` (eager mode, tests) retries at once, whatever was asked.
    """
    if cancel_requested or ending is Ending.CANCELLED:
        return _CANCELLED
    if ending is Ending.RETURNED:
        return _SUCCEEDED
    if ending is Ending.REFUSED:
        return _FAILED
    if ending is not Ending.RETRY_REQUESTED and attempts >= max_attempts:
        return _FAILED
    if not backoff:
        return Decision(JobStatus.SCHEDULED, 0.0)
    if ending is Ending.RETRY_REQUESTED and requested_delay is not None:
        if math.isnan(requested_delay):
            requested_delay = backoff_delay(attempts, retry_delay) * jitter
        return Decision(JobStatus.SCHEDULED, min(max(0.0, requested_delay), MAX_REQUESTED_DELAY))
    return Decision(JobStatus.SCHEDULED, backoff_delay(attempts, retry_delay) * jitter)


_SUCCEEDED = Decision(JobStatus.SUCCEEDED)
_FAILED = Decision(JobStatus.FAILED)
_CANCELLED = Decision(JobStatus.CANCELLED)


def backoff_delay(attempts: int, retry_delay: float) -> float:
    """The pause after ``attempts`` failed attempts, before jitter: doubling, capped."""
    return float(min(retry_delay * 2.0 ** min(max(attempts - 1, 0), 64), MAX_BACKOFF))
