"""The outcome rule alone: every ending, attempt count, cancel request and eager mode.

:func:`flask_errands.outcomes.decide` is the one place the retry policy
lives; the runner, the timeout watchdog and eager mode all call it.
"""

from __future__ import annotations

import itertools

import pytest

from flask_errands.outcomes import MAX_BACKOFF, Decision, Ending, backoff_delay, decide
from flask_errands.status import JobStatus

ATTEMPTS = (1, 2, 3)  # with max_attempts=2: first try, last try, past the last (a lost lease)


def expected(
    ending: Ending, attempts: int, cancel: bool, backoff: bool, requested: float | None
) -> Decision:
    """The policy, written out case by case as the README states it."""
    if cancel or ending is Ending.CANCELLED:
        return Decision(JobStatus.CANCELLED)
    if ending is Ending.RETURNED:
        return Decision(JobStatus.SUCCEEDED)
    if ending is Ending.REFUSED:
        return Decision(JobStatus.FAILED)
    if ending is Ending.RETRY_REQUESTED:
        if not backoff:
            return Decision(JobStatus.SCHEDULED, 0.0)
        if requested is not None:
            return Decision(JobStatus.SCHEDULED, requested)
        return Decision(JobStatus.SCHEDULED, 1.5 * 2 ** (attempts - 1) * 0.75)
    if attempts >= 2:
        return Decision(JobStatus.FAILED)
    return Decision(JobStatus.SCHEDULED, 1.5 * 0.75 if backoff else 0.0)


@pytest.mark.parametrize(
    ("ending", "attempts", "cancel", "backoff", "requested"),
    list(itertools.product(Ending, ATTEMPTS, (False, True), (True, False), (None, 7.0))),
)
def test_every_combination(
    ending: Ending, attempts: int, cancel: bool, backoff: bool, requested: float | None
) -> None:
    decision = decide(
        ending,
        attempts=attempts,
        max_attempts=2,
        cancel_requested=cancel,
        retry_delay=1.5,
        requested_delay=requested,
        backoff=backoff,
        jitter=0.75,
    )
    assert decision == expected(ending, attempts, cancel, backoff, requested)
    assert decision.retrying == (decision.status is JobStatus.SCHEDULED)


def test_backoff_doubles_and_is_capped() -> None:
    assert [backoff_delay(n, 1.0) for n in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 8.0]
    assert backoff_delay(40, 1.0) == MAX_BACKOFF
    assert backoff_delay(10_000, 1.0) == MAX_BACKOFF  # no overflow however many attempts


def test_a_negative_requested_delay_means_now() -> None:
    decision = decide(
        Ending.RETRY_REQUESTED,
        attempts=1,
        max_attempts=1,
        cancel_requested=False,
        retry_delay=1.0,
        requested_delay=-5.0,
    )
    assert decision == Decision(JobStatus.SCHEDULED, 0.0)
