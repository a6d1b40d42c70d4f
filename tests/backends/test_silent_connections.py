"""Network faults between the app and its store, through a loopback proxy of the test's own.

A firewall that drops packets, a dead NAT or a failover leaves a connection open
and silent; a reply can be lost after the store did the work. Each test puts
``tests.proxy.Proxy`` between the app and the shared Redis or PostgreSQL server
and asserts what a user sees: ``.delay()`` raises ``EnqueueError`` instead of
hanging, a worker carries on when the network comes back, a job whose reply was
lost is returned (and stored and run once), and a lapsed lease is logged.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask

from flask_errands import EnqueueError, current_job
from flask_errands.backends import JobRecord, backend_from_url
from tests.helpers import MakeApp, wait_until
from tests.proxy import Proxy

ON_STORES = pytest.mark.parametrize("backend_url", ["postgres", "redis"], indirect=True)
#: Generous bound for waits that must end far sooner (a hang fails the test instead).
DEADLINE = 30.0
#: The per-call bound these tests configure, short so that they stay quick.
BOUND = {"postgres": "timeout=1.5", "redis": "socket_timeout=1.5&socket_connect_timeout=1.5"}


@pytest.fixture
def proxy() -> Iterator[Callable[[str], tuple[Proxy, str]]]:
    """Put a proxy in front of a store URL's server; returns it and the URL through it.

    Ask for it before ``make_app``, so the apps' workers stop before the proxy closes.
    """
    made: list[Proxy] = []

    def through(url: str) -> tuple[Proxy, str]:
        scheme, rest = url.split("://", 1)
        auth, _, rest = rest.rpartition("@")
        hostport, sep, tail = rest.partition("/")
        port = int(hostport.rsplit(":", 1)[1])
        made.append(proxy := Proxy(port))
        store = "redis" if scheme.startswith("redis") else "postgres"
        joiner = "&" if "?" in tail else "?"
        at = f"{auth}@" if auth else ""
        return proxy, f"{scheme}://{at}127.0.0.1:{proxy.port}{sep}{tail}{joiner}{BOUND[store]}"

    yield through
    for made_proxy in made:
        made_proxy.close()


def in_thread(app: Flask, call: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    """Run ``call`` in a daemon thread in an app context; the dict gets its result or error,
    and how long it took."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        started = time.monotonic()
        try:
            with app.app_context():
                outcome["result"] = call()
        except Exception as exc:
            outcome["error"] = exc
        outcome["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def finished(thread: threading.Thread, what: str) -> None:
    thread.join(DEADLINE)
    assert not thread.is_alive(), f"{what} still blocked after {DEADLINE:g}s"


@ON_STORES
def test_delay_on_a_silent_connection_raises_and_the_worker_carries_on_after(
    backend_url: str, proxy: Callable[[str], tuple[Proxy, str]], make_app: MakeApp
) -> None:
    link, url = proxy(backend_url)
    app, errands = make_app(ERRANDS_URL=url)

    @errands.task
    def double(n: int) -> int:
        return 2 * n

    with app.app_context():
        worker = errands.start_worker()
        assert double.delay(1).result(timeout=DEADLINE) == 2

        link.set_mode("silent")
        thread, outcome = in_thread(app, lambda: double.delay(2))
        finished(thread, "delay() behind a silent connection")
        assert isinstance(outcome.get("error"), EnqueueError), outcome
        print(f"delay() raised EnqueueError after {outcome['seconds']:.2f}s of silence")
        time.sleep(2)  # the worker's own calls meet the silence too

        link.set_mode("forward")
        back = time.monotonic()
        job = double.delay(3)
        assert job.result(timeout=DEADLINE) == 6
        print(f"the worker ran a job {time.monotonic() - back:.2f}s after the network came back")
        assert worker.running and errands.start_worker() is worker
        # Counted once the job's thread lets go of it, a moment after its result is stored;
        # 3 if the silenced enqueue reached the store later.
        wait_until(lambda: worker.jobs_done >= 2, "the worker to count both jobs done")


@ON_STORES
@pytest.mark.parametrize("kind", ["one", "unique", "batch"])
def test_jobs_whose_enqueue_reply_is_lost_are_returned_stored_once_and_run_once(
    backend_url: str,
    proxy: Callable[[str], tuple[Proxy, str]],
    make_app: MakeApp,
    kind: str,
) -> None:
    link, url = proxy(backend_url)
    app, errands = make_app(ERRANDS_URL=url)
    runs: list[str] = []

    @errands.task
    def record(n: int) -> int:
        runs.append(current_job.id)
        return n

    task = record.options(unique_key="report-7") if kind == "unique" else record

    def enqueue() -> list[Any]:
        return task.delay_many([(7,), (8,)]) if kind == "batch" else [task.delay(7)]

    with app.app_context():
        errands.backend.counts()  # connected and set up before replies go missing
        link.set_mode("drop_replies")
        thread, outcome = in_thread(app, enqueue)
        time.sleep(1)
        link.set_mode("forward")
        finished(thread, "delay() after a lost reply")
        assert "error" not in outcome, outcome
        jobs = outcome["result"]
        assert sorted(j.id for j in errands.backend.list_jobs()) == sorted(j.id for j in jobs)
        if kind == "unique":
            assert task.delay(7).id == jobs[0].id  # the stored job holds its unique key
        errands.start_worker()
        assert [job.result(timeout=DEADLINE) for job in jobs] == [7, 8][: len(jobs)]
    assert sorted(runs) == sorted(job.id for job in jobs)


@ON_STORES
def test_a_worker_that_cannot_renew_a_lease_in_time_says_so(
    backend_url: str,
    proxy: Callable[[str], tuple[Proxy, str]],
    make_app: MakeApp,
    caplog: pytest.LogCaptureFixture,
) -> None:
    link, url = proxy(backend_url)
    app, errands = make_app(ERRANDS_URL=url, ERRANDS_LEASE_SECONDS=2)
    started, release = threading.Event(), threading.Event()

    @errands.task
    def slow() -> str:
        started.set()
        release.wait(DEADLINE)
        return "done"

    with app.app_context():
        errands.start_worker()
        job = slow.delay()
        assert started.wait(DEADLINE)
        link.set_mode("silent")

        def lapsed() -> list[logging.LogRecord] | None:
            found = [r for r in caplog.records if "lapsed" in r.getMessage()]
            return found or None

        with caplog.at_level(logging.WARNING, logger="flask_errands"):
            warned = wait_until(lapsed, "a warning about the lapsed lease", DEADLINE)
        link.set_mode("forward")
        release.set()
        assert job.result(timeout=DEADLINE) == "done"
    [warning] = warned
    assert warning.levelno == logging.WARNING
    assert job.id in warning.getMessage()
    assert "may run again" in warning.getMessage()


@pytest.mark.parametrize("backend_url", ["postgres"], indirect=True)
def test_a_silent_listen_connection_is_noticed_and_replaced(
    backend_url: str, proxy: Callable[[str], tuple[Proxy, str]], caplog: pytest.LogCaptureFixture
) -> None:
    link, url = proxy(backend_url)
    listener = backend_from_url(url, instance_path="")
    writer = backend_from_url(backend_url, instance_path="")
    woken = threading.Event()
    try:
        listener.watch(woken.set)
        assert woken.wait(DEADLINE), "the listener never said it was listening"
        woken.clear()
        link.set_mode("silent")

        def noticed() -> list[logging.LogRecord] | None:
            found = [r for r in caplog.records if "listen connection" in r.getMessage()]
            return found or None

        with caplog.at_level(logging.WARNING, logger="flask_errands"):
            [warning] = wait_until(noticed, "the listener to notice the silence", DEADLINE)
        assert "reconnecting" in warning.getMessage()
        link.set_mode("forward")
        wait_until(lambda: woken.is_set() or None, "the listener to listen again", DEADLINE)
        woken.clear()
        now = time.time()
        writer.enqueue([JobRecord(id="j1", task="t", payload="{}", enqueued_at=now, eta=now)])
        assert woken.wait(DEADLINE), "an enqueue after the silence woke nobody"
    finally:
        listener.close()
        writer.close()
