"""The contract every backend must keep, run unchanged against each of them.

These tests call the Backend interface directly with an injected clock, so
they say exactly what storage must do, independent of the worker threads.
"""

from __future__ import annotations

import subprocess
import threading
import uuid
from typing import Any

import pytest

from flask_errands import DuplicateJob
from flask_errands.backends import Backend, JobRecord
from flask_errands.status import JobStatus
from flask_errands.tasks import MAX_ETA, PRIORITY_RANGE
from tests.conftest import BACKENDS, brokered_too
from tests.helpers import app_command

backend_url = brokered_too(stores=list(BACKENDS))

T0 = 1_800_000_000.0
LEASE = 30.0


def job(**fields: Any) -> JobRecord:
    defaults: dict[str, Any] = {
        "id": uuid.uuid4().hex,
        "task": "tests.noop",
        "payload": '{"args":[],"kwargs":{}}',
        "eta": T0,
        "enqueued_at": T0,
    }
    defaults.update(fields)
    return JobRecord(**defaults)


def reserve(
    backend: Backend, limit: int = 1, now: float = T0, queues: list[str] | None = None
) -> list[JobRecord]:
    return backend.reserve(queues, limit, "worker-a", LEASE, now)


def token(record: JobRecord) -> str:
    """The lease token of a job that ``reserve`` returned."""
    assert record.lease_token is not None, f"job {record.id} was reserved without a lease token"
    return record.lease_token


def stored(backend: Backend, job_id: str) -> JobRecord:
    """The job as the store has it now."""
    record = backend.get(job_id)
    assert record is not None, f"job {job_id} is not in the store"
    return record


