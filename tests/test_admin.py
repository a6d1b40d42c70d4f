"""The admin API on every backend: what the CLI and the dashboard do, from Python."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator

import pytest
from flask import Flask

from flask_errands import (
    Admin,
    Errands,
    JobNotFound,
    JobStatus,
    UnknownTask,
    WorkerInfo,
)
from flask_errands.backends import Backend, backend_from_url
from flask_errands.status import STATUSES
from tests.helpers import wait_until

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
