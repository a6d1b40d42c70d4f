"""The admin API on every backend: what the CLI and the dashboard do, from Python."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Iterator

import pytest
from flask import Flask

from flask_errands import (
    Admin,
    Errands,
    JobNotFound,
    JobStatus,
    ScheduleNotFound,
    UnknownTask,
    WorkerInfo,
)
from flask_errands.backends import Backend, backend_from_url
from flask_errands.status import STATUSES
from tests.helpers import away_from_a_minute_boundary, wait_until

AppFactory = Callable[..., tuple[Flask, Errands]]


@pytest.fixture
def admin_app(backend_url: str, make_app: AppFactory) -> Iterator[tuple[Flask, Errands, Admin]]:
    app, errands = make_app(ERRANDS_URL=backend_url, ERRANDS_EMBEDDED_WORKER=False)

    @errands.task(name="ok")
    def ok(n: int = 0) -> int:
        return n

    @errands.task(name="broken")
    def broken() -> None:
        raise ValueError("nope")

    with app.app_context():
        yield app, errands, errands.admin


def test_retry_reruns_a_failed_job_under_its_id(admin_app: tuple[Flask, Errands, Admin]) -> None:
    _, errands, admin = admin_app
    job = admin.enqueue("broken")
    errands.drain()
    assert admin.job(job.id).status is JobStatus.FAILED
    again = admin.retry(job.id)
    assert (again.id, again.status, again.attempts, again.error) == (
        job.id,
        JobStatus.QUEUED,
        0,
        None,
    )
    with pytest.raises(ValueError, match="only finished jobs"):
        admin.retry(job.id)
    with pytest.raises(JobNotFound):
        admin.retry("no-such-job")


def test_retry_failed_reruns_every_failed_job_of_a_queue(
    admin_app: tuple[Flask, Errands, Admin],
) -> None:
    _, errands, admin = admin_app
    for queue in ("a", "a", "b"):
        admin.enqueue("broken", queue=queue)
    errands.drain()
    assert admin.retry_failed(queue="a") == 2
    assert admin.counts()["a"][JobStatus.QUEUED] == 2
    assert admin.counts()["b"][JobStatus.FAILED] == 1
    assert admin.retry_failed() == 1


def test_cancel_and_its_refusals(admin_app: tuple[Flask, Errands, Admin]) -> None:
    _, _, admin = admin_app
    job = admin.enqueue("ok")
    assert admin.cancel(job.id).status is JobStatus.CANCELLED
    with pytest.raises(ValueError, match="already cancelled"):
        admin.cancel(job.id)
    with pytest.raises(JobNotFound):
        admin.cancel("no-such-job")


def test_purge_by_state_queue_and_age(admin_app: tuple[Flask, Errands, Admin]) -> None:
    _, errands, admin = admin_app
    admin.enqueue("ok", queue="a")
    admin.enqueue("ok", queue="b")
    admin.enqueue("broken", queue="a")
    waiting = admin.enqueue("ok", queue="a", delay=3600)
    errands.drain()
    assert admin.purge(older_than=dt.timedelta(days=1)) == 0  # all finished just now
    assert admin.purge([JobStatus.SUCCEEDED], queue="a") == 1
    assert admin.purge() == 2  # the other finished ones: b's success and a's failure
    assert [job.id for job in admin.jobs()] == [waiting.id]
    with pytest.raises(ValueError, match="running jobs cannot be purged"):
        admin.purge(["running"])


def test_counts_list_every_state_of_every_queue(
    admin_app: tuple[Flask, Errands, Admin],
) -> None:
    _, _, admin = admin_app
    assert admin.counts() == {}
    admin.enqueue("ok")
    admin.enqueue("ok", queue="later", delay=60)
    counts = admin.counts()
    assert list(counts) == ["default", "later"]
    assert counts["default"] == {status: int(status is JobStatus.QUEUED) for status in STATUSES}
    assert counts["later"][JobStatus.SCHEDULED] == 1
    assert admin.due() == 2 and admin.due(["later"]) == 1


def test_enqueue_by_name_raises_unknown_task_with_close_names(
    admin_app: tuple[Flask, Errands, Admin],
) -> None:
    _, _, admin = admin_app
    job = admin.enqueue("ok", [5], priority=3)
    assert (job.task, job.args, job.priority) == ("ok", (5,), 3)
    with pytest.raises(UnknownTask, match="no task named 'okay'"):
        admin.enqueue("okay")


def test_workers_and_jobs_pages(admin_app: tuple[Flask, Errands, Admin]) -> None:
    _, errands, admin = admin_app
    assert admin.workers() == []
    errands.start_worker()
    try:
        (worker,) = wait_until(admin.workers, "the embedded worker to register")
        assert isinstance(worker, WorkerInfo) and worker.kind == "embedded"
        assert worker.to_dict()["id"] == worker.id
    finally:
        errands.stop_worker(grace=5)
    first = admin.enqueue("ok", [1], delay=60)
    second = admin.enqueue("ok", [2], delay=60)
    assert [job.id for job in admin.jobs("scheduled", limit=1)] == [second.id]
    assert [job.id for job in admin.jobs(limit=1, offset=1)] == [first.id]


def test_a_store_object_can_be_handed_in_instead_of_a_url(
    backend_url: str, tmp_path: object
) -> None:
    store: Backend = backend_from_url(backend_url, instance_path=str(tmp_path))
    app = Flask("handed", instance_path=str(tmp_path))
    app.config.update(ERRANDS_URL="redis://127.0.0.1:1/0", ERRANDS_EMBEDDED_WORKER=False)
    errands = Errands(app, backend=store)

    @errands.task(name="ok")
    def ok() -> str:
        return "ok"

    try:
        with app.app_context():
            assert errands.backend is store and errands.settings.url == store.url
            job = ok.delay()
            assert store.get(job.id) is not None
            assert errands.drain() == 1 and job.result() == "ok"
    finally:
        store.close()


# -- what the dashboard shows and does ------------------------------------------------


def test_a_paused_queue_keeps_its_jobs_until_resumed(
    admin_app: tuple[Flask, Errands, Admin],
) -> None:
    _, errands, admin = admin_app
    admin.pause_queue("emails")
    admin.pause_queue("empty")
    held = admin.enqueue("ok", queue="emails")
    ran = admin.enqueue("ok", queue="reports")
    assert errands.drain() == 1
    assert (admin.job(held.id).status, admin.job(ran.id).status) == ("queued", "succeeded")
    queues = {info.name: info for info in admin.queues()}
    assert list(queues) == ["emails", "empty", "reports"]
    assert [info.paused for info in queues.values()] == [True, True, False]
    assert queues["emails"].counts[JobStatus.QUEUED] == 1
    assert queues["empty"].to_dict() == {
        "name": "empty",
        "paused": True,
        "counts": dict.fromkeys([s.value for s in STATUSES], 0),
    }
    admin.resume_queue("emails")
    assert errands.drain() == 1
    assert admin.job(held.id).status == "succeeded"
    with pytest.raises(ValueError, match="queue must be 1 to"):
        admin.pause_queue("")


def test_job_page_follows_cursors_and_refuses_bad_values(
    admin_app: tuple[Flask, Errands, Admin],
) -> None:
    _, errands, admin = admin_app
    made = [
        admin.enqueue("ok", [n], queue="q") if n % 2 else admin.enqueue("broken", queue="q")
        for n in range(7)
    ]
    errands.drain()
    seen, cursor = [], None
    while True:
        page = admin.job_page(limit=3, cursor=cursor)
        seen += [job.id for job in page.jobs]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
        assert cursor.replace("-", "").replace("_", "").isalnum()  # URL-safe as it is
    assert seen == [job.id for job in reversed(made)]
    failed = admin.job_page("failed", "q", "broken", limit=500)
    assert [job.id for job in failed.jobs] == [job.id for job in reversed(made[::2])]
    assert failed.next_cursor is None
    data = admin.job_page(task="ok", limit=1).to_dict()
    assert data["jobs"][0]["id"] == made[5].id and data["next_cursor"]
    assert data["jobs"][0]["worker_id"]  # the worker that ran it
    for bad in [{"limit": 0}, {"limit": 501}, {"status": "done"}, {"cursor": "x"}]:
        with pytest.raises(ValueError):
            admin.job_page(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="malformed cursor"):
        admin.job_page(cursor="!" * 11)


def test_stats_give_an_hour_of_throughput_and_depth_per_minute(
    admin_app: tuple[Flask, Errands, Admin],
) -> None:
    _, errands, admin = admin_app
    away_from_a_minute_boundary()
    admin.enqueue("ok")
    admin.enqueue("broken")
    admin.enqueue("ok", delay=600)
    before = time.time()
    errands.drain()
    stats = admin.stats()
    assert len(stats.minutes) == 60
    assert stats.minutes[-1] == dt.datetime.fromtimestamp(before // 60 * 60, dt.timezone.utc)
    assert sum(stats.succeeded) == 1 and sum(stats.failed) == 1
    assert (stats.queued[-1], stats.scheduled[-1], stats.running[-1]) == (0, 1, 0)
    assert stats.queued[0] is None  # nobody sampled that minute
    data = stats.to_dict()
    assert data["minutes"][-1].endswith("+00:00") and data["queued"][0] is None


def test_schedules_paused_run_and_changed_at_run_time(
    admin_app: tuple[Flask, Errands, Admin],
) -> None:
    _, errands, admin = admin_app

    @errands.periodic(cron="0 3 * * *", timezone="Europe/Paris", name="nightly")
    def nightly() -> str:
        return "done"

    admin.pause_schedule("nightly")
    assert admin.schedule("nightly").paused
    job = admin.run_schedule("nightly")
    assert errands.drain() == 1 and job.result() == "done"
    assert admin.schedule("nightly").last_job == job
    info = admin.change_schedule("nightly", cron="30 4 * * 1")
    assert (info.schedule.cron, info.next_run.hour, info.next_run.minute) == ("30 4 * * 1", 4, 30)
    assert info.next_run.weekday() == 0 and str(info.next_run.tzinfo) == "Europe/Paris"
    assert info.paused and info.to_dict()["timezone"] == "Europe/Paris"
    every = admin.change_schedule("nightly", every=dt.timedelta(minutes=5))
    assert every.to_dict()["every"] == 300.0 and every.to_dict()["cron"] is None
    admin.resume_schedule("nightly")
    assert not admin.schedules()[0].paused
    with pytest.raises(ValueError, match="hour must be 0-23"):
        admin.change_schedule("nightly", cron="0 25 * * *")
    with pytest.raises(ValueError, match="exactly one"):
        admin.change_schedule("nightly", every=60, cron="* * * * *")
    with pytest.raises(ValueError, match="positive"):
        admin.change_schedule("nightly", every=-1)
    for action in (admin.pause_schedule, admin.resume_schedule, admin.run_schedule):
        with pytest.raises(ScheduleNotFound, match="no schedule named 'nope'"):
            action("nope")
    assert admin.schedule("nightly").schedule.every == 300.0  # bad changes changed nothing


def test_workers_say_when_they_were_last_seen(admin_app: tuple[Flask, Errands, Admin]) -> None:
    _, errands, admin = admin_app
    errands.start_worker()
    try:
        (worker,) = wait_until(admin.workers, "the embedded worker to register")
    finally:
        errands.stop_worker(grace=5)
    assert worker.last_seen is not None
    assert abs(worker.last_seen.timestamp() - time.time()) < 60
    assert worker.to_dict()["last_seen"] == worker.last_seen.isoformat()
