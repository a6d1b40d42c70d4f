"""The task API as users write it: declaring tasks, enqueueing, and watching jobs.

Tests that need a deterministic order drain the queue in the test's thread
(``ERRANDS_EMBEDDED_WORKER=False`` + ``errands.drain()``); tests about what a
running job sees start the real worker threads with ``errands.start_worker()``.

Tests ask for ``backend_url`` before ``make_app``: fixtures are torn down in
reverse, so each store outlives the worker threads using it.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask, current_app, g, has_request_context

from flask_errands import (
    Errands,
    Job,
    JobCancelled,
    JobFailed,
    JobLogFilter,
    JobStatus,
    Retry,
    current_job,
    job_enqueued,
    job_failed,
    job_retrying,
    job_started,
    job_succeeded,
)
from flask_errands.backends import JobRecord
from flask_errands.scheduler import Scheduler
from tests.conftest import brokered_too
from tests.helpers import wait_until

# RabbitMQ with PostgreSQL as the store runs here with the slow tests only: the
# conformance suite and tests/test_rabbitmq.py cover that pair in the default run.
backend_url = brokered_too(slow=("rabbitmq+postgres",))
shared_backend_url = brokered_too(shared=True, slow=("rabbitmq+postgres",))

AppFactory = Callable[..., tuple[Flask, Errands]]
UTC = dt.timezone.utc


@pytest.fixture
def drained(backend_url: str, make_app: AppFactory) -> tuple[Flask, Errands]:
    """An app whose jobs run only when the test calls ``errands.drain()``."""
    return make_app(ERRANDS_URL=backend_url, ERRANDS_EMBEDDED_WORKER=False)


@pytest.fixture
def working(backend_url: str, make_app: AppFactory) -> Iterator[tuple[Flask, Errands]]:
    """An app with its worker threads running, and a short lease so heartbeats come often."""
    app, errands = make_app(ERRANDS_URL=backend_url, ERRANDS_LEASE_SECONDS=1)
    with app.app_context():
        errands.start_worker()
        yield app, errands


# -- declaring tasks -----------------------------------------------------------


def test_a_bare_decorator_names_the_task_after_module_and_qualname(
    drained: tuple[Flask, Errands],
) -> None:
    app, errands = drained

    @errands.task
    def welcome(user_id: int) -> str:
        return f"hello {user_id}"

    expected = f"{__name__}.test_a_bare_decorator_names_the_task_after_module_and_qualname"
    assert welcome.name == f"{expected}.<locals>.welcome"
    assert welcome(7) == "hello 7"  # still a plain function when called directly
    with app.app_context():
        job = welcome.delay(7)
        assert job.task == welcome.name
        assert (job.queue, job.priority, job.max_attempts) == ("default", 0, 1)
        assert errands.drain() == 1
        assert job.result(timeout=30) == "hello 7"


def test_decorator_options_apply_to_every_call(drained: tuple[Flask, Errands]) -> None:
    app, errands = drained

    @errands.task(name="mail.send", queue="emails", priority=5, retries=3, retry_delay=2)
    def send(to: str) -> None:
        pass

    with app.app_context():
        job = send.delay("ada@example.com")
        again = errands.job(job.id)
    assert send.name == job.task == "mail.send"
    assert again is not None
    for seen in (job, again):
        assert (seen.queue, seen.priority, seen.max_attempts) == ("emails", 5, 4)
        assert seen.status is JobStatus.QUEUED
        assert seen.kwargs == {} and seen.args == ("ada@example.com",)


def test_two_functions_cannot_share_a_name(drained: tuple[Flask, Errands]) -> None:
    _, errands = drained

    @errands.task(name="dup")
    def one() -> None:
        pass

    with pytest.raises(ValueError, match="dup"):

        @errands.task(name="dup")
        def two() -> None:
            pass


BAD_OPTIONS: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"queue": ""}, ValueError, "queue must be 1 to 200 characters long"),
    ({"queue": "q" * 201}, ValueError, "queue must be 1 to 200 characters long, not 201"),
    ({"queue": "a\x00b"}, ValueError, "queue must not contain control characters or NUL"),
    ({"queue": "line\nbreak"}, ValueError, "queue must not contain control characters"),
    ({"queue": "\ud800"}, ValueError, "queue must be valid Unicode"),
    ({"queue": 5}, TypeError, "queue must be a string"),
    ({"priority": "high"}, TypeError, "priority must be an int from -2147483648 to 2147483647"),
    ({"priority": 2**31}, ValueError, "priority must be from -2147483648 to 2147483647"),
    ({"priority": -(2**31) - 1}, ValueError, "priority must be from -2147483648 to 2147483647"),
    ({"priority": 10**30}, ValueError, "priority must be from -2147483648"),
    ({"retries": -1}, ValueError, "retries must be from 0 to 1000"),
    ({"retries": 10**6}, ValueError, "retries must be from 0 to 1000"),
    ({"retry_delay": float("nan")}, ValueError, "retry_delay must be finite"),
    ({"retry_delay": float("inf")}, ValueError, "retry_delay must be finite"),
    ({"retry_delay": -1}, ValueError, "retry_delay must be finite, at least 0"),
    ({"timeout": 0}, ValueError, "timeout must be positive"),
    ({"timeout": float("inf")}, ValueError, "at most 31,536,000 seconds"),
    ({"timeout": float("nan")}, ValueError, "timeout must be finite"),
    ({"unique_key": "k\x00"}, ValueError, "unique_key must not contain NUL"),
    ({"unique_key": "k" * 501}, ValueError, "unique_key must be at most 500 characters"),
    ({"delay": float("nan")}, ValueError, "delay= must be a finite number of seconds"),
    ({"delay": float("inf")}, ValueError, "delay= must be a finite number of seconds"),
    ({"delay": -float("inf")}, ValueError, "delay= must be a finite number of seconds"),
    ({"delay": 1e300}, ValueError, "is after 9999-12-31"),
    ({"delay": "soon"}, ValueError, "'soon' is not a duration like 30s"),
    ({"delay": [30]}, TypeError, "delay= must be a number of seconds or a duration such as"),
    ({"at": dt.datetime(2030, 1, 1)}, ValueError, "at= needs an aware datetime"),
    ({"at": 1_900_000_000}, TypeError, "at= must be an aware datetime"),
    ({"at": dt.datetime.max.replace(tzinfo=UTC)}, ValueError, "is after 9999-12-31"),
    (
        {"at": dt.datetime.max.replace(tzinfo=dt.timezone(dt.timedelta(hours=-5)))},
        ValueError,
        "is after 9999-12-31",
    ),
    ({"at": dt.datetime(2030, 1, 1, tzinfo=UTC), "delay": 5}, ValueError, "not both"),
    ({"colour": "red"}, TypeError, "unknown task option(s) 'colour'; valid options are at, "),
]


@pytest.mark.parametrize(("options", "error", "message"), BAD_OPTIONS)
def test_bad_options_are_refused_before_anything_is_stored(
    drained: tuple[Flask, Errands],
    options: dict[str, Any],
    error: type[Exception],
    message: str,
) -> None:
    app, errands = drained

    @errands.task
    def noop() -> None:
        pass

    with app.app_context():
        with pytest.raises(error) as caught:
            noop.options(**options).delay()
        assert type(caught.value) is error
        assert message in str(caught.value)
        assert errands.backend.counts() == {}


def test_options_at_the_edge_of_their_range_are_stored_and_run(
    drained: tuple[Flask, Errands],
) -> None:
    app, errands = drained

    @errands.task
    def echo(value: str) -> str:
        return value

    edge = {"queue": "é" * 200, "priority": 2**31 - 1, "unique_key": "k" * 500}
    with app.app_context():
        top = echo.options(**edge).delay("top")
        bottom = echo.options(queue="é" * 200, priority=-(2**31)).delay("bottom")
        late = echo.options(at=dt.datetime(9999, 12, 30, tzinfo=UTC)).delay("late")
        assert errands.drain(queues=["é" * 200]) == 2
        assert (top.result(), bottom.result()) == ("top", "bottom")
        assert late.refresh().status == "scheduled"
        assert late.scheduled_for == dt.datetime(9999, 12, 30, tzinfo=UTC)


def test_an_unknown_option_on_the_decorator_lists_the_valid_names(
    drained: tuple[Flask, Errands],
) -> None:
    _, errands = drained
    with pytest.raises(TypeError) as caught:

        @errands.task(retires=3)  # type: ignore[call-overload, untyped-decorator]
        def typo() -> None:
            pass

    assert str(caught.value) == (
        "unknown task option(s) 'retires'; valid options are at, concurrency, delay, "
        "priority, queue, rate_limit, retries, retry_delay, timeout, unique_key"
    )


def test_a_negative_delay_or_a_past_at_means_now(drained: tuple[Flask, Errands]) -> None:
    app, errands = drained

    @errands.task
    def noop() -> None:
        pass

    with app.app_context():
        before = time.time()
        early = noop.delay()
        jobs = [
            noop.options(delay=-3600).delay(),
            noop.options(delay=dt.timedelta(days=-1)).delay(),
            noop.options(at=dt.datetime(1, 1, 1, tzinfo=UTC)).delay(),
        ]
        for job in jobs:
            job.refresh()
            assert job.status == "queued"
            assert job.scheduled_for.timestamp() >= before  # now, so it does not jump the queue
        reserved = errands.backend.reserve(None, 1, "w", 30, time.time())
        assert [record.id for record in reserved] == [early.id]


@pytest.mark.parametrize(
    ("delay", "seconds"), [("30", 30), ("45s", 45), ("15m", 900), ("12h", 43200), ("2w", 1209600)]
)
def test_delay_accepts_the_cli_duration_strings(
    drained: tuple[Flask, Errands], delay: str, seconds: float
) -> None:
    app, errands = drained

    @errands.task
    def noop() -> None:
        pass

    with app.app_context():
        before = time.time()
        job = noop.options(delay=delay).delay().refresh()
        after = time.time()
    assert job.status == "scheduled"
    assert before + seconds <= job.scheduled_for.timestamp() <= after + seconds


def test_per_call_options_override_the_decorator_for_that_call_only(
    drained: tuple[Flask, Errands],
) -> None:
    app, errands = drained

    @errands.task(queue="emails", priority=1)
    def send(to: str) -> None:
        pass

    at = dt.datetime.now(UTC) + dt.timedelta(hours=2)
    with app.app_context():
        moved = send.options(queue="bulk", priority=-3, retries=2, timeout=5).delay("a")
        later = send.options(delay=dt.timedelta(minutes=10)).delay("b")
        fixed = send.options(at=at).delay("c")
        plain = send.delay("d")
    assert (moved.queue, moved.priority, moved.max_attempts) == ("bulk", -3, 3)
    assert (plain.queue, plain.priority, plain.max_attempts) == ("emails", 1, 1)
    assert later.status is JobStatus.SCHEDULED
    assert later.scheduled_for - later.enqueued_at == pytest.approx(
        dt.timedelta(minutes=10), abs=dt.timedelta(milliseconds=1)
    )
    assert fixed.status is JobStatus.SCHEDULED
    assert abs(fixed.scheduled_for - at) < dt.timedelta(milliseconds=1)
    assert plain.status is JobStatus.QUEUED


def test_delay_many_takes_argument_tuples_and_args_kwargs_pairs(
    drained: tuple[Flask, Errands],
) -> None:
    app, errands = drained

    @errands.task
    def greet(name: str, greeting: str = "hello") -> str:
        return f"{greeting} {name}"

    with app.app_context():
        jobs = greet.delay_many(
            [("ada",), (("bob",), {"greeting": "hi"}), ((), {"name": "cy"}), "dee"]
        )
        assert greet.delay_many([]) == []
        assert len({job.id for job in jobs}) == 4
        assert errands.drain() == 4
        results = [job.result(timeout=30) for job in jobs]
    assert results == ["hello ada", "hi bob", "hello cy", "hello dee"]


def test_delay_many_with_one_bad_call_stores_none_of_them(drained: tuple[Flask, Errands]) -> None:
    app, errands = drained

    @errands.task
    def greet(name: str) -> None:
        pass

    with app.app_context():
        with pytest.raises(TypeError):
            greet.delay_many([("ada",), ("bob", "extra"), ("cy",)])
        assert errands.backend.counts() == {}


def test_delay_many_with_options_applies_them_to_every_job(drained: tuple[Flask, Errands]) -> None:
    app, errands = drained

    @errands.task
    def greet(name: str) -> None:
        pass

    with app.app_context():
        jobs = greet.options(queue="bulk", priority=2).delay_many([("a",), ("b",)])
        assert errands.backend.counts() == {("bulk", "queued"): 2}
    assert [(job.queue, job.priority) for job in jobs] == [("bulk", 2), ("bulk", 2)]


# -- the Job handle -------------------------------------------------------------


def test_a_job_reports_its_life_from_queued_to_succeeded(working: tuple[Flask, Errands]) -> None:
    _, errands = working
    go = threading.Event()

    @errands.task
    def report(n: int) -> dict[str, Any]:
        current_job.set_progress(0.5, "half way")
        go.wait(30)
        return {"n": n, "when": dt.date(2024, 5, 1)}

    before = dt.datetime.now(UTC)
    job = report.options(delay=0.2).delay(3)
    assert job.status is JobStatus.SCHEDULED
    assert (job.progress, job.progress_message, job.attempts, job.error) == (None, None, 0, None)
    assert job.started_at is None and job.finished_at is None
    assert job.enqueued_at.tzinfo is not None
    assert before - dt.timedelta(seconds=1) <= job.enqueued_at <= dt.datetime.now(UTC)
    with pytest.raises(TimeoutError):
        job.result(timeout=0.01)

    wait_until(lambda: job.refresh().progress == 0.5, "the job to report progress")
    assert job.refresh().status is JobStatus.RUNNING
    assert job.progress_message == "half way"
    assert job.attempts == 1
    assert job.started_at is not None and job.started_at >= job.enqueued_at
    assert job.finished_at is None
    assert json.loads(json.dumps(job.to_dict()))["status"] == "running"

    go.set()
    assert job.result(timeout=30) == {"n": 3, "when": dt.date(2024, 5, 1)}
    assert job.status is JobStatus.SUCCEEDED
    assert job.finished_at is not None and job.finished_at >= job.started_at
    assert job.finished_at.tzinfo is not None
    data = json.loads(json.dumps(job.to_dict()))
    assert data["id"] == job.id
    assert data["task"] == report.name
    assert data["status"] == "succeeded"
    assert data["result"] == {"n": 3, "when": "2024-05-01"}
    assert data["attempts"] == 1
    assert data["progress"] == 0.5
    assert dt.datetime.fromisoformat(data["finished_at"]) == job.finished_at


def test_a_failed_job_carries_the_remote_type_message_and_traceback(
    drained: tuple[Flask, Errands],
) -> None:
    app, errands = drained

    @errands.task
    def parse(text: str) -> int:
        return int(text)

    with app.app_context():
        job = parse.delay("twelve")
        errands.drain()
        with pytest.raises(JobFailed) as caught:
            job.result(timeout=30)
    failure = caught.value
    assert failure.exc_type == "ValueError"
    assert failure.message == "invalid literal for int() with base 10: 'twelve'"
    assert str(failure) == "ValueError: invalid literal for int() with base 10: 'twelve'"
    assert failure.traceback is not None
    assert "return int(text)" in failure.traceback
    assert failure.traceback.rstrip().endswith(failure.message)
    assert job.status is JobStatus.FAILED
    assert job.error == "ValueError: invalid literal for int() with base 10: 'twelve'"
    assert job.to_dict()["error"] == job.error


def test_another_app_sharing_the_store_finds_the_job_by_id(
    shared_backend_url: str, make_app: AppFactory
) -> None:
    web, web_errands = make_app(ERRANDS_URL=shared_backend_url, ERRANDS_EMBEDDED_WORKER=False)
    other, other_errands = make_app(ERRANDS_URL=shared_backend_url, ERRANDS_EMBEDDED_WORKER=False)

    @web_errands.task(name="shared.double")
    def double(n: int) -> int:
        return n * 2

    with web.app_context():
        job = double.delay(21)
    with other.app_context():
        seen = other_errands.job(job.id)
        assert seen is not None
        assert (seen.task, seen.status, seen.args) == ("shared.double", JobStatus.QUEUED, (21,))
        assert other_errands.job(uuid.uuid4().hex) is None
    with web.app_context():
        assert web_errands.drain() == 1
    with other.app_context():
        assert seen.result(timeout=30) == 42
        assert seen.status is JobStatus.SUCCEEDED


# -- inside a running task --------------------------------------------------------


def test_current_job_knows_its_id_and_attempt_from_one(drained: tuple[Flask, Errands]) -> None:
    app, errands = drained
    seen: list[tuple[str, int, bool]] = []

    @errands.task(retries=1, retry_delay=0)
    def flaky() -> None:
        seen.append((current_job.id, current_job.attempt, current_job.cancel_requested))
        if current_job.attempt == 1:
            raise ConnectionError("try again")

    with app.app_context():
        job = flaky.delay()
        assert errands.drain() == 2
        job.result(timeout=30)
    assert seen == [(job.id, 1, False), (job.id, 2, False)]
    assert job.attempts == 2


def test_current_job_outside_a_task_says_so() -> None:
    with pytest.raises(RuntimeError, match="only available inside a running task"):
        current_job.id  # noqa: B018


def test_set_progress_refuses_a_fraction_outside_zero_to_one(
    drained: tuple[Flask, Errands],
) -> None:
    app, errands = drained

    @errands.task
    def report() -> None:
        current_job.set_progress(1.5)

    with app.app_context():
        job = report.delay()
        errands.drain()
        with pytest.raises(JobFailed, match="between 0 and 1"):
            job.result(timeout=30)


def test_raising_retry_runs_the_job_again_after_the_delay(drained: tuple[Flask, Errands]) -> None:
    app, errands = drained
    started: list[float] = []

    @errands.task  # no retries configured: an explicit Retry is honoured anyway
    def poll_service() -> str:
        started.append(time.time())
        if current_job.attempt < 3:
            raise errands.Retry(delay=0.2)
        return "ready"

    with app.app_context():
        job = poll_service.delay()
        assert errands.drain() == 1
        assert job.refresh().status is JobStatus.SCHEDULED
        assert job.error == "Retry: retry requested"
        assert job.scheduled_for >= dt.datetime.fromtimestamp(started[0] + 0.2, UTC)
        wait_until(lambda: errands.drain() == 1 and len(started) == 2, "the second attempt")
        wait_until(lambda: errands.drain() == 1 and len(started) == 3, "the third attempt")
        assert job.result(timeout=30) == "ready"
    assert job.attempts == 3
    assert started[1] - started[0] >= 0.2
    assert started[2] - started[1] >= 0.2
    assert Retry is errands.Retry


def test_retries_back_off_then_end_failed_with_the_traceback(
    working: tuple[Flask, Errands],
) -> None:
    _, errands = working
    attempts: list[tuple[int, float]] = []

    @errands.task(retries=3, retry_delay=0.05)
    def charge(amount: int) -> None:
        attempts.append((current_job.attempt, time.time()))
        raise ConnectionError(f"gateway refused {amount}")

    job = charge.delay(10)
    with pytest.raises(JobFailed) as caught:
        job.result(timeout=30)
    assert [n for n, _ in attempts] == [1, 2, 3, 4]
    # Each pause is at least half of retry_delay * 2 ** (attempt - 1): the back-off grows.
    for (n, at), (_, next_at) in itertools.pairwise(attempts):
        assert next_at - at >= 0.5 * 0.05 * 2 ** (n - 1)
    assert job.status is JobStatus.FAILED
    assert job.attempts == 4 == job.max_attempts
    assert caught.value.exc_type == "ConnectionError"
    assert caught.value.message == "gateway refused 10"
    assert caught.value.traceback is not None
    assert 'raise ConnectionError(f"gateway refused {amount}")' in caught.value.traceback
    assert job.to_dict()["error"] == "ConnectionError: gateway refused 10"


def test_higher_priority_runs_first_then_enqueue_order(drained: tuple[Flask, Errands]) -> None:
    app, errands = drained
    ran: list[str] = []

    @errands.task
    def work(label: str) -> None:
        ran.append(label)

    with app.app_context():
        work.delay("low-1")
        work.options(priority=9).delay("high")
        work.delay("low-2")
        work.options(priority=5).delay("mid-1")
        work.delay_many([("low-3",), ("low-4",)])
        work.options(priority=5).delay("mid-2")
        work.options(priority=-1).delay("lowest")
        assert errands.drain() == 8
    assert ran == ["high", "mid-1", "mid-2", "low-1", "low-2", "low-3", "low-4", "lowest"]


def test_a_delayed_job_does_not_run_early(working: tuple[Flask, Errands]) -> None:
    _, errands = working

    @errands.task
    def remind() -> float:
        return time.time()

    soon = dt.datetime.now(UTC) + dt.timedelta(seconds=0.3)
    by_delay = remind.options(delay=0.3).delay()
    by_at = remind.options(at=soon).delay()
    assert remind.delay().result(timeout=30)  # an undelayed job is not held back
    assert by_delay.result(timeout=30) >= by_delay.enqueued_at.timestamp() + 0.3
    assert by_at.result(timeout=30) >= soon.timestamp()
    assert by_delay.started_at is not None
    assert by_delay.started_at >= by_delay.scheduled_for


def test_a_job_over_its_timeout_is_stopped_and_counts_as_a_failed_attempt(
    backend_url: str, make_app: AppFactory
) -> None:
    app, errands = make_app(ERRANDS_URL=backend_url, ERRANDS_CONCURRENCY=1)
    loops: list[int] = []
    failed: list[str] = []

    @errands.task(retries=1, retry_delay=0.01)
    def spin() -> None:
        loops.append(current_job.attempt)
        n = 0
        while True:  # pure Python: the timeout can interrupt it
            n += 1

    @errands.task
    def quick() -> str:
        return "done"

    def on_failed(sender: Flask, job: Any, **extra: Any) -> None:
        failed.append(job.id)

    with app.app_context(), job_failed.connected_to(on_failed, app):
        errands.start_worker()
        job = spin.options(timeout=0.2).delay()
        with pytest.raises(JobFailed) as caught:
            job.result(timeout=30)
        # The single worker thread is free again: the next job runs.
        assert quick.delay().result(timeout=30) == "done"
    assert loops == [1, 2]
    assert job.attempts == 2
    assert caught.value.exc_type == "TimeoutError"
    assert "0.2s" in caught.value.message
    assert failed == [job.id]


def test_a_unique_key_returns_the_live_job(drained: tuple[Flask, Errands]) -> None:
    app, errands = drained

    @errands.task(unique_key=lambda user_id: f"welcome:{user_id}")
    def welcome(user_id: int) -> int:
        return user_id

    @errands.task
    def rebuild(name: str) -> str:
        return name

    with app.app_context():
        first = welcome.delay(1)
        assert welcome.delay(1).id == first.id
        assert welcome.delay(2).id != first.id
        keyed = rebuild.options(unique_key="search-index").delay("a")
        assert rebuild.options(unique_key="search-index").delay("b").id == keyed.id
        assert errands.backend.counts() == {("default", "queued"): 3}
        assert errands.drain() == 3
        assert keyed.result(timeout=30) == "a"
        # Once the job has finished, the key is free for a new one.
        after = welcome.delay(1)
        assert after.id != first.id
        assert after.status is JobStatus.QUEUED


def test_a_cancelled_waiting_job_never_starts(drained: tuple[Flask, Errands]) -> None:
    app, errands = drained
    ran: list[str] = []

    @errands.task
    def send(label: str) -> None:
        ran.append(label)

    with app.app_context():
        queued = send.delay("queued")
        scheduled = send.options(delay=0.05).delay("scheduled")
        kept = send.delay("kept")
        assert queued.cancel().status is JobStatus.CANCELLED
        cancelled_later = errands.job(scheduled.id)
        assert cancelled_later is not None
        cancelled_later.cancel()
        time.sleep(0.06)  # let the scheduled one fall due
        assert errands.drain() == 1
        for job in (queued, scheduled):
            with pytest.raises(JobCancelled):
                job.refresh().result(timeout=30)
            assert job.status is JobStatus.CANCELLED
            assert job.attempts == 0 and job.started_at is None
        kept.result(timeout=30)
        assert kept.cancel().status is JobStatus.SUCCEEDED  # finished jobs stay as they are
    assert ran == ["kept"]


def test_a_running_job_sees_cancel_requested_and_ends_cancelled(
    working: tuple[Flask, Errands],
) -> None:
    _, errands = working
    started = threading.Event()
    noticed: list[int] = []

    @errands.task
    def export(rows: int) -> int:
        started.set()
        for n in range(rows):
            if current_job.cancel_requested:
                noticed.append(n)
                return n
            time.sleep(0.01)
        return rows

    job = export.delay(100_000)
    assert started.wait(30)
    job.cancel()
    assert job.cancel_requested
    with pytest.raises(JobCancelled):
        job.result(timeout=30)
    assert job.status is JobStatus.CANCELLED
    assert len(noticed) == 1


def test_a_running_job_may_raise_job_cancelled_itself(drained: tuple[Flask, Errands]) -> None:
    app, errands = drained

    @errands.task
    def give_up() -> None:
        raise JobCancelled(current_job.id)

    with app.app_context():
        job = give_up.delay()
        errands.drain()
        with pytest.raises(JobCancelled):
            job.result(timeout=30)


# -- the app context ----------------------------------------------------------------


def test_tasks_run_in_the_app_context_with_teardown_after_each(
    backend_url: str, make_app: AppFactory
) -> None:
    app, errands = make_app(ERRANDS_URL=backend_url, GREETING="bonjour")
    torn_down: list[str] = []
    seen: list[tuple[str, bool, bool]] = []

    @app.teardown_appcontext
    def close_session(exc: BaseException | None) -> None:
        if "job_id" in g:  # the test's own app context is torn down too
            torn_down.append(g.job_id)

    @errands.task
    def greet(name: str) -> str:
        seen.append((current_app.name, hasattr(g, "job_id"), has_request_context()))
        g.job_id = current_job.id
        return f"{current_app.config['GREETING']} {name}"

    with app.app_context():
        errands.start_worker()
        jobs = greet.delay_many([("ada",), ("bob",), ("cy",)])
        results = [job.result(timeout=30) for job in jobs]
    assert results == ["bonjour ada", "bonjour bob", "bonjour cy"]
    assert seen == [(app.name, False, False)] * 3  # a fresh g each time, no request
    wait_until(lambda: len(torn_down) == 3, "teardown after every job")
    assert sorted(torn_down) == sorted(job.id for job in jobs)


# -- for users' tests ---------------------------------------------------------------


def test_eager_mode_runs_delay_inline(make_app: AppFactory) -> None:
    app, errands = make_app(ERRANDS_URL="sqlite:///errands.db", ERRANDS_EAGER=True)
    calls: list[int] = []

    @errands.task
    def double(n: int) -> int:
        calls.append(n)
        return n * 2

    @errands.task(retries=2)
    def broken() -> None:
        raise KeyError("missing")

    with app.app_context():
        job = double.delay(4)
        assert calls == [4]  # ran before delay() returned
        assert job.status is JobStatus.SUCCEEDED
        assert job.result() == 8
        found = errands.job(job.id)
        assert found is not None and found.result() == 8
        later = double.options(delay=3600).delay(5)
        assert later.result() == 10
        failed = broken.delay()
        assert failed.status is JobStatus.FAILED
        assert failed.attempts == 3
        with pytest.raises(JobFailed, match="KeyError"):
            failed.result()
        assert errands.backend.counts() == {}  # nothing reached the real store


def test_eager_mode_runs_an_explicit_retry_at_once(make_app: AppFactory) -> None:
    app, errands = make_app(ERRANDS_EAGER=True)

    @errands.task
    def poll() -> str:
        if current_job.attempt < 2:
            raise Retry(delay=3600)
        return "ready"

    with app.app_context():
        job = poll.delay()
        assert job.status is JobStatus.SUCCEEDED
        assert job.result(timeout=5) == "ready"
        assert job.attempts == 2


def test_drain_without_backoff_runs_retries_in_the_same_drain(
    drained: tuple[Flask, Errands],
) -> None:
    app, errands = drained

    @errands.task(retries=3, retry_delay=3600)
    def flaky() -> str:
        if current_job.attempt < 3:
            raise ConnectionError("try again")
        return "done"

    with app.app_context():
        waiting = flaky.delay()
        assert errands.drain() == 1  # with back-off, the retry waits an hour
        assert waiting.refresh().status is JobStatus.SCHEDULED
        job = flaky.delay()
        assert errands.drain(backoff=False) == 3  # this one's 3 attempts, back to back
        assert job.refresh().status is JobStatus.SUCCEEDED
        assert waiting.refresh().status is JobStatus.SCHEDULED  # already waiting: unchanged
        assert job.attempts == 3 and job.result() == "done"


def test_scheduled_ticks_take_the_same_enqueue_path_as_delay(
    backend_url: str, make_app: AppFactory
) -> None:
    app, errands = make_app(
        ERRANDS_URL=backend_url, ERRANDS_EMBEDDED_WORKER=False, ERRANDS_MAX_PAYLOAD=1000
    )

    @errands.periodic(every=60, args=("x" * 2000,), name="big")
    def big(text: str) -> None: ...

    @errands.periodic(every=60, name="small")
    def small() -> None: ...

    announced: list[str] = []

    def on_enqueued(sender: Flask, job: Job) -> None:
        announced.append(job.task)

    with job_enqueued.connected_to(on_enqueued, sender=app):
        scheduler = Scheduler(app.extensions["errands"])
        scheduler.tick(1_000_000_000.0)
        fired = scheduler.tick(1_000_000_060.0)
    assert [tick.schedule for tick in fired] == ["small"]  # the oversize one is refused
    assert announced == [small.name]


def test_drain_runs_every_due_job_and_says_how_many(drained: tuple[Flask, Errands]) -> None:
    app, errands = drained

    @errands.task
    def noop(n: int) -> int:
        return n

    with app.app_context():
        assert errands.drain() == 0
        noop.delay_many([(n,) for n in range(5)])
        noop.options(queue="other").delay(5)
        noop.options(delay=3600).delay(6)
        assert errands.drain("other") == 1
        assert errands.drain() == 5
        assert errands.drain() == 0
        assert errands.backend.counts() == {
            ("default", "succeeded"): 5,
            ("other", "succeeded"): 1,
            ("default", "scheduled"): 1,
        }


def test_a_job_whose_task_is_unknown_fails_and_the_worker_goes_on(
    backend_url: str, make_app: AppFactory
) -> None:
    app, errands = make_app(ERRANDS_URL=backend_url, ERRANDS_CONCURRENCY=1)

    @errands.task
    def still_here() -> str:
        return "ok"

    orphan = JobRecord(
        id=uuid.uuid4().hex,
        task="old_release.tasks.vanished",
        payload='{"args":[],"kwargs":{}}',
        eta=time.time(),
        enqueued_at=time.time(),
    )
    with app.app_context():
        errands.backend.enqueue([orphan])
        errands.start_worker()
        assert still_here.delay().result(timeout=30) == "ok"
        job = errands.job(orphan.id)
        assert job is not None
        with pytest.raises(JobFailed) as caught:
            job.result(timeout=30)
    assert caught.value.exc_type == "UnknownTask"
    assert "old_release.tasks.vanished" in caught.value.message
    assert job.status is JobStatus.FAILED


# -- the extension ------------------------------------------------------------------


def test_one_errands_object_serves_several_apps(tmp_path: Any) -> None:
    errands = Errands()

    @errands.task
    def whoami() -> str:
        return str(current_app.config["WHO"])

    apps = []
    for who in ("one", "two"):
        app = Flask(f"app_{who}", instance_path=str(tmp_path / who))
        app.config.update(ERRANDS_URL=f"sqlite:///{who}.db", ERRANDS_EMBEDDED_WORKER=False)
        app.config["WHO"] = who
        errands.init_app(app)
        apps.append(app)
    one, two = apps
    try:
        with one.app_context():
            job = whoami.delay()
            assert errands.job(job.id) is not None
        with two.app_context():
            assert errands.job(job.id) is None  # another app, another store
            assert errands.drain() == 0
            other = whoami.delay()
            assert errands.drain() == 1
            assert other.result(timeout=30) == "two"
        with one.app_context():
            assert errands.drain() == 1
            assert job.result(timeout=30) == "one"
        assert (tmp_path / "one" / "one.db").exists()
        assert (tmp_path / "two" / "two.db").exists()
    finally:
        for app in apps:
            with app.app_context():
                errands.backend.close()


def test_init_app_twice_on_one_app_is_refused(make_app: AppFactory) -> None:
    app, errands = make_app()
    with pytest.raises(RuntimeError, match="already registered"):
        errands.init_app(app)
    with pytest.raises(RuntimeError, match="already registered"):
        Errands(app)


def test_delay_outside_an_app_context_says_what_to_do(make_app: AppFactory) -> None:
    _, errands = make_app()

    @errands.task
    def noop() -> None:
        pass

    with pytest.raises(RuntimeError, match="app context"):
        noop.delay()
    with pytest.raises(RuntimeError, match="app context"):
        errands.job("x")


def test_an_app_without_init_app_names_the_fix(make_app: AppFactory) -> None:
    _, errands = make_app()

    @errands.task
    def noop() -> None:
        pass

    with Flask("bare").app_context(), pytest.raises(RuntimeError, match="init_app"):
        noop.delay()


def test_signals_follow_each_job_through_its_life(drained: tuple[Flask, Errands]) -> None:
    app, errands = drained
    events: list[tuple[str, str, str | None]] = []

    def recorder(name: str) -> Callable[..., None]:
        def receive(sender: Flask, job: Any, **extra: Any) -> None:
            assert sender is app
            events.append((name, job.id, extra.get("error")))

        return receive

    @errands.task
    def ok() -> None:
        pass

    @errands.task(retries=1, retry_delay=0)
    def bad() -> None:
        raise ValueError("nope")

    receivers = {
        name: recorder(name) for name in ("enqueued", "started", "succeeded", "failed", "retrying")
    }
    signals = {
        "enqueued": job_enqueued,
        "started": job_started,
        "succeeded": job_succeeded,
        "failed": job_failed,
        "retrying": job_retrying,
    }
    for name, signal in signals.items():
        signal.connect(receivers[name], app)
    try:
        with app.app_context():
            good = ok.delay()
            assert errands.drain() == 1
            failing = bad.delay()
            assert errands.drain() == 2
    finally:
        for name, signal in signals.items():
            signal.disconnect(receivers[name], app)
    assert events == [
        ("enqueued", good.id, None),
        ("started", good.id, None),
        ("succeeded", good.id, None),
        ("enqueued", failing.id, None),
        ("started", failing.id, None),
        ("retrying", failing.id, "ValueError: nope"),
        ("started", failing.id, None),
        ("failed", failing.id, "ValueError: nope"),
    ]


def test_log_records_carry_the_job_id_and_task(
    drained: tuple[Flask, Errands], caplog: pytest.LogCaptureFixture
) -> None:
    app, errands = drained
    task_log = logging.getLogger("myapp.tasks")

    @errands.task(name="mail.send")
    def send(to: str) -> None:
        task_log.info("sending to %s", to)

    log_filter = JobLogFilter()
    caplog.handler.addFilter(log_filter)
    caplog.set_level(logging.INFO)
    try:
        task_log.info("before any job")
        with app.app_context():
            job = send.delay("ada@example.com")
            errands.drain()
    finally:
        caplog.handler.removeFilter(log_filter)
    mine = [r for r in caplog.records if r.name == "myapp.tasks"]
    assert [(r.getMessage(), vars(r)["job_id"], vars(r)["task"]) for r in mine] == [
        ("before any job", None, None),
        ("sending to ada@example.com", job.id, "mail.send"),
    ]
    outcome = [r for r in caplog.records if r.name == "flask_errands"]
    assert outcome, "flask-errands logs each job's outcome"
    assert {(vars(r)["job_id"], vars(r)["task"]) for r in outcome} == {(job.id, "mail.send")}
    assert "succeeded" in outcome[-1].getMessage()


def test_a_progress_message_no_store_can_keep_is_stored_escaped(
    drained: tuple[Flask, Errands],
) -> None:
    app, errands = drained

    @errands.task
    def report() -> None:
        current_job.set_progress(0.5, "row\x00 7")

    with app.app_context():
        job = report.delay()
        errands.drain()
        assert job.refresh().status is JobStatus.SUCCEEDED
        assert job.progress == 0.5 and job.progress_message == "row\\x00 7"


def test_retry_delays_are_bounded_and_checked(drained: tuple[Flask, Errands]) -> None:
    app, errands = drained

    @errands.task
    def forever() -> None:
        raise Retry(delay=float("inf"))

    @errands.task
    def nonsense() -> None:
        raise Retry(delay=float("nan"))

    with app.app_context():
        far, bad = forever.delay(), nonsense.delay()
        errands.drain()
        far.refresh()
        assert far.status is JobStatus.SCHEDULED
        years = (far.scheduled_for - far.enqueued_at).total_seconds() / (365 * 86400)
        assert 0.99 < years < 1.01
        assert bad.refresh().status is JobStatus.FAILED
        assert bad.error == "ValueError: Retry(delay=...) takes seconds or a timedelta, not nan"
