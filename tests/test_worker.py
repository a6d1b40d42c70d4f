"""The worker threads as a user relies on them: concurrency, leases, stopping, pruning.

Tests ask for ``backend_url`` before ``make_app``: fixtures are torn down in
reverse, so each store outlives the worker threads using it.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask

from flask_errands import Errands, JobFailed, JobStatus, current_job
from tests.conftest import brokered_too
from tests.helpers import wait_until

# RabbitMQ with PostgreSQL as the store runs here with the slow tests only: the
# conformance suite and tests/test_rabbitmq.py cover that pair in the default run.
backend_url = brokered_too(slow=("rabbitmq+postgres",))
shared_backend_url = brokered_too(shared=True, slow=("rabbitmq+postgres",))

AppFactory = Callable[..., tuple[Flask, Errands]]


def test_jobs_run_side_by_side_up_to_the_concurrency(
    backend_url: str, make_app: AppFactory
) -> None:
    app, errands = make_app(ERRANDS_URL=backend_url, ERRANDS_CONCURRENCY=3)
    lock = threading.Lock()
    running: list[int] = []
    most = [0]
    barrier = threading.Barrier(3, timeout=30)

    @errands.task
    def work(n: int) -> int:
        with lock:
            running.append(n)
            most[0] = max(most[0], len(running))
        try:
            if n < 3:
                barrier.wait()  # only passes if three jobs run at the same time
            else:
                time.sleep(0.05)
        finally:
            with lock:
                running.remove(n)
        return n

    with app.app_context():
        errands.start_worker()
        jobs = work.delay_many([(n,) for n in range(6)])
        assert [job.result(timeout=30) for job in jobs] == list(range(6))
    assert most[0] == 3


def test_a_job_longer_than_its_lease_runs_once_while_its_worker_heartbeats(
    shared_backend_url: str, make_app: AppFactory
) -> None:
    runs: list[str] = []
    apps = [make_app(ERRANDS_URL=shared_backend_url, ERRANDS_LEASE_SECONDS=1.5) for _ in range(2)]
    for _, errands in apps:

        @errands.task(name="slow.export")
        def export() -> int:
            runs.append(current_job.id)
            time.sleep(2.0)  # well past the 1.5 s lease
            return current_job.attempt

    for app, errands in apps:
        with app.app_context():
            errands.start_worker()
    app, errands = apps[0]
    with app.app_context():
        job = errands.tasks["slow.export"].delay()
        assert job.result(timeout=30) == 1
    assert runs == [job.id]
    assert job.attempts == 1


def test_a_job_enqueued_by_another_app_on_the_same_store_is_picked_up(
    shared_backend_url: str, make_app: AppFactory
) -> None:
    web, web_errands = make_app(ERRANDS_URL=shared_backend_url, ERRANDS_EMBEDDED_WORKER=False)
    worker, worker_errands = make_app(ERRANDS_URL=shared_backend_url)
    for errands in (web_errands, worker_errands):

        @errands.task(name="shared.square")
        def square(n: int) -> int:
            return n * n

    with worker.app_context():
        worker_errands.start_worker()
    with web.app_context():
        jobs = web_errands.tasks["shared.square"].delay_many([(n,) for n in range(10)])
        assert [job.result(timeout=30) for job in jobs] == [n * n for n in range(10)]


def test_stopping_lets_running_jobs_finish_within_the_grace(
    backend_url: str, make_app: AppFactory
) -> None:
    app, errands = make_app(ERRANDS_URL=backend_url)
    started = threading.Event()

    @errands.task
    def slow() -> str:
        started.set()
        time.sleep(0.3)
        return "finished"

    with app.app_context():
        errands.start_worker()
        job = slow.delay()
        assert started.wait(30)
        errands.stop_worker(grace=30)
        assert job.refresh().status is JobStatus.SUCCEEDED
        assert job.result() == "finished"


def test_a_job_still_running_after_the_grace_goes_back_to_its_queue(
    backend_url: str, make_app: AppFactory
) -> None:
    app, errands = make_app(ERRANDS_URL=backend_url)
    started = threading.Event()
    finish = threading.Event()
    runs: list[int] = []

    @errands.task
    def stubborn() -> str:
        runs.append(current_job.attempt)
        started.set()
        while not finish.is_set():
            time.sleep(0.01)
        return "done"

    with app.app_context():
        errands.start_worker()
        job = stubborn.delay()
        assert started.wait(30)
        errands.stop_worker(grace=0.1)
        assert job.refresh().status is JobStatus.QUEUED
        assert job.attempts == 0  # the interrupted attempt does not count
        finish.set()
        errands.start_worker()
        assert job.result(timeout=30) == "done"
    assert runs == [1, 1]
    assert job.attempts == 1


def test_a_task_calling_sys_exit_fails_its_job_and_the_worker_goes_on(
    backend_url: str, make_app: AppFactory
) -> None:
    app, errands = make_app(ERRANDS_URL=backend_url, ERRANDS_CONCURRENCY=1)

    @errands.task
    def legacy_script() -> None:
        sys.exit(3)

    @errands.task
    def after() -> str:
        return "still working"

    with app.app_context():
        errands.start_worker()
        job = legacy_script.delay()
        with pytest.raises(JobFailed) as caught:
            job.result(timeout=30)
        assert after.delay().result(timeout=30) == "still working"
    assert caught.value.exc_type == "SystemExit"
    assert caught.value.message == "3"


def test_finished_jobs_are_pruned_after_the_result_ttl(
    backend_url: str, make_app: AppFactory
) -> None:
    app, errands = make_app(ERRANDS_URL=backend_url, ERRANDS_RESULT_TTL=0.2)

    @errands.task
    def noop() -> None:
        pass

    with app.app_context():
        errands.start_worker()
        job = noop.delay()
        job.result(timeout=30)
        waiting = noop.options(delay=3600).delay()
        assert errands.job(job.id) is not None
        assert job.finished_at is not None
        ttl_passed = job.finished_at.timestamp() + 0.2
        wait_until(lambda: time.time() > ttl_passed, "the result TTL to pass")
        errands.stop_worker()
        errands.start_worker()  # a worker prunes when it starts, then every minute
        wait_until(lambda: errands.job(job.id) is None, "the finished job to be pruned")
        assert errands.job(waiting.id) is not None  # jobs still to run are never pruned


def test_start_worker_runs_whatever_the_config_says(
    backend_url: str, make_app: AppFactory
) -> None:
    app, errands = make_app(ERRANDS_URL=backend_url, ERRANDS_EMBEDDED_WORKER=False)

    @errands.task
    def noop() -> str:
        return "ran"

    with app.app_context():
        job = noop.delay()
        worker = errands.start_worker()
        assert errands.start_worker() is worker  # once per process
        assert job.result(timeout=30) == "ran"
        errands.stop_worker()
        assert not worker.running


def test_a_signal_receiver_that_raises_does_not_lose_the_job(
    backend_url: str, make_app: AppFactory
) -> None:
    from flask_errands import job_started

    app, errands = make_app(ERRANDS_URL=backend_url)

    @errands.task
    def noop() -> str:
        return "ran"

    def broken_receiver(sender: Flask, **extra: Any) -> None:
        raise RuntimeError("receiver bug")

    with app.app_context(), job_started.connected_to(broken_receiver, app):
        errands.start_worker()
        job = noop.delay()
        with pytest.raises(JobFailed, match="receiver bug"):
            job.result(timeout=30)
        assert job.status is JobStatus.FAILED


def test_a_job_cancelled_while_running_that_then_times_out_ends_cancelled(
    make_app: AppFactory,
) -> None:
    app, errands = make_app()
    started = threading.Event()

    @errands.task(timeout=0.5, retries=3)
    def spin() -> None:
        started.set()
        while True:  # ignores cancel_requested; only the timeout stops it
            time.sleep(0.01)

    with app.app_context():
        errands.start_worker()
        job = spin.delay()
        assert started.wait(30)
        job.cancel()
        wait_until(lambda: job.refresh().status.finished, "the timeout to stop the job")
        assert job.status == JobStatus.CANCELLED
        assert job.attempts == 1


def test_waiting_on_a_job_that_was_purged_raises_instead_of_hanging(
    backend_url: str, make_app: AppFactory
) -> None:
    from flask_errands import ErrandsError

    app, errands = make_app(ERRANDS_URL=backend_url, ERRANDS_EMBEDDED_WORKER=False)

    @errands.task
    def never_runs() -> None: ...

    with app.app_context():
        job = never_runs.delay()
        errands.backend.purge(status="queued")
        with pytest.raises(ErrandsError, match="no longer exists"):
            job.result(timeout=30)


# -- found in review: a worker must survive whatever a job or its store does ------------


def test_a_task_raising_a_base_exception_fails_and_its_thread_goes_on(
    make_app: AppFactory,
) -> None:
    import asyncio

    app, errands = make_app(ERRANDS_CONCURRENCY=1)

    @errands.task
    def cancelled_coroutine() -> None:
        raise asyncio.CancelledError()

    @errands.task
    def after() -> str:
        return "still working"

    with app.app_context():
        errands.start_worker()
        broken = cancelled_coroutine.delay()
        with pytest.raises(JobFailed) as failure:
            broken.result(timeout=30)
        assert failure.value.exc_type == "CancelledError"
        assert after.delay().result(timeout=30) == "still working"


def test_a_redelivered_job_whose_cancel_was_requested_never_runs_its_body(
    backend_url: str, make_app: AppFactory
) -> None:
    app, errands = make_app(ERRANDS_URL=backend_url, ERRANDS_EMBEDDED_WORKER=False)
    ran: list[str] = []

    @errands.task
    def send_newsletter() -> None:
        ran.append("sent")

    with app.app_context():
        job = send_newsletter.delay()
        backend = errands.backend
        [first] = backend.reserve(None, 1, "dead-worker", 30, time.time())
        job.cancel()  # running (under the dead worker): only a request
        later = time.time() + 60  # the dead worker's lease has expired
        [again] = backend.reserve(None, 1, "live-worker", 30, later)
        runner = app.extensions["errands"].runner
        runner.run(runner.start(again))
        assert ran == []
        assert job.refresh().status == JobStatus.CANCELLED
        assert first.id == again.id


def test_jobs_reserved_ahead_go_to_an_idle_worker_instead_of_waiting_behind_a_long_one(
    make_app: AppFactory,
) -> None:
    from flask_errands.worker import Worker

    app, errands = make_app(ERRANDS_EMBEDDED_WORKER=False)
    urgent_ran = threading.Event()

    @errands.task
    def quick(n: int) -> None: ...

    @errands.task
    def report() -> bool:
        return urgent_ran.wait(30)  # true only if urgent ran meanwhile, elsewhere

    @errands.task
    def urgent() -> None:
        urgent_ran.set()

    with app.app_context():
        state = app.extensions["errands"]
        busy = Worker(state.runner, concurrency=1, name="h:1:busy").start()
        quick.delay_many([(n,) for n in range(30)])  # recent jobs are short: it reserves ahead
        wait_until(lambda: busy.jobs_done == 30, "the short jobs")
        idle = Worker(state.runner, concurrency=1, name="h:2:idle").start()
        now = time.time()
        long_job, urgent_job = state.backend.enqueue(
            [report.options().build((), {}, now), urgent.options().build((), {}, now)]
        )
        try:
            long = errands.job(long_job.id)
            assert long is not None and long.result(timeout=60) is True
            urgent_now = errands.job(urgent_job.id)
            assert urgent_now is not None and urgent_now.status == JobStatus.SUCCEEDED
        finally:
            busy.stop(5)
            idle.stop(5)


def test_an_interrupted_sqlite_transaction_never_leaves_the_connection_inside(
    tmp_path: object,
) -> None:
    import sqlite3

    from flask_errands.backends.sqlite import SQLiteBackend
    from flask_errands.runner import JobInterrupt

    backend = SQLiteBackend(f"{tmp_path}/jobs.db")

    def interrupted(db: sqlite3.Connection) -> None:
        db.execute("INSERT INTO errands_workers VALUES ('w', '{}', 0)")
        raise JobInterrupt  # what a job's timeout raises in its thread, at any instruction

    with pytest.raises(JobInterrupt):
        backend._transaction(interrupted)
    assert not backend._db().in_transaction
    other = sqlite3.connect(f"{tmp_path}/jobs.db", timeout=1)
    other.execute("INSERT INTO errands_workers VALUES ('other', '{}', 0)")  # not locked
    other.commit()
    assert backend.list_workers(-1) == [{"id": "other"}]
    other.close()
    backend.close()


def test_an_interrupt_asked_during_store_calls_is_raised_as_the_outermost_one_returns() -> None:
    from flask_errands.backends.patience import STORE_CALL, interrupt
    from flask_errands.runner import JobInterrupt

    here = threading.get_ident()
    delivered: list[str] = []
    reached = []
    with pytest.raises(JobInterrupt), STORE_CALL:
        with STORE_CALL:
            interrupt(here, JobInterrupt, lambda: delivered.append("now"))
        reached.append("after the inner call")
    assert reached == ["after the inner call"]
    assert delivered == []
    with STORE_CALL:
        pass  # nothing left pending: a later store call returns normally
    interrupt(here, JobInterrupt, lambda: delivered.append("now"))  # outside any store call
    assert delivered == ["now"]


def test_timeouts_landing_while_jobs_use_the_store_never_cut_the_process_off_from_it(
    backend_url: str, make_app: AppFactory
) -> None:
    """A timed-out job's thread is interrupted outside store calls, never holding a lock."""
    app, errands = make_app(ERRANDS_URL=backend_url, ERRANDS_EMBEDDED_WORKER=False)

    @errands.task(timeout=0.3)
    def chatty() -> None:
        while True:  # reports progress until it is stopped
            current_job.set_progress(0.5, "still going")

    @errands.task
    def after() -> str:
        return "ran"

    with app.app_context():
        jobs = [chatty.delay() for _ in range(12)]
        errands.start_worker()
        wait_until(
            lambda: all(job.refresh().status is JobStatus.FAILED for job in jobs),
            "every chatty job to time out",
        )
        assert {job.error for job in jobs} == {"TimeoutError: job exceeded its timeout of 0.3s"}
        assert errands.backend.counts()  # the store still answers this thread
        assert after.delay().result(timeout=30) == "ran"  # and the worker's threads
