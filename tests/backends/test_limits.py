"""Rate and concurrency limits as every store enforces them in ``reserve``, atomically."""

from __future__ import annotations

import threading
from collections import Counter

import pytest

from flask_errands.backends import Backend, JobRecord, backend_from_url
from flask_errands.limits import Limit, decode, encode
from flask_errands.status import JobStatus
from tests.backends.test_conformance import LEASE, T0, job, stored, token


def limited(
    task: str = "tests.export", *, rate: str | None = None, conc: int | None = None
) -> JobRecord:
    """A job of ``task`` carrying these limits, as ``task.delay()`` makes it."""
    limits = encode([Limit.of(f"task:{task}", rate, conc)])
    return job(task=task, limits=limits)


def check_upgraded_limits(url: str, running: JobRecord, limits: str | None) -> None:
    """After an upgrade: a concurrency 1 limit's one slot is still taken by ``running``, and
    the rate limit's starts carry on from those logged before (one at 1.0, one at 1.5)."""
    assert limits is not None
    [limit] = decode(limits)
    upgraded = backend_from_url(url, instance_path="")
    upgraded.expect_limits()
    try:
        assert upgraded.reserve(None, 1, "w", 30, 2.0) == []
        assert upgraded.finish(running.id, token(running), "succeeded", 3.0)
        assert len(upgraded.reserve(None, 1, "w", 30, 4.0)) == 1
        assert upgraded.limit_usage([limit], 5.0) == {limit.key: (1, 3)}
    finally:
        upgraded.close()


@pytest.fixture
def store(backend: Backend) -> Backend:
    backend.expect_limits()  # as init_app does for an app that declares limits
    return backend


def test_concurrency_holds_across_many_threads_claiming_at_once(store: Backend) -> None:
    store.enqueue([limited(conc=2) for _ in range(30)])
    claimed: list[str] = []
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def claim(worker: str) -> None:
        try:
            start.wait()
            for _ in range(5):
                claimed.extend(r.id for r in store.reserve(None, 4, worker, LEASE, T0))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(claimed) == 2
    running = [r for r in store.list_jobs(status="running", limit=100)]
    assert len(running) == 2


def test_a_finished_job_frees_its_slot(store: Backend) -> None:
    first, second = limited(conc=1), limited(conc=1)
    store.enqueue([first, second])
    [got] = store.reserve(None, 5, "w", LEASE, T0)
    assert store.reserve(None, 5, "w", LEASE, T0 + 1) == []
    assert store.finish(got.id, token(got), "succeeded", T0 + 2)
    [then] = store.reserve(None, 5, "w", LEASE, T0 + 3)
    assert {got.id, then.id} == {first.id, second.id}


def test_an_expired_lease_gives_its_slot_back(store: Backend) -> None:
    first, second = limited(conc=1), limited(conc=1)
    store.enqueue([first, second])
    [got] = store.reserve(None, 1, "dead", LEASE, T0)
    assert store.reserve(None, 1, "w", LEASE, T0 + LEASE - 1) == []
    # The dead worker's lease lapses: its job and the other share the one slot again.
    [after] = store.reserve(None, 5, "w", LEASE, T0 + LEASE + 1)
    assert stored(store, after.id).status == JobStatus.RUNNING
    assert len(store.list_jobs(status="running", limit=10)) == 1
    assert after.id in (got.id, first.id, second.id)


def test_a_held_job_stays_queued_with_no_attempt_and_others_run_meanwhile(
    store: Backend,
) -> None:
    held = [limited(conc=1) for _ in range(5)]
    free = job(task="tests.other")
    store.enqueue([*held, free])
    got = store.reserve(None, 10, "w", LEASE, T0)
    assert sorted(r.id for r in got) == sorted([held[0].id, free.id])
    for record in held[1:]:
        now = stored(store, record.id)
        assert (now.status, now.attempts) == (JobStatus.QUEUED, 0)


def test_rate_limit_allows_n_starts_in_any_window(store: Backend) -> None:
    store.enqueue([limited(rate="3/s") for _ in range(10)])
    starts: list[float] = []
    now = T0
    while now < T0 + 4:
        starts += [now for _ in store.reserve(None, 10, "w", LEASE, now)]
        now += 0.1
    assert len(starts) >= 9
    for t in starts:
        assert sum(1 for s in starts if t <= s < t + 1.0) <= 3


def test_held_back_work_is_reported_as_due_when_the_limit_frees(store: Backend) -> None:
    store.enqueue([limited(rate="1/m") for _ in range(2)])
    assert len(store.reserve(None, 5, "w", LEASE, T0)) == 1
    assert store.reserve(None, 5, "w", LEASE, T0 + 1) == []
    assert store.next_eta(None) == pytest.approx(T0 + 60, abs=0.01)


