"""What the dashboard and the CLI need of every store: paused queues, schedules changed at
run time, keyset pages of jobs, and per-minute figures; run against each backend."""

from __future__ import annotations

from typing import Any

import pytest

from flask_errands.backends import Backend
from flask_errands.backends.base import (
    FIGURE_MINUTES,
    TIMING_BOUNDS,
    ScheduleState,
    Timing,
    bucket_of,
)
from tests.backends.test_conformance import LEASE, T0, job, reserve, token
from tests.backends.test_steps import chain_of

MINUTE = int(T0 // 60)


# -- paused queues -----------------------------------------------------------------


def test_a_paused_queue_accepts_jobs_but_no_worker_claims_them(backend: Backend) -> None:
    mail, report = job(queue="emails"), job(queue="reports")
    backend.pause_queue("emails", T0)
    backend.enqueue([mail, report])
    assert backend.paused_queues() == {"emails"}
    assert [j.id for j in reserve(backend, limit=5)] == [report.id]
    assert reserve(backend, queues=["emails"]) == []
    assert backend.next_eta(None) is None  # a worker must not spin on a job it may not take
    assert backend.counts()[("emails", "queued")] == 1
    backend.resume_queue("emails")
    assert backend.paused_queues() == set()
    assert backend.next_eta(None) == T0
    assert [j.id for j in reserve(backend)] == [mail.id]


def test_pausing_is_idempotent_and_an_empty_queue_can_be_paused(backend: Backend) -> None:
    backend.pause_queue("nothing-yet", T0)
    backend.pause_queue("nothing-yet", T0 + 1)
    assert backend.paused_queues() == {"nothing-yet"}
    backend.resume_queue("nothing-yet")
    backend.resume_queue("nothing-yet")
    assert backend.paused_queues() == set()


def test_an_expired_lease_in_a_paused_queue_waits_for_the_resume(backend: Backend) -> None:
    backend.enqueue([job(queue="emails")])
    [first] = reserve(backend)
    backend.pause_queue("emails", T0 + 1)
    assert reserve(backend, now=T0 + LEASE + 1) == []
    backend.resume_queue("emails")
    [again] = reserve(backend, now=T0 + LEASE + 2)
    assert again.id == first.id and again.attempts == 2


# -- schedules changed at run time ----------------------------------------------------


def test_schedule_pause_resume_and_timing_are_kept_together(backend: Backend) -> None:
    assert backend.schedule_states() == {}
    backend.set_schedule_paused("report", True, T0)
    assert backend.schedule_states() == {"report": ScheduleState(paused=True)}
    backend.set_schedule_timing("report", None, "*/5 * * * *", T0 + 10)
    assert backend.schedule_states()["report"] == ScheduleState(True, None, "*/5 * * * *", T0 + 10)
    backend.set_schedule_paused("report", True, T0 + 20)  # still paused: since stays
    assert backend.schedule_states()["report"].since == T0 + 10
    backend.set_schedule_paused("report", False, T0 + 30.25)
    assert backend.schedule_states()["report"] == ScheduleState(
        False, None, "*/5 * * * *", T0 + 30.25
    )
    backend.set_schedule_timing("report", 90.5, None, T0 + 40)
    backend.set_schedule_paused("other", False, T0 + 50)  # never paused: nothing to skip
    assert backend.schedule_states() == {
        "report": ScheduleState(False, 90.5, None, T0 + 40),
        "other": ScheduleState(),
    }


# -- keyset pages ---------------------------------------------------------------------


def test_job_page_walks_every_job_newest_first_with_a_cursor(backend: Backend) -> None:
    jobs = [job(queue="a" if i % 3 else "b", task=f"t{i % 2}") for i in range(23)]
    for start in range(0, 23, 5):
        backend.enqueue(jobs[start : start + 5])
    newest_first = [j.id for j in reversed(jobs)]

    seen, before = [], None
    for _ in range(10):
        page, before = backend.job_page(limit=5, before=before)
        seen += [j.id for j in page]
        if before is None:
            break
    assert seen == newest_first
    assert backend.job_page(limit=23)[1] is None
    assert backend.job_page(limit=22)[1] is not None

    def walk(**filters: str) -> list[str]:
        found, cursor = [], None
        while True:
            page, cursor = backend.job_page(limit=4, before=cursor, **filters)
            found += [j.id for j in page]
            if cursor is None:
                return found

    assert walk(queue="b") == [j.id for j in reversed(jobs) if j.queue == "b"]
    assert walk(task="t1") == [j.id for j in reversed(jobs) if j.task == "t1"]
    assert walk(task="t0", queue="a") == [
        j.id for j in reversed(jobs) if j.task == "t0" and j.queue == "a"
    ]
    [first] = reserve(backend)
    assert walk(status="running") == [first.id]
    assert walk(status="queued", queue="b", task="t1") == [
        j.id for j in reversed(jobs) if (j.queue, j.task) == ("b", "t1") and j.id != first.id
    ]
    assert backend.job_page(status="failed") == ([], None)


# -- figures for the charts -------------------------------------------------------------


def test_finish_counts_each_attempt_in_its_minute(backend: Backend) -> None:
    backend.enqueue([job(queue="q", task="ok") for _ in range(3)] + [job(queue="q", task="bad")])
    first, second, third, bad = reserve(backend, limit=4)
    assert backend.finish(first.id, token(first), "succeeded", T0 + 1)
    assert backend.finish(second.id, token(second), "succeeded", T0 + 2)
    assert not backend.finish(second.id, token(second), "succeeded", T0 + 3)  # not applied
    assert backend.finish(third.id, token(third), "cancelled", T0 + 61)
    assert backend.finish(bad.id, token(bad), "scheduled", T0 + 61, error="E: x", eta=T0 + 62)
    [again] = reserve(backend, now=T0 + 62)
    assert backend.finish(again.id, token(again), "failed", T0 + 62, error="E: x")
    assert backend.finished_counts(MINUTE) == [
        (MINUTE, "q", "ok", "succeeded", 2),
        (MINUTE + 1, "q", "bad", "failed", 1),
        (MINUTE + 1, "q", "bad", "retried", 1),
        (MINUTE + 1, "q", "ok", "cancelled", 1),
    ]
    later = backend.finished_counts(MINUTE)[1:]
    assert backend.finished_counts(MINUTE + 1) == later
    backend.prune(T0 + 60)
    assert backend.finished_counts(1) == later
    assert backend.finished_counts(0) == [(0, "q", "ok", "succeeded", 2), *later]
    backend.prune(T0 + 120)  # folded into the totals again, added up
    assert backend.finished_counts(0) == [
        (0, "q", "bad", "failed", 1),
        (0, "q", "bad", "retried", 1),
        (0, "q", "ok", "cancelled", 1),
        (0, "q", "ok", "succeeded", 2),
    ]


def lose_leases(backend: Backend) -> float:
    """Enqueue a job of task ``killer`` whose workers die twice under it, till it is failed."""
    backend.enqueue([job(queue="q", task="killer")])
    now = T0
    for _ in range(2):
        assert len(backend.reserve(None, 1, "w", LEASE, now, max_lost_leases=2)) == 1
        now += LEASE + 1
    assert backend.reserve(None, 1, "w", LEASE, now, max_lost_leases=2) == []
    return now


def test_a_job_failed_for_lost_leases_is_counted_as_failed(backend: Backend) -> None:
    now = lose_leases(backend)
    assert backend.finished_counts(1) == [(int(now // 60), "q", "killer", "failed", 1)]


def test_depth_is_sampled_once_a_minute_whoever_asks(backend: Backend) -> None:
    assert backend.sample_depth(T0)  # nothing live yet: a sample of zeros
    backend.enqueue([job(queue="a"), job(queue="a"), job(queue="b")])
    backend.enqueue([job(queue="b", status="scheduled", eta=T0 + 600)])
    reserve(backend, queues=["b"])
    assert not backend.sample_depth(T0 + 30)
    assert backend.sample_depth(T0 + 60)
    assert not backend.sample_depth(T0 + 61)
    assert backend.depth_samples(MINUTE) == {
        MINUTE: {},
        MINUTE + 1: {("a", "queued"): 2, ("b", "running"): 1, ("b", "scheduled"): 1},
    }
    assert list(backend.depth_samples(MINUTE + 1)) == [MINUTE + 1]
    backend.prune(T0 + 60)
    assert list(backend.depth_samples(0)) == [MINUTE + 1]


# -- figures for metrics -------------------------------------------------------------------


def test_enqueued_jobs_are_counted_for_good_but_not_those_a_live_unique_job_stands_for(
    backend: Backend,
) -> None:
    backend.enqueue([job(queue="q", task="a"), job(queue="q", task="b")])
    backend.enqueue([job(queue="q", task="a", unique_key="k")])
    backend.enqueue([job(queue="q", task="a", unique_key="k")])  # the live one stands in
    backend.enqueue([job(queue="r", task="a", status="scheduled", eta=T0 + 60)])
    assert backend.fire_tick("nightly", T0, job(queue="q", task="a"), T0)
    assert backend.enqueued_counts() == {("q", "a"): 3, ("q", "b"): 1, ("r", "a"): 1}
    ended = reserve(backend, limit=5, now=T0 + 60)
    for claimed in ended:
        backend.finish(claimed.id, token(claimed), "succeeded", T0 + 61)
    backend.enqueue([job(queue="q", task="b", status="scheduled", eta=T0 + 10**6)])
    assert backend.delete(ended[0].id)
    backend.prune(T0 + 3600)
    backend.purge()  # the scheduled one
    assert backend.counts() == {}
    assert backend.enqueued_counts() == {("q", "a"): 3, ("q", "b"): 2, ("r", "a"): 1}


def test_every_attempt_that_ends_adds_its_duration_and_its_wait(
    backend: Backend,
) -> None:
    late, due = job(queue="q", task="t", eta=T0 - 2.5), job(queue="q", task="t")
    backend.enqueue([late, due, job(queue="q", task="u", eta=T0 - 1000)])
    third, first, second = reserve(backend, limit=3)  # in eta order
    assert (first.id, second.id, third.task) == (late.id, due.id, "u")
    assert backend.finish(first.id, token(first), "succeeded", T0 + 0.05)
    assert not backend.finish(first.id, token(first), "succeeded", T0 + 0.07)  # not applied
    assert backend.finish(second.id, token(second), "scheduled", T0 + 40, eta=T0 + 40)
    assert backend.finish(third.id, token(third), "failed", T0 + 400, error="E: x")
    [again] = reserve(backend, now=T0 + 40.5)  # the retry waited half a second
    assert backend.release(again.id, token(again), T0 + 41)  # no attempt ended: not timed
    bounds = len(TIMING_BOUNDS) + 1

    def histogram(values: dict[int, int], total: float) -> Timing:
        approx: Any = pytest.approx(total)
        return Timing([values.get(i, 0) for i in range(bounds)], approx)

    timings = backend.timings()
    assert set(timings) == {
        ("duration", "q", "t"),
        ("duration", "q", "u"),
        ("wait", "q", "t"),
        ("wait", "q", "u"),
    }
    assert timings["duration", "q", "t"] == histogram({3: 1, 12: 1}, 40.05)
    assert timings["duration", "q", "u"] == histogram({15: 1}, 400.0)
    # Filed as each attempt ends: the released one never did.
    assert timings["wait", "q", "t"] == histogram({0: 1, 8: 1}, 2.5)
    assert timings["wait", "q", "u"] == histogram({15: 1}, 1000.0)
    ended = sum(n for *_, n in backend.finished_counts(0))
    for timing in ("duration", "wait"):
        assert sum(t.count for (name, _, _), t in timings.items() if name == timing) == ended


def test_a_job_given_up_for_lost_leases_has_its_last_attempt_timed(backend: Backend) -> None:
    lose_leases(backend)
    timings = backend.timings()
    assert timings["wait", "q", "killer"].count == 1  # of the attempt given up only
    assert timings["duration", "q", "killer"].count == 1
    assert timings["duration", "q", "killer"].total == pytest.approx(LEASE + 1)


def test_the_bucket_bounds_are_the_same_in_every_store(backend: Backend) -> None:
    """Values just under and just past each bound fall in the buckets ``bucket_of`` says."""
    values = [bound * factor for bound in TIMING_BOUNDS for factor in (0.999, 1.001)]
    backend.enqueue([job(queue="q", task="t", eta=T0 - value) for value in values])
    for claimed in reserve(backend, limit=len(values)):
        backend.finish(claimed.id, token(claimed), "succeeded", T0)
    expected = [0] * (len(TIMING_BOUNDS) + 1)
    for value in values:
        expected[bucket_of(value)] += 1
    assert expected[0] == 1 and expected[-1] == 1
    assert backend.timings()["wait", "q", "t"].buckets == expected


def test_the_finished_counts_since_the_start_survive_folding_and_pruning(
    backend: Backend,
) -> None:
    backend.enqueue([job(queue="q", task="t", eta=T0 + 60 * i) for i in range(3)])
    for i in range(3):
        [claimed] = reserve(backend, now=T0 + 60 * i)
        backend.finish(claimed.id, token(claimed), "succeeded", T0 + 60 * i)
    assert backend.sample_depth(T0 + 60 * (FIGURE_MINUTES + 1))  # folds the oldest minutes
    backend.prune(T0 + 90)
    backend.prune(T0 + 30)  # an earlier cut-off later changes nothing
    assert sum(n for *_, n in backend.finished_counts(0)) == 3


@pytest.mark.parametrize("limit", [1, 3])
def test_job_page_of_an_empty_store(backend: Backend, limit: int) -> None:
    assert backend.job_page(limit=limit) == ([], None)
    assert backend.job_page(queue="x", task="y", limit=limit, before=5) == ([], None)


def counted(backend: Backend) -> dict[tuple[str, str], int]:
    """How many jobs each queue holds per status, counted one by one."""
    found: dict[tuple[str, str], int] = {}
    for record in backend.job_page(limit=1000)[0]:
        key = (record.queue, str(record.status))
        found[key] = found.get(key, 0) + 1
    return found


def test_counts_follow_every_way_a_job_enters_or_leaves_a_state(backend: Backend) -> None:
    def truth() -> dict[tuple[str, str], int]:
        return counted(backend)

    jobs = [job(queue=q) for q in "aabbbc"]
    backend.enqueue(jobs)
    done = reserve(backend, limit=5)
    for n, claimed in enumerate(done):
        outcome = ("succeeded", "failed", "cancelled", "succeeded", "failed")[n]
        backend.finish(claimed.id, token(claimed), outcome, T0 + n)
    assert backend.counts() == truth()
    backend.cancel(jobs[5].id, T0 + 10)  # waiting -> cancelled
    backend.requeue(done[1].id, T0 + 11)  # failed -> queued
    backend.purge(status="succeeded", queue="a")
    assert backend.counts() == truth()
    backend.prune(T0 + 3)  # the jobs finished before T0 + 3
    assert backend.counts() == truth()
    backend.enqueue([job(queue="c", eta=T0 - 1)])
    for claimed in reserve(backend, limit=5, now=T0 + 20):
        backend.finish(claimed.id, token(claimed), "succeeded", T0 + 21)
    backend.purge()
    assert backend.counts() == truth() == {}


def test_counts_follow_workflow_cascades_revivals_and_folded_minutes(backend: Backend) -> None:
    def truth() -> dict[tuple[str, str], int]:
        return counted(backend)

    failing, waiting = chain_of(3), chain_of(3)
    backend.enqueue(failing)
    [first] = reserve(backend)
    backend.finish(first.id, token(first), "failed", T0 + 1, error="E: x")  # cancels two steps
    assert backend.counts() == truth() == {("default", "failed"): 1, ("default", "cancelled"): 2}
    backend.requeue(first.id, T0 + 2)  # revives the two cancelled steps
    assert backend.counts() == truth() == {("default", "queued"): 1, ("default", "blocked"): 2}
    backend.enqueue(waiting)
    backend.cancel(waiting[0].id, T0 + 3)  # a waiting step, and its two steps downstream
    assert backend.counts() == truth()
    assert backend.counts()[("default", "cancelled")] == 3
    for _ in range(3):
        [step] = reserve(backend, now=T0 + 4)
        backend.finish(step.id, token(step), "succeeded", T0 + 4, result="1")
    assert (
        backend.counts() == truth() == {("default", "succeeded"): 3, ("default", "cancelled"): 3}
    )
    ended = sum(n for *_, n in backend.finished_counts(0))
    backend.sample_depth(T0 + 60 * 100_000)  # may fold every minute counted into minute 0
    assert sum(n for *_, n in backend.finished_counts(0)) == ended == 4
    assert backend.counts() == truth()
    backend.purge(status="cancelled")
    backend.prune(T0 + 5)
    assert backend.counts() == truth() == {}
