"""The embedded worker under real servers: `flask run` and gunicorn, started and stopped for real.

In a process that serves the app, the embedded worker starts when the app has
loaded (schedules fire with no request at all) and SIGTERM gives its running
jobs their grace; a job still running at the deadline is back in its queue at
once. Processes that only load the app (CLI commands, a test suite) start nothing.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from flask_errands import Errands
from tests.apps import web_app
from tests.helpers import free_port, wait_until
from tests.processes import Served, client_of, get, lines

gunicorn = pytest.importorskip("gunicorn")

AppFactory = Callable[..., tuple[Flask, Errands]]


@pytest.fixture
def client(sqlite_url: str, tmp_path: Path) -> Iterator[Flask]:
    """An app in the test process on the server's store, running nothing itself."""
    with client_of(web_app.errands, sqlite_url, tmp_path) as app:
        yield app


@pytest.fixture
def served() -> Iterator[list[Served]]:
    started: list[Served] = []
    yield started
    for process in started:
        process.close()


def serve(
    served: list[Served],
    tmp_path: Path,
    url: str,
    server: str,
    *options: str,
    ticks: Path | None = None,
    **config: Any,
) -> tuple[Served, int]:
    """Serve tests.apps.web_app with ``server`` ("flask run" or "gunicorn") on a free port.

    With ``ticks``, the app has a schedule every second that logs its runs there.
    """
    process = Served(tmp_path, url, **config)
    if ticks is not None:
        process.env["WEB_APP_TICKS"] = str(ticks)
    port = free_port()
    if server == "flask run":
        process.flask("tests.apps.web_app", "run", "--port", str(port), *options)
    else:
        bind = f"127.0.0.1:{port}"
        process.start("gunicorn", "-b", bind, *_quiet(), *options, "tests.apps.web_app:app")
    served.append(process)
    return process, port


def _quiet() -> list[str]:
    """Gunicorn options that keep parallel test servers apart (no shared control socket)."""
    from gunicorn.config import Config

    return ["--no-control-socket"] if "control_socket" in Config().settings else []


def job(app: Flask, job_id: str) -> Any:
    with app.app_context():
        return web_app.errands.job(job_id)


def registered_pids(app: Flask) -> list[int]:
    with app.app_context():
        return sorted(w.pid for w in web_app.errands.admin.workers() if w.pid is not None)


def booted(client: Flask, options: tuple[str, ...]) -> list[int]:
    """Wait until every server process runs its worker (a signal must not hit one booting)."""
    processes = int(options[options.index("-w") + 1]) if "-w" in options else 1
    return wait_until(
        lambda: len(p := registered_pids(client)) == processes and p, "every server's worker"
    )


def enqueue_over_http(port: int, log: Path, seconds: float) -> str:
    url = f"http://127.0.0.1:{port}/enqueue?path={log}&seconds={seconds}"
    return wait_until(lambda: get(url), "the server to answer")


# -- SIGTERM gives running jobs their grace -------------------------------------


STOPS = [
    pytest.param("flask run", (), signal.SIGTERM, -signal.SIGTERM, id="flask-run-SIGTERM"),
    pytest.param("gunicorn", ("-w", "2"), signal.SIGTERM, 0, id="gunicorn-SIGTERM"),
    pytest.param("gunicorn", ("-w", "2"), signal.SIGINT, 0, id="gunicorn-SIGINT"),
]


@pytest.mark.parametrize(("server", "options", "signum", "exit_code"), STOPS)
def test_a_stop_signal_lets_a_running_job_finish(
    server: str,
    options: tuple[str, ...],
    signum: int,
    exit_code: int,
    sqlite_url: str,
    tmp_path: Path,
    client: Flask,
    served: list[Served],
) -> None:
    log = tmp_path / "runs.txt"
    process, port = serve(served, tmp_path, sqlite_url, server, *options)
    job_id = enqueue_over_http(port, log, 2.0)
    wait_until(lambda: lines(log), "the job to start")
    booted(client, options)
    process.signal_group(signum)  # as systemd or a terminal's Ctrl-C would
    assert process.proc is not None
    assert process.proc.wait(timeout=60) == exit_code, process.output()
    finished = job(client, job_id)
    assert (finished.status, finished.attempts) == ("succeeded", 1), process.output()
    assert [r[0] for r in lines(log)] == ["start", "end"]


