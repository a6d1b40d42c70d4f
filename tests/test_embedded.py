"""The embedded worker: when it starts, that it starts once per process, and how it stops."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
from flask import Flask

from flask_errands import ConfigurationError, Errands, JobStatus
from flask_errands.worker import Worker
from tests.helpers import app_command, wait_until

AppFactory = Callable[..., tuple[Flask, Errands]]
EMBEDDED = ["memory", "sqlite"]  # the stores whose worker is embedded by default


def embedded_worker(app: Flask) -> Worker | None:
    """The worker running inside this process for ``app``, as ``app.extensions`` shows it."""
    worker: Worker | None = app.extensions["errands"].worker
    return worker if worker is not None and worker.running else None


@pytest.fixture(params=EMBEDDED)
def embedded_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return "memory://" if request.param == "memory" else f"sqlite:///{tmp_path}/errands.db"


@pytest.fixture
def signup_app(embedded_url: str, make_app: AppFactory) -> tuple[Flask, Errands]:
    return build_signup_app(make_app, embedded_url)


def build_signup_app(make_app: AppFactory, url: str) -> tuple[Flask, Errands]:
    """An app as a user writes it: a task, a route and a CLI command that enqueue it."""
    app, errands = make_app(ERRANDS_URL=url)

    @errands.task(name="mail.welcome")
    def welcome(email: str) -> str:
        return f"sent to {email} from pid {os.getpid()}"

    @app.get("/ping")
    def ping() -> str:
        return "pong"

    @app.post("/signup/<email>")
    def signup(email: str) -> tuple[dict[str, str], int]:
        return {"job_id": welcome.delay(email).id}, 202

    @app.cli.command("invite")
    def invite() -> None:
        print(welcome.delay("cli@example.com").id)

    return app, errands


def test_nothing_runs_until_the_app_is_used(signup_app: tuple[Flask, Errands]) -> None:
    app, _ = signup_app
    assert embedded_worker(app) is None


def test_the_first_request_starts_the_worker(signup_app: tuple[Flask, Errands]) -> None:
    app, _ = signup_app
    assert embedded_worker(app) is None
    assert app.test_client().get("/ping").text == "pong"
    assert embedded_worker(app) is not None


def test_a_request_that_enqueues_gets_its_job_run(signup_app: tuple[Flask, Errands]) -> None:
    app, errands = signup_app
    response = app.test_client().post("/signup/ada@example.com")
    assert response.status_code == 202 and response.json is not None
    with app.app_context():
        job = errands.job(response.json["job_id"])
        assert job is not None
        assert job.result(timeout=30) == f"sent to ada@example.com from pid {os.getpid()}"


def test_the_first_delay_outside_a_cli_command_starts_the_worker(
    signup_app: tuple[Flask, Errands],
) -> None:
    app, errands = signup_app
    with app.app_context():
        job = errands.tasks["mail.welcome"].delay("shell@example.com")
        assert embedded_worker(app) is not None
        assert job.result(timeout=30).startswith("sent to shell@example.com")


def test_a_cli_command_that_enqueues_does_not_start_the_worker(
    signup_app: tuple[Flask, Errands],
) -> None:
    app, errands = signup_app
    result = app.test_cli_runner().invoke(args=["invite"])
    assert result.exit_code == 0, result.output
    job_id = result.output.strip()
    assert embedded_worker(app) is None
    with app.app_context():
        job = errands.job(job_id)
        assert job is not None
        assert job.status is JobStatus.QUEUED
    # The next web request starts the worker, which runs what the command left.
    app.test_client().get("/ping")
    with app.app_context():
        assert job.result(timeout=30).startswith("sent to cli@example.com")


def test_the_worker_is_not_embedded_when_the_config_says_so(make_app: AppFactory) -> None:
    app, errands = make_app(ERRANDS_EMBEDDED_WORKER=False)

    @errands.task
    def noop() -> None:
        pass

    @app.get("/")
    def index() -> str:
        noop.delay()
        return "ok"

    assert app.test_client().get("/").text == "ok"
    with app.app_context():
        noop.delay()
        assert embedded_worker(app) is None
        assert errands.backend.counts() == {("default", "queued"): 2}
        assert errands.drain() == 2


def test_the_worker_starts_once_per_process(signup_app: tuple[Flask, Errands]) -> None:
    app, errands = signup_app
    before = set(threading.enumerate())
    client = app.test_client()
    for n in range(3):
        assert client.post(f"/signup/u{n}@example.com").status_code == 202
    worker = embedded_worker(app)
    assert worker is not None
    with app.app_context():
        errands.tasks["mail.welcome"].delay("again@example.com")
        assert errands.start_worker() is worker
    assert embedded_worker(app) is worker
    dispatchers = [
        t for t in set(threading.enumerate()) - before if t.name == "errands-dispatcher"
    ]
    assert len(dispatchers) == 1


def test_stop_worker_stops_its_threads_cleanly(signup_app: tuple[Flask, Errands]) -> None:
    app, errands = signup_app
    before = set(threading.enumerate())
    app.test_client().post("/signup/ada@example.com")
    started = [t for t in set(threading.enumerate()) - before if t.name.startswith("errands-")]
    assert len([t for t in started if t.name.startswith("errands-worker-")]) == 4
    with app.app_context():
        errands.stop_worker()
    assert embedded_worker(app) is None
    wait_until(
        lambda: not any(t.is_alive() for t in started if t.name.startswith("errands-worker")),
        "the worker threads to end",
    )


def test_a_forked_child_starts_its_own_worker(make_app: AppFactory, tmp_path: Path) -> None:
    """As under gunicorn --preload: the parent's worker threads do not survive fork()."""
    app, errands = build_signup_app(make_app, f"sqlite:///{tmp_path}/errands.db")
    welcome = errands.tasks["mail.welcome"]
    with app.app_context():
        assert welcome.delay("parent@example.com").result(timeout=30).endswith(str(os.getpid()))
    parent_worker = embedded_worker(app)
    assert parent_worker is not None

    report = tmp_path / "child-report.txt"
    go_read, go_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            os.close(go_write)
            os.read(go_read, 1)  # wait until the parent's worker has stopped
            with app.app_context():
                result = welcome.delay("child@example.com").result(timeout=20)
            child_worker = embedded_worker(app)
            report.write_text(f"{result}\n{child_worker is not parent_worker}")
            code = 0 if result.endswith(f"pid {os.getpid()}") else 2
        except BaseException:
            report.write_text(traceback.format_exc())
        finally:
            os._exit(code)
    # The parent stops its own worker so the child's job can only run in the child.
    os.close(go_read)
    with app.app_context():
        errands.stop_worker()
    os.write(go_write, b"!")
    os.close(go_write)
    deadline = time.monotonic() + 30
    while (status := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung")
        time.sleep(0.01)
    detail = report.read_text() if report.exists() else "(no report)"
    assert os.waitstatus_to_exitcode(status[1]) == 0, detail
    assert detail.endswith("True"), detail


def test_a_forked_child_never_gives_a_job_its_parents_next_id(make_app: AppFactory) -> None:
    """Job ids come from a pool read ahead; a child must not draw the ids left in it."""
    app, errands = make_app(ERRANDS_URL="memory://", ERRANDS_EMBEDDED_WORKER=False)

    @errands.task(name="ids.noop")
    def noop() -> None:
        pass

    with app.app_context():
        noop.delay()  # the pool now holds ids read ahead
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: never return into pytest
            try:
                os.close(read)
                with app.app_context():
                    ids = " ".join(noop.delay().id for _ in range(3))
                os.write(write, ids.encode())
            finally:
                os._exit(0)
        os.close(write)
        parent_ids = {noop.delay().id for _ in range(3)}
        with os.fdopen(read) as pipe:
            child_ids = set(pipe.read().split())
        os.waitpid(pid, 0)
    assert len(child_ids) == 3
    assert not child_ids & parent_ids


def test_a_fork_while_another_thread_waits_on_the_database_gives_a_working_child(
    make_app: AppFactory, tmp_path: Path
) -> None:
    """A thread of the parent is inside the store (waiting for SQLite's write lock) at fork()."""
    db = tmp_path / "errands.db"
    app, errands = make_app(ERRANDS_URL=f"sqlite:///{db}", ERRANDS_EMBEDDED_WORKER=False)

    @errands.task
    def noop(n: int) -> int:
        return n

    # Another process's short write: it holds the lock for 0.4 s. (A connection of this
    # process would be copied into the child, still holding the lock, which no fork survives.)
    with app.app_context():
        errands.backend.counts()  # the tables exist before the other process locks them
    blocker = subprocess.Popen(
        app_command("hold_lock", str(db), "0.4"), stdout=subprocess.PIPE, text=True
    )
    assert blocker.stdout is not None and blocker.stdout.readline().strip() == "locked"

    def enqueue_in_a_thread() -> None:
        with app.app_context():
            noop.delay(1)

    waiting = threading.Thread(target=enqueue_in_a_thread)
    waiting.start()
    time.sleep(0.1)  # let it reach the database and wait there
    pid = os.fork()
    if pid == 0:
        signal.alarm(20)  # a hung child dies rather than outlive the test
        code = 1
        try:
            with app.app_context():
                job = noop.delay(2)
                errands.drain()
                code = 0 if job.result(timeout=10) == 2 else 2
        finally:
            os._exit(code)
    waiting.join(30)
    blocker.communicate(timeout=30)
    deadline = time.monotonic() + 30
    while (status := os.waitpid(pid, os.WNOHANG))[0] == 0:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung")
        time.sleep(0.01)
    assert os.waitstatus_to_exitcode(status[1]) == 0, "the child could not use the store"


def test_a_database_path_that_cannot_exist_is_a_clear_error_at_init(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a regular file where a folder should be")
    app = Flask("errands_bad_path", instance_path=str(tmp_path))
    app.config["ERRANDS_URL"] = f"sqlite:///{blocker}/errands.db"
    with pytest.raises(ConfigurationError) as caught:
        Errands(app)
    message = str(caught.value)
    assert str(blocker) in message
    assert "ERRANDS_URL" in message
    assert "errands" not in app.extensions


def test_the_default_store_is_a_sqlite_file_in_the_instance_folder(tmp_path: Path) -> None:
    app = Flask("errands_default", instance_path=str(tmp_path / "instance"))
    errands = Errands(app)

    @errands.task
    def noop() -> str:
        return "ok"

    with app.app_context():
        try:
            job = noop.delay()
            assert job.result(timeout=30) == "ok"
        finally:
            errands.stop_worker()
            errands.backend.close()
    assert (tmp_path / "instance" / "errands.db").is_file()