def test_enqueue_then_get_returns_every_field(backend: Backend) -> None:
    original = job(
        queue="emails",
        priority=3,
        max_attempts=4,
        retry_delay=2.5,
        timeout=9.0,
        unique_key="k1",
        payload='{"args":[1],"kwargs":{"x":"é"}}',
        trace="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    )
    [stored] = backend.enqueue([original])
    assert stored == original
    assert backend.get(original.id) == original
    assert backend.get("no-such-job") is None


def test_a_batch_keeps_each_job_trace_context_and_the_claim_returns_it(backend: Backend) -> None:
    traced = [job(trace=f"00-{i:032x}-{i:016x}-01") for i in range(1, 3)]
    backend.enqueue([*traced, job()])
    assert [backend.get(j.id).trace for j in traced] == [j.trace for j in traced]  # type: ignore[union-attr]
    assert [j.trace for j in reserve(backend, limit=3)] == [*(j.trace for j in traced), None]


def test_reserve_takes_higher_priority_first_then_enqueue_order(backend: Backend) -> None:
    low1, high, low2, mid = job(), job(priority=9), job(), job(priority=5)
    backend.enqueue([low1, high])
    backend.enqueue([low2, mid])
    order = [reserve(backend)[0].id for _ in range(4)]
    assert order == [high.id, mid.id, low1.id, low2.id]
    assert reserve(backend) == []


def test_reserve_batch_is_ordered_and_limited(backend: Backend) -> None:
    jobs = [job(priority=p) for p in (0, 2, 1, 2)]
    backend.enqueue(jobs)
    got = reserve(backend, limit=3)
    assert [j.id for j in got] == [jobs[1].id, jobs[3].id, jobs[2].id]


def test_reserved_job_is_running_under_a_lease(backend: Backend) -> None:
    backend.enqueue([job()])
    [got] = reserve(backend, now=T0 + 1)
    assert got.status == "running"
    assert got.attempts == 1
    assert got.lease_token
    assert got.worker_id == "worker-a"
    assert got.started_at == T0 + 1
    assert got.lease_expires_at == T0 + 1 + LEASE
    assert stored(backend, got.id).status == "running"


def test_records_hold_their_status_as_a_plain_string(backend: Backend) -> None:
    # A JobStatus member in a record would keep every stored record in the garbage
    # collector's sight; Job.status is where the JobStatus is made.
    [queued] = backend.enqueue([job()])
    [running] = reserve(backend)
    assert backend.finish(running.id, token(running), JobStatus.SUCCEEDED, T0 + 1)
    records = [queued, running, stored(backend, queued.id), *backend.list_jobs()]
    assert [(type(r.status), r.status) for r in records] == [
        (str, "queued"),
        (str, "running"),
        (str, "succeeded"),
        (str, "succeeded"),
    ]


def test_delayed_job_is_not_reserved_before_its_time(backend: Backend) -> None:
    later = job(eta=T0 + 60, status="scheduled")
    backend.enqueue([later])
    assert reserve(backend, now=T0 + 59.9) == []
    assert backend.next_eta(None) == T0 + 60
    assert [j.id for j in reserve(backend, now=T0 + 60)] == [later.id]
    assert backend.next_eta(None) is None


def test_queues_are_served_only_when_asked_for(backend: Backend) -> None:
    email, report = job(queue="emails"), job(queue="reports")
    backend.enqueue([email, report])
    assert [j.id for j in reserve(backend, queues=["reports"])] == [report.id]
    assert reserve(backend, queues=["other"]) == []
    assert backend.next_eta(["other"]) is None
    assert [j.id for j in reserve(backend, queues=["emails", "other"])] == [email.id]


def test_expired_lease_is_redelivered_and_the_old_lease_is_void(backend: Backend) -> None:
    backend.enqueue([job()])
    [first] = reserve(backend)
    assert reserve(backend, now=T0 + LEASE - 1) == []
    [second] = backend.reserve(None, 1, "worker-b", LEASE, T0 + LEASE + 1)
    assert second.id == first.id
    assert second.attempts == 2
    assert second.worker_id == "worker-b"
    assert second.lease_token != first.lease_token
    assert not backend.finish(first.id, token(first), "succeeded", T0 + 40)
    assert backend.finish(second.id, token(second), "succeeded", T0 + 41)
    assert stored(backend, first.id).status == "succeeded"


def test_heartbeat_keeps_the_lease_alive(backend: Backend) -> None:
    backend.enqueue([job()])
    [got] = reserve(backend)
    assert backend.heartbeat({got.id: token(got)}, LEASE, T0 + 20) == set()
    assert reserve(backend, now=T0 + LEASE + 1) == []
    assert stored(backend, got.id).lease_expires_at == T0 + 20 + LEASE
    assert len(reserve(backend, now=T0 + 20 + LEASE + 1)) == 1


def test_heartbeat_with_a_stale_token_does_nothing(backend: Backend) -> None:
    backend.enqueue([job()])
    [got] = reserve(backend)
    assert backend.heartbeat({got.id: "stale"}, LEASE, T0 + 20) == set()
    assert stored(backend, got.id).lease_expires_at == T0 + LEASE


def test_finish_records_success_and_result(backend: Backend) -> None:
    backend.enqueue([job(unique_key="once")])
    [got] = reserve(backend)
    assert backend.finish(got.id, token(got), "succeeded", T0 + 2, result="42")
    done = backend.get(got.id)
    assert done is not None
    assert (done.status, done.result, done.finished_at) == ("succeeded", "42", T0 + 2)
    assert done.lease_token is None
    assert reserve(backend, now=T0 + 100) == []


def test_finish_records_failure_with_traceback(backend: Backend) -> None:
    backend.enqueue([job()])
    [got] = reserve(backend)
    backend.finish(
        got.id,
        token(got),
        "failed",
        T0 + 1,
        error="ValueError: bad",
        traceback="Traceback ...",
    )
    done = backend.get(got.id)
    assert done is not None
    assert (done.status, done.error, done.traceback) == (
        "failed",
        "ValueError: bad",
        "Traceback ...",
    )


def test_retry_later_makes_the_job_due_at_its_eta(backend: Backend) -> None:
    backend.enqueue([job()])
    [got] = reserve(backend)
    backend.finish(got.id, token(got), "scheduled", T0 + 1, error="E: x", eta=T0 + 10)
    waiting = backend.get(got.id)
    assert waiting is not None
    assert (waiting.status, waiting.eta, waiting.error) == ("scheduled", T0 + 10, "E: x")
    assert reserve(backend, now=T0 + 9) == []
    [again] = reserve(backend, now=T0 + 10)
    assert again.attempts == 2


def test_release_puts_the_job_back_without_counting_the_attempt(backend: Backend) -> None:
    backend.enqueue([job()])
    [got] = reserve(backend)
    assert backend.release(got.id, token(got), T0 + 1)
    back = backend.get(got.id)
    assert back is not None
    assert (back.status, back.attempts, back.lease_token) == ("queued", 0, None)
    [again] = reserve(backend, now=T0 + 2)
    assert again.attempts == 1


def test_unique_key_returns_the_live_job(backend: Backend) -> None:
    first = job(unique_key="report-7")
    backend.enqueue([first])
    [dupe] = backend.enqueue([job(unique_key="report-7")])
    assert dupe.id == first.id
    [got] = reserve(backend)
    [while_running] = backend.enqueue([job(unique_key="report-7")])
    assert while_running.id == first.id
    backend.finish(got.id, token(got), "succeeded", T0 + 1)
    fresh = job(unique_key="report-7")
    [after] = backend.enqueue([fresh])
    assert after.id == fresh.id


def test_unique_key_inside_one_batch(backend: Backend) -> None:
    a, b, c = job(unique_key="u"), job(unique_key="u"), job()
    stored = backend.enqueue([a, b, c])
    assert [s.id for s in stored] == [a.id, a.id, c.id]
    assert len(backend.list_jobs()) == 2


def test_cancel_waiting_job_means_it_never_starts(backend: Backend) -> None:
    target, other = job(unique_key="c"), job()
    backend.enqueue([target, other])
    cancelled = backend.cancel(target.id, T0 + 1)
    assert cancelled is not None and cancelled.status == "cancelled"
    assert [j.id for j in reserve(backend, limit=5)] == [other.id]
    assert backend.enqueue([job(unique_key="c")])[0].id != target.id
    assert backend.cancel("no-such-job", T0) is None


def test_cancel_running_job_is_seen_through_heartbeat(backend: Backend) -> None:
    backend.enqueue([job()])
    [got] = reserve(backend)
    after = backend.cancel(got.id, T0 + 1)
    assert after is not None
    assert (after.status, after.cancel_requested) == ("running", True)
    assert backend.heartbeat({got.id: token(got)}, LEASE, T0 + 2) == {got.id}


def test_requeue_runs_a_failed_job_again_under_its_id(backend: Backend) -> None:
    backend.enqueue([job()])
    [got] = reserve(backend)
    backend.finish(got.id, token(got), "failed", T0 + 1, error="E: x", traceback="tb")
    again = backend.requeue(got.id, T0 + 5)
    assert again is not None
    assert (again.id, again.status, again.attempts, again.error) == (got.id, "queued", 0, None)
    assert [j.id for j in reserve(backend, now=T0 + 5)] == [got.id]
    assert backend.requeue("no-such-job", T0) is None


def test_requeue_leaves_a_live_job_alone(backend: Backend) -> None:
    backend.enqueue([job()])
    [got] = reserve(backend)
    again = backend.requeue(got.id, T0 + 1)
    assert again is not None and again.status == "running" and again.attempts == 1


def test_list_and_count_jobs_by_state_and_queue(backend: Backend) -> None:
    a, b, c = job(queue="q1"), job(queue="q1"), job(queue="q2")
    backend.enqueue([a, b, c])
    reserve(backend, queues=["q2"])
    assert [j.id for j in backend.list_jobs()] == [c.id, b.id, a.id]
    assert [j.id for j in backend.list_jobs(status="queued")] == [b.id, a.id]
    assert [j.id for j in backend.list_jobs(queue="q2")] == [c.id]
    assert [j.id for j in backend.list_jobs(limit=1, offset=1)] == [b.id]
    assert backend.counts() == {("q1", "queued"): 2, ("q2", "running"): 1}


def test_a_schedule_tick_fires_once_and_enqueues_its_job(backend: Backend) -> None:
    first = job(task="tests.nightly")
    assert backend.fire_tick("nightly", T0, first, T0)
    assert not backend.fire_tick("nightly", T0, job(task="tests.nightly"), T0 + 1)
    assert [j.id for j in backend.list_jobs()] == [first.id]
    assert backend.last_ticks() == {"nightly": (T0, first.id)}
    nxt = job(task="tests.nightly")
    assert backend.fire_tick("nightly", T0 + 86400, nxt, T0 + 86400)
    assert backend.fire_tick("hourly", T0, job(), T0)
    assert backend.last_ticks()["nightly"] == (T0 + 86400, nxt.id)


def test_a_tick_whose_unique_job_is_live_records_the_tick_only(backend: Backend) -> None:
    running = job(unique_key="schedule:report")
    backend.enqueue([running])
    assert backend.fire_tick("report", T0, job(unique_key="schedule:report"), T0)
    assert backend.last_ticks() == {"report": (T0, running.id)}
    assert len(backend.list_jobs()) == 1


def test_prune_keeps_the_latest_tick_of_each_schedule(backend: Backend) -> None:
    backend.fire_tick("a", T0, job(), T0)
    backend.fire_tick("a", T0 + 60, job(), T0 + 60)
    backend.prune(T0 + 1000)
    assert backend.last_ticks()["a"][0] == T0 + 60
    assert backend.fire_tick("a", T0, job(), T0 + 1001)  # pruned: would fire again if asked


def test_purge_deletes_matching_jobs_but_never_running_ones(backend: Backend) -> None:
    a, b, c, d = job(queue="q1"), job(queue="q1"), job(queue="q2"), job(queue="q1")
    backend.enqueue([a, b, c, d])
    [running] = reserve(backend, queues=["q2"])
    [done] = reserve(backend, queues=["q1"])
    backend.finish(done.id, token(done), "failed", T0 + 100)
    assert backend.purge(status="failed", before=T0 + 50) == 0
    assert backend.purge(status="failed") == 1
    assert backend.purge(queue="q2") == 0
    assert backend.purge(before=T0 + 1) == 2
    assert [j.id for j in backend.list_jobs()] == [running.id]


def test_delete_removes_one_finished_job_and_its_count(backend: Backend) -> None:
    waiting, done, kept = job(), job(), job()
    backend.enqueue([done, kept, waiting])
    for record in reserve(backend, limit=2):
        backend.finish(record.id, token(record), "failed", T0 + 1)
    assert not backend.delete(waiting.id)  # queued: left alone
    assert backend.delete(done.id)
    assert not backend.delete(done.id)
    assert not backend.delete("no-such-job")
    assert backend.get(done.id) is None
    assert backend.counts() == {("default", "queued"): 1, ("default", "failed"): 1}


def test_live_workers_are_listed_until_their_registration_expires(backend: Backend) -> None:
    backend.register_worker("w1", {"host": "h", "pid": 1, "queues": ["a"]}, 10, T0)
    backend.register_worker("w2", {"host": "h", "pid": 2}, 10, T0)
    backend.register_worker("w1", {"host": "h", "pid": 1, "jobs_done": 5}, 10, T0 + 8)
    workers = {w["id"]: w for w in backend.list_workers(T0 + 9)}
    assert workers["w1"] == {"id": "w1", "host": "h", "pid": 1, "jobs_done": 5}
    assert set(workers) == {"w1", "w2"}
    assert [w["id"] for w in backend.list_workers(T0 + 12)] == ["w1"]
    backend.unregister_worker("w1")
    assert backend.list_workers(T0 + 12) == []


def test_prune_deletes_only_old_finished_jobs(backend: Backend) -> None:
    old, recent, waiting = job(), job(), job()
    backend.enqueue([old, recent, waiting])
    for record, at in zip(reserve(backend, limit=2), (T0 + 1, T0 + 100), strict=True):
        backend.finish(record.id, token(record), "succeeded", at)
    assert backend.prune(T0 + 50) == 1
    assert backend.get(old.id) is None
    assert backend.get(recent.id) is not None
    assert backend.get(waiting.id) is not None


def test_watchers_are_told_about_new_work(backend: Backend) -> None:
    woken: list[int] = []
    backend.watch(lambda: woken.append(1))
    backend.enqueue([job()])
    assert woken


# -- errors and limits: the same on every store ------------------------------------


def test_a_duplicate_id_raises_duplicate_job_and_stores_nothing(backend: Backend) -> None:
    first = job()
    backend.enqueue([first])
    with pytest.raises(DuplicateJob, match=first.id):
        backend.enqueue([job(id=first.id, task="tests.other")])
    with pytest.raises(DuplicateJob):
        backend.enqueue([job(id=first.id, unique_key="k")])
    twin = job()
    with pytest.raises(DuplicateJob):
        backend.enqueue([twin, job(id=twin.id)])
    with pytest.raises(DuplicateJob, match=first.id):
        backend.fire_tick("nightly", T0, job(id=first.id), T0)
    assert [j.id for j in backend.list_jobs()] == [first.id]
    assert stored(backend, first.id).task == "tests.noop"
    assert backend.last_ticks() == {}
    assert backend.fire_tick("nightly", T0, job(), T0)  # the failed tick was not recorded


def test_values_at_the_documented_limits_are_kept_exactly(backend: Backend) -> None:
    low, high = PRIORITY_RANGE
    queue = "é\u2603" * 100  # 200 characters, 500 bytes in UTF-8
    first = job(queue=queue, priority=high, unique_key="ü" * 500, eta=T0, max_attempts=1001)
    last = job(queue=queue, priority=low, eta=T0)
    distant = job(queue="distant", eta=MAX_ETA, status="scheduled")
    backend.enqueue([last, first, distant])
    assert backend.get(first.id) == first
    assert backend.get(distant.id) == distant
    claimed = backend.reserve(None, 5, "worker-a", LEASE, T0)
    assert [record.id for record in claimed] == [first.id, last.id]
    assert backend.next_eta(["distant"]) == MAX_ETA


def test_prune_deletes_old_jobs_old_ticks_and_expired_workers(backend: Backend) -> None:
    backend.register_worker("gone", {"pid": 1}, 10, T0)
    backend.register_worker("alive", {"pid": 2}, 1000, T0)
    backend.fire_tick("a", T0, job(), T0)
    backend.fire_tick("a", T0 + 60, job(), T0 + 60)
    backend.fire_tick("a", T0 + 120, job(), T0 + 120)
    backend.prune(T0 + 100)
    # Read with a clock at which both registrations would still hold: only pruning removed one.
    assert [w["id"] for w in backend.list_workers(T0)] == ["alive"]
    assert backend.fire_tick("a", T0, job(), T0 + 200)  # fired before the cut-off: deleted
    assert not backend.fire_tick("a", T0 + 120, job(), T0 + 200)  # the latest is kept


def test_processes_sharing_a_store_never_claim_a_job_twice(
    shared_backend_url: str, tmp_path: object
) -> None:
    backend = __import__("flask_errands.backends", fromlist=["x"]).backend_from_url(
        shared_backend_url, instance_path=str(tmp_path)
    )
    jobs = [job(eta=0.0) for _ in range(2000)]
    for start in range(0, len(jobs), 500):
        backend.enqueue(jobs[start : start + 500])
    procs = [
        subprocess.Popen(
            app_command("claimer", shared_backend_url, str(tmp_path), f"w{n}"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for n in range(4)
    ]
    for proc in procs:  # a start line, so no process finishes before the others begin
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    assert all(proc.returncode == 0 for proc in procs)
    claimed = [line for out in outputs for line in out.split()]
    assert sorted(claimed) == sorted(j.id for j in jobs)
    assert sum(1 for out in outputs if out.strip()) >= 2, "one process did all the work"
    assert backend.counts() == {("default", "succeeded"): 2000}
    backend.close()


@pytest.mark.parametrize("batch", [1, 50])
def test_batch_enqueue_is_all_or_nothing(backend: Backend, batch: int) -> None:
    good = [job() for _ in range(batch)]
    backend.enqueue(good)
    duplicate_id = job(id=good[0].id)
    with pytest.raises(DuplicateJob, match=f"job id already stored: .*{good[0].id}|one of"):
        backend.enqueue([job(), duplicate_id])
    assert len(backend.list_jobs(limit=1000)) == batch


# -- lost leases: a job whose worker dies under it is re-delivered, but not for ever ------

LOST = (
    "WorkerLost: worker {} died while running attempt {} (its lease expired); "
    "the job lost {} leases in a row, so it is not run again"
)


def reclaim(backend: Backend, previous: JobRecord, worker: str, **limits: int) -> list[JobRecord]:
    """Reserve once ``previous``'s lease has expired, as another worker would."""
    now = (previous.lease_expires_at or T0) + 1
    return backend.reserve(None, 1, worker, LEASE, now, **limits)


def test_a_job_that_lost_three_leases_in_a_row_fails_and_frees_its_unique_key(
    backend: Backend,
) -> None:
    [poison] = backend.enqueue([job(max_attempts=3, unique_key="poison")])
    [got] = reserve(backend)
    for attempt, worker in ((2, "worker-b"), (3, "worker-c")):
        [got] = reclaim(backend, got, worker)
        assert (got.id, got.attempts, got.lost_leases) == (poison.id, attempt, attempt - 1)
    other = job()
    backend.enqueue([other])
    now = (got.lease_expires_at or 0) + 1
    assert [j.id for j in backend.reserve(None, 2, "worker-d", LEASE, now)] == [other.id]
    failed = backend.get(poison.id)
    assert failed is not None
    assert (failed.status, failed.attempts, failed.lost_leases) == ("failed", 3, 3)
    assert failed.error == LOST.format("worker-c", 3, 3)
    assert (failed.traceback, failed.lease_token, failed.finished_at) == (None, None, now)
    assert not backend.finish(got.id, token(got), "succeeded", now + 1)
    assert stored(backend, poison.id).status == "failed"
    [fresh] = backend.enqueue([job(unique_key="poison")])
    assert fresh.id != poison.id


def test_max_lost_leases_is_the_callers_setting(backend: Backend) -> None:
    [poison] = backend.enqueue([job()])
    [got] = reserve(backend)
    assert reclaim(backend, got, "worker-b", max_lost_leases=1) == []
    failed = backend.get(poison.id)
    assert failed is not None and failed.status == "failed"
    assert failed.error == LOST.format("worker-a", 1, 1)


def test_finish_or_release_between_lost_leases_starts_the_count_again(
    backend: Backend,
) -> None:
    [poison] = backend.enqueue([job(max_attempts=20)])
    [got] = reserve(backend)
    [got] = reclaim(backend, got, "worker-b")
    [got] = reclaim(backend, got, "worker-c")
    assert got.lost_leases == 2
    now = (got.lease_expires_at or 0) - 1
    assert backend.finish(got.id, token(got), "scheduled", now, error="E: x", eta=now)
    [got] = backend.reserve(None, 1, "worker-d", LEASE, now)
    assert (got.attempts, got.lost_leases) == (4, 0)
    [got] = reclaim(backend, got, "worker-e")
    [got] = reclaim(backend, got, "worker-f")
    now = (got.lease_expires_at or 0) - 1
    assert backend.release(got.id, token(got), now)
    assert stored(backend, poison.id).lost_leases == 0
    [got] = backend.reserve(None, 1, "worker-g", LEASE, now)
    [got] = reclaim(backend, got, "worker-h")
    [got] = reclaim(backend, got, "worker-i")
    assert (got.id, got.status, got.attempts, got.lost_leases) == (poison.id, "running", 8, 2)


def test_a_lost_lease_redelivers_a_job_without_retries(backend: Backend) -> None:
    [once] = backend.enqueue([job(max_attempts=1)])
    [got] = reserve(backend)
    [again] = reclaim(backend, got, "worker-b")
    assert (again.id, again.status, again.attempts, again.lost_leases) == (
        once.id,
        "running",
        2,
        1,
    )
    assert backend.finish(again.id, token(again), "succeeded", T0 + LEASE + 2)
    done = backend.get(once.id)
    assert done is not None and (done.status, done.error, done.lost_leases) == (
        "succeeded",
        None,
        0,
    )


def test_requeue_of_a_job_failed_for_lost_leases_starts_the_count_again(
    backend: Backend,
) -> None:
    [poison] = backend.enqueue([job()])
    [got] = reserve(backend)
    assert reclaim(backend, got, "worker-b", max_lost_leases=1) == []
    requeued = backend.requeue(poison.id, T0 + 100)
    assert requeued is not None
    assert (requeued.status, requeued.attempts, requeued.lost_leases) == ("queued", 0, 0)
    [got] = backend.reserve(None, 1, "worker-c", LEASE, T0 + 100)
    [again] = reclaim(backend, got, "worker-d", max_lost_leases=2)
    assert (again.id, again.attempts, again.lost_leases) == (poison.id, 2, 1)


def test_a_delayed_urgent_job_does_not_hide_a_due_one_behind_it(backend: Backend) -> None:
    later = job(priority=5, eta=T0 + 3600, status="scheduled")
    now = job(priority=0, eta=T0)
    backend.enqueue([later, now])
    [first] = backend.reserve(None, 5, "worker-a", LEASE, T0)
    assert first.id == now.id
    assert backend.finish(first.id, token(first), JobStatus.SUCCEEDED, T0 + 1)
    assert backend.next_eta(None) == T0 + 3600
    assert [r.id for r in backend.reserve(None, 5, "worker-a", LEASE, T0 + 3600)] == [later.id]


def test_a_batch_is_stored_whole_in_order_with_every_field(backend: Backend) -> None:
    batch = [
        job(queue="a", priority=2, max_attempts=3, retry_delay=5, timeout=7, eta=T0 - 1),
        job(queue="b", timeout=None, retry_delay=0.5, payload='{"args":[1],"kwargs":{}}'),
        job(queue="a", eta=T0 + 60, status=JobStatus.SCHEDULED),
        job(queue="a"),
    ]
    stored_batch = backend.enqueue(batch)
    assert [record.id for record in stored_batch] == [record.id for record in batch]
    for original in batch:
        assert stored(backend, original.id) == original
    claimed = reserve(backend, limit=10)
    assert [record.id for record in claimed] == [batch[0].id, batch[1].id, batch[3].id]


def test_outcomes_recorded_by_many_threads_at_once_each_apply_once(backend: Backend) -> None:
    jobs = [job(queue=f"q{n % 3}", task=f"t{n % 2}") for n in range(24)]
    backend.enqueue(jobs)
    claimed = reserve(backend, limit=24)
    outcomes = ["succeeded", "failed", "scheduled", "cancelled"]
    start = threading.Barrier(len(claimed))
    applied: dict[str, bool] = {}

    def finish(n: int, record: JobRecord) -> None:
        start.wait()
        status = outcomes[n % 4]
        eta = T0 + 30 if status == "scheduled" else None
        lease = "stale" if n == 5 else token(record)
        applied[record.id] = backend.finish(record.id, lease, status, T0 + 1, eta=eta)

    threads = [
        threading.Thread(target=finish, args=(n, record)) for n, record in enumerate(claimed)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for n, record in enumerate(claimed):
        now = stored(backend, record.id)
        if n == 5:
            assert not applied[record.id] and now.status == "running"
            continue
        assert applied[record.id], f"outcome {n} was not applied"
        assert now.status == outcomes[n % 4] and now.lease_token is None
    counts = backend.counts()
    assert sum(n for (_, status), n in counts.items() if status == "succeeded") == 6
    assert sum(n for (_, status), n in counts.items() if status == "failed") == 5
    assert sum(n for (_, status), n in counts.items() if status == "scheduled") == 6
    assert sum(figure[4] for figure in backend.finished_counts(0)) == 23
