"""Limits of tasks and of queues across real worker processes sharing one store.

Two ``flask errands worker`` processes of 8 threads each run limited tasks of
``tests/apps/limits_app.py``, which write an append-only ledger; the ledger says what
really ran when. On SQLite, Redis and PostgreSQL.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask

from flask_errands import Errands, JobStatus
from flask_errands.limits import Limit
from tests.apps import limits_app
from tests.helpers import wait_until
from tests.processes import Served, client_of

LEASE = 2.0


@pytest.fixture
def client(shared_backend_url: str, tmp_path: Path) -> Iterator[Flask]:
    # The workers are not told the queue's limits: the jobs carry them from the client.
    queue_limits = {"emails": {"concurrency": 2}}
    with client_of(
        limits_app.errands, shared_backend_url, tmp_path, ERRANDS_QUEUE_LIMITS=queue_limits
    ) as app:
        yield app


@pytest.fixture
def workers(shared_backend_url: str, tmp_path: Path, client: Flask) -> Iterator[list[Served]]:
    """Two worker processes of 8 threads each, both registered (so both take jobs)."""
    started: list[Served] = []
    for _ in range(2):
        served = Served(tmp_path, shared_backend_url, ERRANDS_LEASE_SECONDS=LEASE)
        served.flask("tests.apps.limits_app", "errands", "worker", "-c", "8")
        started.append(served)
    backend = client.extensions["errands"].backend
    wait_until(lambda: len(backend.list_workers(time.time())) == 2, "both workers to start")
    yield started
    for served in started:
        served.close()


def entries(path: Path, task: str) -> list[tuple[str, float, float, int, str]]:
    """The ledger lines of ``task``: (what, wall time, claim time, pid, job id)."""
    if not path.exists():
        return []
    found = []
    for line in path.read_text().splitlines():
        what, name, wall, claimed, pid, job_id = line.split()
        if name == task:
            found.append((what, float(wall), float(claimed), int(pid), job_id))
    return found


def most_at_once(path: Path, task: str) -> int:
    """The most jobs of ``task`` the ledger shows running at one time."""
    events = sorted((wall, 1 if what == "start" else -1) for what, wall, *_ in entries(path, task))
    most = now = 0
    for _, step in sorted(events, key=lambda e: (e[0], e[1])):  # an end before a start
        now += step
        most = max(most, now)
    return most


def test_limits_hold_across_two_worker_processes(
    client: Flask, workers: list[Served], tmp_path: Path
) -> None:
    ledger = str(tmp_path / "ledger.txt")
    with client.app_context():
        pairs = limits_app.pair.delay_many([(ledger, 0.2) for _ in range(24)])
        paced = limits_app.paced.delay_many([(ledger,) for _ in range(12)])
        free = limits_app.free.delay_many([(ledger,) for _ in range(4)])
        mails = limits_app.mailer.delay_many([(ledger, 0.2) for _ in range(8)])
        jobs = [*pairs, *paced, *free, *mails]
        wait_until(
            lambda: all(job.refresh().status == JobStatus.SUCCEEDED for job in jobs),
            "every limited job to run",
            timeout=60,
        )
    path = tmp_path / "ledger.txt"
    output = "\n".join(served.output() for served in workers)
    assert most_at_once(path, "pair") == 2, output
    assert most_at_once(path, "mailer") == 2, output
    starts = sorted(claimed for _, _, claimed, _, _ in entries(path, "paced"))
    assert len(starts) == 12
    busiest = max(sum(1 for s in starts if t <= s < t + 1.0) for t in starts)
    assert busiest == 5, starts
    # The free task of the same queue ran while the paced ones waited for their turn.
    free_starts = [wall for _, wall, *_ in entries(path, "free")]
    paced_walls = sorted(wall for _, wall, *_ in entries(path, "paced"))
    assert max(free_starts) < paced_walls[-1]


def test_a_killed_worker_gives_its_slot_back_with_its_lease(
    client: Flask, workers: list[Served], tmp_path: Path
) -> None:
    path = tmp_path / "ledger.txt"
    with client.app_context():
        first = limits_app.hog.delay(str(path), 60.0)
        holder = wait_until(lambda: entries(path, "hog"), "a hog to start")[0][3]
        second = limits_app.hog.delay(str(path), 0.0)
        victim = next(s for s in workers if s.proc is not None and s.proc.pid == holder)
        survivor = next(s for s in workers if s is not victim)
        victim.signal_group(signal.SIGKILL)
        assert victim.proc is not None and victim.proc.wait(timeout=30) == -signal.SIGKILL
        # The slot is the dead worker's until its lease lapses; then the survivor has it.
        ran = wait_until(
            lambda: [e for e in entries(path, "hog") if e[3] != holder and e[0] == "start"],
            "the killed worker's slot to come back",
        )
        assert survivor.proc is not None and ran[0][3] == survivor.proc.pid
        assert ran[0][2] >= entries(path, "hog")[0][2] + LEASE
        assert {first.refresh().status, second.refresh().status} & {JobStatus.RUNNING}
    usage = client.extensions["errands"].backend.limit_usage(
        [Limit("task:hog", concurrency=1)], ran[0][2] + 0.01
    )
    assert usage["task:hog"][0] <= 1


def test_malformed_limits_are_refused_naming_the_value() -> None:
    errands = Errands()
    with pytest.raises(ValueError, match="10/fortnight"):
        errands.task(rate_limit="10/fortnight")(lambda: None)
    with pytest.raises(ValueError, match="0"):
        errands.task(concurrency=0)(lambda: None)
    with pytest.raises(ValueError, match="'0/s'"):
        errands.task(rate_limit="0/s")(lambda: None)
    app = Flask("bad")
    app.config.update(
        ERRANDS_URL="memory://", ERRANDS_QUEUE_LIMITS={"emails": {"rate_limit": "3/fortnight"}}
    )
    with pytest.raises(ValueError, match="3/fortnight"):
        Errands(app)


def test_status_and_the_dashboard_show_each_limit_and_its_use(tmp_path: Path) -> None:
    app = Flask("limited", instance_path=str(tmp_path))
    app.secret_key = "test"
    app.config.update(
        ERRANDS_URL=f"sqlite:///{tmp_path / 'errands.db'}",
        ERRANDS_EMBEDDED_WORKER=False,
        ERRANDS_QUEUE_LIMITS={"emails": {"rate_limit": "100/m", "concurrency": 5}},
    )
    errands = Errands(app)

    @errands.task(name="export", concurrency=2)
    def export() -> None:
        """Never more than two at once."""

    @errands.task(name="send", queue="emails", rate_limit="10/second")
    def send() -> None:
        """Ten a second, and the queue's limits too."""

    errands.init_dashboard(app, authorize=lambda: "viewer")
    with app.app_context():
        export.delay_many([() for _ in range(3)])
        send.delay_many([() for _ in range(3)])
        backend = app.extensions["errands"].backend
        claimed = backend.reserve(None, 10, "w", 30.0, time.time())
    assert sorted(job.task for job in claimed) == ["export", "export", "send", "send", "send"]

    result = app.test_cli_runner().invoke(args=["errands", "status"])
    assert result.exit_code == 0, result.output
    lines = {line.split()[1]: line for line in result.output.splitlines() if line[:4] == "  ta"}
    lines |= {line.split()[1]: line for line in result.output.splitlines() if line[:4] == "  qu"}
    assert lines["export"].split(maxsplit=2)[2] == "2/2 running"
    assert lines["send"].split(maxsplit=2)[2] == "3 of 10/s started"
    assert lines["emails"].split(maxsplit=2)[2] == "3/5 running, 3 of 100/m started"

    with app.test_client() as web:
        api = web.get("/errands/api/queues").get_json()
        page = web.get("/errands/queues").get_data(as_text=True)
    assert {(row["kind"], row["name"]): row["running"] for row in api["limits"]} == {
        ("task", "export"): 2,
        ("task", "send"): 3,
        ("queue", "emails"): 3,
    }
    assert 'data-limit="task:export"' in page
    assert 'data-limit="queue:emails"' in page


def test_eager_mode_runs_every_call_inline_whatever_the_limits(tmp_path: Path) -> None:
    app = Flask("eager", instance_path=str(tmp_path))
    app.config.update(ERRANDS_URL="memory://", ERRANDS_EAGER=True)
    errands = Errands(app)

    @errands.task(name="hourly", rate_limit="1/h", concurrency=1)
    def hourly(n: int) -> int:
        """Once an hour in production; every call at once in tests."""
        return n * 2

    with app.app_context():
        assert [hourly.delay(n).result(timeout=0) for n in range(3)] == [0, 2, 4]
