"""``async def`` tasks: on the worker's event loop, many at once, and like any other task."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, current_app

from flask_errands import Errands, JobCancelled, JobFailed, current_job, job_started, job_succeeded
from tests.apps import worker_app
from tests.helpers import wait_until
from tests.test_cli import WorkerProcess, client_app, enqueue, job_of  # noqa: F401 - a fixture

MakeApp = Callable[..., tuple[Flask, Errands]]


class Running:
    """How many coroutines run at once, and the most there ever were."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0
        self.cancelled: list[str] = []

    async def sleep(self, seconds: float) -> None:
        """Sleep as one of the running coroutines, noting the job if it is cancelled."""
        self.now += 1
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            self.cancelled.append(current_job.id)
            raise


def test_five_hundred_coroutines_run_side_by_side_on_one_worker(
    backend_url: str, make_app: MakeApp
) -> None:
    app, errands = make_app(ERRANDS_URL=backend_url, ERRANDS_EMBEDDED_WORKER=False)
    running = Running()
    hundred = threading.Event()  # set once a hundred run at once; none ends before that

    @errands.task
    async def wait_a_bit(n: int) -> int:
        running.now += 1
        running.peak = max(running.peak, running.now)
        if running.now >= 100:
            hundred.set()
        while not hundred.is_set():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)
        running.now -= 1
        return n

    with app.app_context():
        jobs = wait_a_bit.delay_many(range(500))
        errands.start_worker()
        # Not one after the other: a hundred run side by side, however slowly they start.
        wait_until(hundred.is_set, "a hundred coroutines to run at once")
        assert [job.result(timeout=120) for job in jobs] == list(range(500))
    # ERRANDS_ASYNC_CONCURRENCY (100) on the loop, and at most one more per idle thread (4).
    assert 100 <= running.peak <= 104


def test_async_concurrency_bounds_the_coroutines_at_once(make_app: MakeApp) -> None:
    app, errands = make_app(ERRANDS_ASYNC_CONCURRENCY=5, ERRANDS_CONCURRENCY=1)
    running = Running()

    @errands.task
    async def wait_a_bit() -> None:
        running.now += 1
        running.peak = max(running.peak, running.now)
        await asyncio.sleep(0.05)
        running.now -= 1

    with app.app_context():
        for job in wait_a_bit.delay_many([()] * 30):
            job.result(timeout=30)
    assert 5 <= running.peak <= 6


def test_an_async_task_runs_in_the_app_context_and_reports_progress(
    backend_url: str, make_app: MakeApp
) -> None:
    app, errands = make_app(ERRANDS_URL=backend_url)
    seen: list[tuple[str, float | None]] = []

    @errands.task
    async def report() -> str:
        current_job.set_progress(0.5, "half way")
        job = errands.job(current_job.id)
        assert job is not None
        seen.append((job.progress_message or "", job.progress))
        await asyncio.sleep(0)
        return str(current_app.name)

    with app.app_context():
        errands.start_worker()
        job = report.delay()
        assert job.result(timeout=30) == app.name
        assert seen == [("half way", 0.5)]
        assert job.refresh().progress == 0.5


def test_an_async_task_over_its_timeout_is_cancelled_and_fails(
    backend_url: str, make_app: MakeApp
) -> None:
    app, errands = make_app(ERRANDS_URL=backend_url)
    running = Running()

    @errands.task(timeout=0.3)
    async def too_slow() -> None:
        await running.sleep(30)

    with app.app_context():
        errands.start_worker()
        job = too_slow.delay()
        with pytest.raises(JobFailed) as failed:
            job.result(timeout=30)
    assert failed.value.exc_type == "TimeoutError"
    assert job.refresh().error == "TimeoutError: job exceeded its timeout of 0.3s"
    assert running.cancelled == [job.id]


def test_cancelling_a_running_async_job_cancels_its_coroutine(
    backend_url: str, make_app: MakeApp
) -> None:
    app, errands = make_app(ERRANDS_URL=backend_url, ERRANDS_LEASE_SECONDS=3)
    running = Running()

    @errands.task
    async def forever() -> None:
        await running.sleep(60)

    with app.app_context():
        errands.start_worker()
        job = forever.delay()
        wait_until(lambda: running.now, "the coroutine to start")
        job.cancel()
        with pytest.raises(JobCancelled):
            job.result(timeout=30)
    assert running.cancelled == [job.id]
    assert job.refresh().status == "cancelled"


def test_a_failing_async_task_is_retried_and_sends_the_signals(
    backend_url: str, make_app: MakeApp
) -> None:
    app, errands = make_app(ERRANDS_URL=backend_url)
    events: list[str] = []

    @errands.task(retries=2, retry_delay=0.01)
    async def flaky() -> int:
        await asyncio.sleep(0)
        if current_job.attempt < 3:
            raise ValueError(f"attempt {current_job.attempt}")
        return current_job.attempt

    def started(sender: Flask, job: Any, **extra: Any) -> None:
        events.append(f"started {job.attempts}")

    def succeeded(sender: Flask, job: Any, **extra: Any) -> None:
        events.append("succeeded")

    with (
        app.app_context(),
        job_started.connected_to(started, app),
        job_succeeded.connected_to(succeeded, app),
    ):
        errands.start_worker()
        job = flaky.delay()
        assert job.result(timeout=30) == 3
        # The signal follows the stored outcome, so result() may return first.
        wait_until(lambda: "succeeded" in events, "the job_succeeded signal")
    assert events == ["started 1", "started 2", "started 3", "succeeded"]


