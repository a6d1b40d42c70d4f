"""Workflow steps in the store: every backend moves a workflow on the same way, atomically.

Part of the conformance suite: the ``backend`` fixture runs each test on memory,
SQLite, Redis and PostgreSQL. Steps are built by hand with their ``Flow``, as
``chain``/``group``/``chord`` build them.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from typing import Any

import pytest

from flask_errands.backends import Backend, JobRecord
from flask_errands.backends.base import Flow
from flask_errands.status import JobStatus
from tests.backends.test_conformance import LEASE, T0, job, reserve, stored, token
from tests.helpers import require

BLOCKED, QUEUED, CANCELLED = JobStatus.BLOCKED, JobStatus.QUEUED, JobStatus.CANCELLED


def chord_of(size: int) -> tuple[list[JobRecord], JobRecord]:
    """``size`` header steps feeding a callback, which takes the list of their results."""
    callback = job(status=BLOCKED, blocked_by=size, flow=Flow((), size, True).dumps())
    header = [job(flow=Flow(((callback.id, i),)).dumps()) for i in range(size)]
    return header, callback


def chain_of(size: int) -> list[JobRecord]:
    """``size`` steps one after another, each taking the previous result."""
    steps = [job() for _ in range(size)]
    for i, step in enumerate(steps):
        after = ((steps[i + 1].id, 0),) if i + 1 < size else ()
        step.flow = Flow(after, 1 if i else 0).dumps()
        if i:
            step.status, step.blocked_by = BLOCKED, 1
    return steps


def run(
    backend: Backend,
    status: str = "succeeded",
    now: float = T0,
    *,
    result: str | None = None,
    error: str | None = None,
) -> str:
    """Reserve the one due job and finish it with ``status``; return its id."""
    [record] = reserve(backend, now=now)
    assert backend.finish(record.id, token(record), status, now, result=result, error=error)
    return record.id


def test_blocked_steps_are_stored_counted_and_never_reserved(backend: Backend) -> None:
    first, second, third = chain_of(3)
    backend.enqueue([first, second, third])
    assert stored(backend, second.id).status == BLOCKED
    assert stored(backend, second.id).blocked_by == 1
    assert backend.counts() == {("default", "queued"): 1, ("default", "blocked"): 2}
    assert [r.id for r in backend.list_jobs(status="blocked")] == [third.id, second.id]
    assert [r.id for r in reserve(backend, limit=10)] == [first.id]
    assert backend.next_eta(None) is None


def test_a_succeeded_step_feeds_and_unblocks_the_next(backend: Backend) -> None:
    first, second, third = chain_of(3)
    backend.enqueue([first, second, third])
    run(backend, result='{"n":1}')
    assert stored(backend, second.id).status == QUEUED
    assert backend.step_inputs(second.id) == {0: '{"n":1}'}
    assert stored(backend, third.id).status == BLOCKED
    assert run(backend, result="2") == second.id
    assert backend.step_inputs(third.id) == {0: "2"}
    assert run(backend) == third.id


def test_a_chord_callback_is_queued_once_all_its_header_succeeded(backend: Backend) -> None:
    header, callback = chord_of(3)
    backend.enqueue([*header, callback])
    leased = reserve(backend, limit=3)
    for n, record in enumerate(reversed(leased)):
        assert stored(backend, callback.id).status == BLOCKED
        assert backend.finish(record.id, token(record), "succeeded", T0, result=f'"r{n}"')
    assert stored(backend, callback.id).status == QUEUED
    assert stored(backend, callback.id).blocked_by == 0
    assert backend.step_inputs(callback.id) == {2: '"r0"', 1: '"r1"', 0: '"r2"'}
    assert [r.id for r in reserve(backend, limit=5)] == [callback.id]


def test_a_step_run_again_does_not_count_twice(backend: Backend) -> None:
    header, callback = chord_of(2)
    header[1].eta = T0 + 100  # not due during the test
    backend.enqueue([*header, callback])
    once = run(backend, result='"first"')
    backend.requeue(once, T0 + 1)
    assert stored(backend, once).status == QUEUED
    assert run(backend, now=T0 + 1, result='"again"') == once
    assert stored(backend, callback.id).blocked_by == 1
    assert backend.step_inputs(callback.id) == {0: '"first"'}


def test_a_failed_step_cancels_every_step_downstream(backend: Backend) -> None:
    first, second, third = chain_of(3)
    header, callback = chord_of(2)
    backend.enqueue([first, second, third, *header, callback])
    assert run(backend, "failed", error="ValueError: no") == first.id
    for later in (second, third):
        record = stored(backend, later.id)
        assert record.status == CANCELLED
        assert record.error == (
            f"UpstreamFailed: upstream step {first.id} (tests.noop) failed; this step never ran"
        )
        assert record.finished_at == T0
    run(backend)  # the chord's first header step: fine
    run(backend, "cancelled")
    assert stored(backend, callback.id).status == CANCELLED
    assert "was cancelled" in (stored(backend, callback.id).error or "")
    assert reserve(backend, limit=10) == []


def test_re_running_the_failed_step_resumes_its_workflow(backend: Backend) -> None:
    first, second, third = chain_of(3)
    backend.enqueue([first, second, third])
    run(backend, result="1")
    run(backend, "failed", error="ValueError: no")
    assert stored(backend, third.id).status == CANCELLED
    requeued = backend.requeue(second.id, T0 + 1)
    assert requeued is not None and requeued.status == QUEUED
    revived = stored(backend, third.id)
    assert (revived.status, revived.error, revived.finished_at) == (BLOCKED, None, None)
    assert run(backend, now=T0 + 1, result="2") == second.id
    assert run(backend, now=T0 + 1) == third.id
    assert backend.step_inputs(third.id) == {0: "2"}


def test_re_running_a_step_still_missing_inputs_blocks_it_again(backend: Backend) -> None:
    header, callback = chord_of(2)
    backend.enqueue([*header, callback])
    run(backend, "failed", error="ValueError: no")
    again = backend.requeue(callback.id, T0 + 1)
    assert again is not None and again.status == BLOCKED
    assert [r.id for r in reserve(backend, limit=5, now=T0 + 1)] == [header[1].id]


def test_cancelling_a_blocked_step_cancels_it_and_its_downstream(backend: Backend) -> None:
    first, second, third = chain_of(3)
    backend.enqueue([first, second, third])
    cancelled = backend.cancel(second.id, T0)
    assert cancelled is not None and cancelled.status == CANCELLED
    assert stored(backend, third.id).status == CANCELLED
    assert run(backend, result="1") == first.id
    assert stored(backend, second.id).status == CANCELLED
    assert reserve(backend, limit=5) == []


def lose_leases(backend: Backend, limit: int = 1) -> float:
    """Let the due steps' workers die with their leases until one more lost fails them.

    Returns the time at which the next reserve fails them.
    """
    now = T0
    for _ in range(3):
        assert len(reserve(backend, limit=limit, now=now)) == limit
        now += LEASE + 1
    return now


def test_a_step_that_keeps_killing_its_worker_cancels_its_downstream(backend: Backend) -> None:
    first, second = chain_of(2)
    backend.enqueue([first, second])
    now = lose_leases(backend)
    assert reserve(backend, now=now) == []
    assert stored(backend, first.id).status == JobStatus.FAILED
    assert stored(backend, second.id).status == CANCELLED


def test_the_reserve_that_gives_up_a_step_cancels_its_whole_downstream(
    backend: Backend,
) -> None:
    header, callback = chord_of(2)
    after = job(status=BLOCKED, blocked_by=1, flow=Flow((), 1).dumps())
    callback.flow = Flow(((after.id, 0),), 2, True).dumps()
    backend.enqueue([*header, callback, after])
    now = lose_leases(backend, limit=2)
    assert reserve(backend, limit=2, now=now) == []  # both fail, for their lost leases
    for step in (callback, after):
        cancelled = stored(backend, step.id)
        assert cancelled.status == CANCELLED
        assert cancelled.finished_at == now
        assert cancelled.error is not None
        assert cancelled.error.startswith("UpstreamFailed: upstream step ")
        assert any(f"{upstream.id} (tests.noop) failed" in cancelled.error for upstream in header)
    counts = backend.counts()
    assert counts[("default", "failed")] == 2 and counts[("default", "cancelled")] == 2
    assert ("default", "blocked") not in counts


#: Per SQL store: a trigger that makes cancelling a step fail, and the statement that drops it.
INTERRUPT = {
    "sqlite": (
        [
            "CREATE TRIGGER errands_test_interrupt BEFORE UPDATE OF status ON errands_jobs "
            "WHEN new.status = 'cancelled' BEGIN SELECT RAISE(ABORT, 'interrupted'); END"
        ],
        "DROP TRIGGER errands_test_interrupt",
    ),
    "postgresql": (
        [
            "CREATE FUNCTION errands_test_interrupt() RETURNS trigger LANGUAGE plpgsql "
            "AS $$ BEGIN RAISE EXCEPTION 'interrupted'; END $$",
            "CREATE TRIGGER errands_test_interrupt BEFORE UPDATE OF status ON errands_jobs "
            "FOR EACH ROW WHEN (new.status = 'cancelled') "
            "EXECUTE FUNCTION errands_test_interrupt()",
        ],
        "DROP TRIGGER errands_test_interrupt ON errands_jobs",
    ),
}


def test_a_give_up_interrupted_before_the_downstream_is_cancelled_is_undone(
    backend: Backend, backend_url: str
) -> None:
    """The reserve that fails a step and the cancelling of its downstream are one transaction.

    A trigger makes the cancelling fail, as a process killed at that point would
    leave it: the step must not stay failed with its downstream blocked for ever.
    """
    scheme = backend_url.partition(":")[0]
    if scheme not in INTERRUPT:
        pytest.skip("memory and Redis have no second statement to interrupt")
    first, second = chain_of(2)
    backend.enqueue([first, second])
    now = lose_leases(backend)
    create, drop = INTERRUPT[scheme]
    with raw_connection(backend_url) as db:
        for statement in create:
            db.execute(statement)
    with pytest.raises(Exception, match="interrupted"):  # the driver's own error
        reserve(backend, now=now)
    assert stored(backend, first.id).status == JobStatus.RUNNING
    assert stored(backend, second.id).status == BLOCKED
    with raw_connection(backend_url) as db:
        db.execute(drop)
    assert reserve(backend, now=now) == []
    assert stored(backend, first.id).status == JobStatus.FAILED
    assert stored(backend, second.id).status == CANCELLED


@contextlib.contextmanager
def raw_connection(url: str) -> Iterator[Any]:
    """An autocommit connection of the store's own driver to the store behind ``url``."""
    if url.startswith("sqlite:"):
        db = sqlite3.connect(url.removeprefix("sqlite:///"), isolation_level=None)
    else:
        db = require("psycopg").connect(url, autocommit=True)
    try:
        yield db
    finally:
        db.close()