def test_queue_limits_count_every_task_of_the_queue(store: Backend) -> None:
    queue = encode([Limit.of("queue:emails", None, 2)])
    store.enqueue([job(task=f"tests.t{i}", queue="emails", limits=queue) for i in range(5)])
    got = store.reserve(None, 5, "w", LEASE, T0)
    assert len(got) == 2
    usage = store.limit_usage([Limit("queue:emails", concurrency=2)], T0)
    assert usage == {"queue:emails": (2, 0)}


def test_limit_usage_counts_running_jobs_and_recent_starts(store: Backend) -> None:
    store.enqueue([limited(rate="10/m", conc=5) for _ in range(3)])
    got = store.reserve(None, 2, "w", LEASE, T0)
    store.finish(got[0].id, token(got[0]), "succeeded", T0 + 1)
    limit = Limit("task:tests.export", 10, 60.0, 5)
    assert store.limit_usage([limit], T0 + 2) == {"task:tests.export": (1, 2)}
    assert store.limit_usage([limit], T0 + 61) == {"task:tests.export": (0, 0)}


def test_a_store_that_was_not_told_discovers_limited_jobs(backend: Backend) -> None:
    """A worker process that does not know the task still enforces the job's limits."""
    backend.enqueue([limited(conc=1) for _ in range(3)])
    tally: Counter[str] = Counter()
    for step in range(3):
        got = backend.reserve(None, 5, "w", LEASE, T0 + step)
        tally["claimed"] += len(got)
        backend.next_eta(None)
    assert tally["claimed"] == 1


def test_slots_stay_right_across_lease_loss_retries_release_and_cancel(store: Backend) -> None:
    """However a running job stops running, its slot comes back once, never twice."""
    jobs = [limited(conc=2) for _ in range(6)]
    store.enqueue(jobs)
    first, second = store.reserve(None, 5, "w1", LEASE, T0)
    store.heartbeat({second.id: token(second)}, LEASE, T0 + LEASE - 1)
    # The first worker dies: another takes its job over when the lease lapses, in one slot.
    [again] = store.reserve(None, 5, "w2", LEASE, T0 + LEASE + 1)
    assert again.id == first.id
    now = T0 + LEASE + 2
    assert not store.finish(first.id, token(first), "succeeded", now)  # its lease was lost
    assert store.reserve(None, 1, "w2", LEASE, now) == []
    # A retry frees the slot, as does a release; the job retried waits for its eta.
    assert store.finish(second.id, token(second), "scheduled", now, eta=now + 1000)
    [third] = store.reserve(None, 1, "w2", LEASE, now)
    assert store.release(third.id, token(third), now)
    [fourth] = store.reserve(None, 1, "w2", LEASE, now)
    assert store.reserve(None, 1, "w2", LEASE, now) == []
    # Lapsing past max_lost_leases fails the job and frees its slot; a cancel frees none.
    later = now + LEASE + 1
    store.heartbeat({fourth.id: token(fourth)}, LEASE * 3, later - 1)
    [fifth] = store.reserve(None, 5, "w3", LEASE, later, max_lost_leases=1)
    assert stored(store, again.id).status == JobStatus.FAILED
    waiting = [j.id for j in jobs if stored(store, j.id).status == JobStatus.QUEUED]
    assert store.cancel(waiting[0], later) is not None
    assert store.reserve(None, 1, "w3", LEASE, later) == []
    assert store.finish(fourth.id, token(fourth), "succeeded", later)
    assert store.finish(fifth.id, token(fifth), "failed", later)
    store.prune(finished_before=later + 1)
    # Nothing runs any more: both slots are free, and still only two.
    fresh = [limited(conc=2) for _ in range(3)]
    store.enqueue(fresh)
    # One at a time, as a worker with one free thread claims: each claim weighs one slot.
    got = [store.reserve(None, 1, f"w{i}", LEASE, later + 2) for i in range(3)]
    assert [len(claimed) for claimed in got] == [1, 1, 0]


def test_a_claim_of_some_queues_weighs_their_limited_jobs(store: Backend) -> None:
    queue = encode([Limit.of("queue:emails", None, 2)])
    store.enqueue([job(queue="emails", limits=queue) for _ in range(3)])
    store.enqueue([limited(conc=1)])  # in the default queue, which this claim leaves alone
    got = store.reserve(["emails"], 5, "w", LEASE, T0)
    assert [record.queue for record in got] == ["emails", "emails"]
    assert store.reserve(["emails"], 1, "w", LEASE, T0) == []