def test_drain_runs_async_tasks_with_their_timeouts(backend_url: str, make_app: MakeApp) -> None:
    app, errands = make_app(ERRANDS_URL=backend_url, ERRANDS_EMBEDDED_WORKER=False)

    @errands.task
    async def double(n: int) -> int:
        await asyncio.sleep(0)
        return n * 2

    @errands.task(timeout=0.1)
    async def too_slow() -> None:
        await asyncio.sleep(30)

    with app.app_context():
        doubled, slow = double.delay(21), too_slow.delay()
        assert errands.drain() == 2
        assert doubled.result(timeout=5) == 42
        with pytest.raises(JobFailed, match="TimeoutError"):
            slow.result(timeout=5)


async def _swallow_cancellation(late: list[str], seconds: float) -> str:
    """Sleep; cancelled, carry on regardless for ``seconds`` more (for ever if inf)."""
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        late.append(current_job.id)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0.05)
    return "finished anyway"


def _in_a_thread(app: Flask, call: Callable[[], Any]) -> threading.Thread:
    """Run ``call`` in the app's context in a daemon thread: a test sees it hang, not hangs."""

    def run() -> None:
        with app.app_context():
            call()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_coroutine_that_swallows_its_timeout_still_times_out_when_drained(
    make_app: MakeApp,
) -> None:
    app, errands = make_app(ERRANDS_EMBEDDED_WORKER=False)
    late: list[str] = []

    @errands.task(timeout=0.2)
    async def stubborn(seconds: float) -> str:
        return await _swallow_cancellation(late, seconds)

    with app.app_context():
        brief, endless = stubborn.delay(0.1), stubborn.delay(float("inf"))
        drained = _in_a_thread(app, errands.drain)
        drained.join(timeout=30)
        assert not drained.is_alive(), "drain() waited for a coroutine that never ends"
        for job in (brief, endless):
            with pytest.raises(JobFailed, match="TimeoutError"):
                job.result(timeout=5)
    assert late == [brief.id, endless.id]


def test_a_coroutine_that_swallows_its_timeout_times_out_and_the_worker_still_stops(
    backend_url: str, make_app: MakeApp, caplog: pytest.LogCaptureFixture
) -> None:
    app, errands = make_app(ERRANDS_URL=backend_url, ERRANDS_EMBEDDED_WORKER=False)
    late: list[str] = []

    @errands.task(timeout=0.2)
    async def stubborn(seconds: float) -> str:
        return await _swallow_cancellation(late, seconds)

    @errands.task
    async def fine() -> int:
        await asyncio.sleep(0)
        return 1

    with app.app_context():
        errands.start_worker()
        brief, endless = stubborn.delay(0.1), stubborn.delay(float("inf"))
        for job in (brief, endless):
            with pytest.raises(JobFailed, match="TimeoutError"):
                job.result(timeout=30)
        assert fine.delay().result(timeout=30) == 1  # the loop still runs other coroutines
        stopped = _in_a_thread(app, errands.stop_worker)
        stopped.join(timeout=30)
        assert not stopped.is_alive(), "the worker hung on stop"
    assert sorted(late) == sorted([brief.id, endless.id])
    assert "errands-asyncio" not in [thread.name for thread in threading.enumerate()]
    assert "ignored its cancellation at its timeout of 0.2s" in caplog.text


def test_eager_mode_runs_async_tasks_even_inside_a_running_loop(make_app: MakeApp) -> None:
    app, errands = make_app(ERRANDS_EAGER=True)

    @errands.task(retries=1)
    async def flaky(n: int) -> int:
        await asyncio.sleep(0)
        if current_job.attempt == 1:
            raise ValueError("first")
        return n + 1

    with app.app_context():
        assert flaky.delay(1).result(timeout=0) == 2

        async def view() -> int:  # an async def view enqueueing in eager mode
            return int(flaky.delay(2).result(timeout=0))

        assert asyncio.run(view()) == 3


def test_async_tasks_run_in_flask_errands_worker_processes(
    sqlite_url: str,
    tmp_path: Path,
    client_app: Flask,  # noqa: F811 - the fixture
) -> None:
    worker = WorkerProcess(sqlite_url, tmp_path)
    proc = worker.start("--processes", "2", "-c", "1")
    try:
        ids = [enqueue(client_app, worker_app.nap, 0.2) for _ in range(20)]
        jobs = [wait_until(partial(_succeeded, client_app, i), "the naps to end") for i in ids]
        assert {job.result(timeout=0)[0] for job in jobs} == {"tests.apps.worker_app"}
        assert {job.progress_message for job in jobs} == {"napping"}
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, worker.output()


def _succeeded(app: Flask, job_id: str) -> Any:
    job = job_of(app, job_id)
    return job.status == "succeeded" and job