@pytest.mark.parametrize(
    ("server", "options"),
    [("flask run", ()), ("gunicorn", ("-w", "2", "--graceful-timeout", "20"))],
    ids=["flask-run", "gunicorn"],
)
def test_a_job_still_running_at_the_deadline_is_back_in_its_queue_at_exit(
    server: str,
    options: tuple[str, ...],
    sqlite_url: str,
    tmp_path: Path,
    client: Flask,
    served: list[Served],
) -> None:
    log = tmp_path / "runs.txt"
    process, port = serve(served, tmp_path, sqlite_url, server, *options, ERRANDS_SHUTDOWN_GRACE=1)
    job_id = enqueue_over_http(port, log, 60.0)
    wait_until(lambda: lines(log), "the job to start")
    booted(client, options)
    process.signal_group(signal.SIGTERM)
    assert process.proc is not None
    process.proc.wait(timeout=60)
    stopped = job(client, job_id)
    assert (stopped.status, stopped.attempts, stopped.error) == ("queued", 0, None)
    assert "released back to its queue: still running at shutdown" in process.output()


# -- schedules fire in server processes with no request ------------------------------


SERVERS = [
    pytest.param("flask run", (), id="flask-run"),
    pytest.param("flask run", ("--reload",), id="flask-run-reload"),
    pytest.param("gunicorn", ("-w", "3"), id="gunicorn-w3"),
    pytest.param("gunicorn", ("-w", "2", "--preload"), id="gunicorn-preload"),
]


@pytest.mark.parametrize(("server", "options"), SERVERS)
def test_schedules_fire_once_per_tick_with_no_request(
    server: str,
    options: tuple[str, ...],
    sqlite_url: str,
    tmp_path: Path,
    client: Flask,
    served: list[Served],
) -> None:
    ticks = tmp_path / "ticks.txt"
    process, _ = serve(served, tmp_path, sqlite_url, server, *options, ticks=ticks)
    wait_until(lambda: len(lines(ticks)) >= 3, "three ticks to run")
    pids = booted(client, options)
    assert process.proc is not None
    if options:  # the reloader's watcher and gunicorn's master run no worker
        assert process.proc.pid not in pids
    process.signal_group(signal.SIGTERM)
    process.proc.wait(timeout=60)
    with client.app_context():
        tick_jobs = client.extensions["errands"].backend.list_jobs(limit=1000)
    assert len(tick_jobs) >= 3 and {j.task for j in tick_jobs} == {"tests.apps.web_app.tick"}
    assert len({j.eta for j in tick_jobs}) == len(tick_jobs)  # each fire time enqueued once
    ran = [row[0] for row in lines(ticks)]
    assert len(set(ran)) == len(ran)  # each job ran once
    assert set(ran) <= {j.id for j in tick_jobs}


def test_a_cli_command_starts_no_worker(
    sqlite_url: str, tmp_path: Path, client: Flask, served: list[Served]
) -> None:
    ticks = tmp_path / "ticks.txt"
    process = Served(tmp_path, sqlite_url)
    process.env["WEB_APP_TICKS"] = str(ticks)
    process.flask("tests.apps.web_app", "idle", "2.5")
    served.append(process)
    assert process.proc is not None
    assert process.proc.wait(timeout=60) == 0, process.output()
    with client.app_context():
        assert client.extensions["errands"].backend.list_jobs() == []
    assert not ticks.exists()


def test_an_app_built_in_a_test_starts_no_thread(make_app: AppFactory, tmp_path: Path) -> None:
    app, errands = make_app(ERRANDS_URL=f"sqlite:///{tmp_path}/t.db")

    @errands.periodic(every=1, name="often")
    def often() -> None: ...

    assert not [t.name for t in threading.enumerate() if t.name.startswith("errands")]
    with app.app_context():
        assert errands.runtime.worker is None