def test_inputs_go_with_their_step(backend: Backend) -> None:
    first, second = chain_of(2)
    backend.enqueue([first, second])
    run(backend, result="1")
    backend.cancel(second.id, T0)
    assert backend.purge(status="cancelled") == 1
    assert backend.step_inputs(second.id) == {}
    assert backend.step_inputs("no-such-job") == {}


def test_a_sibling_finishing_after_the_failure_still_counts_when_resumed(
    backend: Backend,
) -> None:
    header, callback = chord_of(2)
    backend.enqueue([*header, callback])
    first, second = reserve(backend, limit=2)
    backend.finish(first.id, token(first), "failed", T0, error="ValueError: no")
    assert stored(backend, callback.id).status == CANCELLED
    backend.finish(second.id, token(second), "succeeded", T0, result='"late"')
    assert stored(backend, callback.id).status == CANCELLED
    backend.requeue(first.id, T0 + 1)
    assert stored(backend, callback.id).status == BLOCKED
    assert run(backend, now=T0 + 1, result='"again"') == first.id
    assert stored(backend, callback.id).status == QUEUED
    inputs = backend.step_inputs(callback.id)
    assert sorted(inputs.values()) == ['"again"', '"late"']


def test_a_step_whose_downstream_was_purged_still_finishes(backend: Backend) -> None:
    first, second = chain_of(2)
    backend.enqueue([first, second])
    backend.cancel(second.id, T0)
    assert backend.purge(status="cancelled") == 1
    assert run(backend, result="1") == first.id
    assert stored(backend, first.id).status == JobStatus.SUCCEEDED
