"""``flask errands …`` through Flask's CLI runner, and as real processes with real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from flask_errands import BackendUnavailable, chord
from flask_errands.status import STATUSES
from tests.apps import worker_app
from tests.helpers import free_port, require, wait_until
from tests.processes import client_of

ROOT = Path(__file__).resolve().parent.parent

# -- in-process, through the CLI runner -------------------------------------------


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Flask]:
    app = Flask("cli_test", instance_path=str(tmp_path))
    app.config.update(ERRANDS_URL=f"sqlite:///{tmp_path}/jobs.db", ERRANDS_EMBEDDED_WORKER=False)
    worker_app.errands.init_app(app)
    yield app
    app.extensions["errands"].backend.close()


@pytest.fixture
def cli(app: Flask) -> Callable[..., Any]:
    runner = app.test_cli_runner(mix_stderr=False) if _mixes() else app.test_cli_runner()

    def invoke(*args: str, input: str | None = None) -> Any:
        return runner.invoke(args=["errands", *args], input=input)

    return invoke


def _mixes() -> bool:
    import inspect

    from click.testing import CliRunner

    return "mix_stderr" in inspect.signature(CliRunner.__init__).parameters


def enqueue(app: Flask, task: Any, *args: Any, **options: Any) -> str:
    with app.app_context():
        return str(task.options(**options).delay(*args).id)


def drain(app: Flask) -> int:
    with app.app_context():
        return worker_app.errands.drain()


def test_status_counts_jobs_per_queue_and_state(app: Flask, cli: Callable[..., Any]) -> None:
    empty = cli("status")
    assert empty.exit_code == 0
    assert "(no jobs)" in empty.output
    enqueue(app, worker_app.noop, queue="emails")
    enqueue(app, worker_app.noop, queue="emails")
    enqueue(app, worker_app.boom)
    drain(app)
    enqueue(app, worker_app.noop, queue="emails")
    result = cli("status")
    assert result.exit_code == 0
    lines = {line.split()[0]: line.split()[1:] for line in result.output.splitlines() if line}
    assert lines["queue"] == [s.value for s in STATUSES]
    assert lines["emails"] == ["0", "1", "0", "0", "2", "0", "0"]
    assert lines["default"] == ["0", "0", "0", "0", "0", "1", "0"]
    assert all(len(line) <= 80 for line in result.output.splitlines())
    data = json.loads(cli("status", "--json").output)
    assert data["queues"] == {"default": {"failed": 1}, "emails": {"queued": 1, "succeeded": 2}}


def test_jobs_lists_newest_first_with_filters(app: Flask, cli: Callable[..., Any]) -> None:
    first = enqueue(app, worker_app.noop)
    failing = enqueue(app, worker_app.boom, queue="other")
    drain(app)
    last = enqueue(app, worker_app.noop)
    table = cli("jobs").output.splitlines()
    assert [line.split()[0] for line in table[1:]] == [last, failing, first]
    assert all(len(line) <= 80 for line in table)
    failed = cli("jobs", "--state", "failed").output
    assert failing in failed and first not in failed
    assert cli("jobs", "--queue", "other", "--json").output.count('"id"') == 1
    assert cli("jobs", "--state", "nonsense").exit_code == 2


def test_show_prints_everything_including_the_traceback(
    app: Flask, cli: Callable[..., Any]
) -> None:
    job_id = enqueue(app, worker_app.boom, "it broke")
    drain(app)
    result = cli("show", job_id)
    assert result.exit_code == 0
    assert "status:    failed" in result.output
    assert "error:     ValueError: it broke" in result.output
    assert 'args:      ["it broke"]' in result.output
    assert "Traceback (most recent call last)" in result.output
    data = json.loads(cli("show", job_id, "--json").output)
    assert data["status"] == "failed" and data["args"] == ["it broke"]
    assert "ValueError: it broke" in data["traceback"]


@pytest.mark.parametrize("command", ["show", "retry", "cancel"])
def test_an_unknown_job_id_is_one_line_and_exit_1(cli: Callable[..., Any], command: str) -> None:
    result = cli(command, "no-such-job")
    assert result.exit_code == 1
    assert _stderr(result).strip() == "Error: no job with id no-such-job"


def test_retry_reruns_a_failed_job_under_its_id(app: Flask, cli: Callable[..., Any]) -> None:
    job_id = enqueue(app, worker_app.boom)
    live = enqueue(app, worker_app.noop, delay=3600)
    drain(app)
    result = cli("retry", job_id)
    assert result.exit_code == 0
    with app.app_context():
        job = worker_app.errands.job(job_id)
        assert job is not None and job.status == "queued" and job.attempts == 0
    assert cli("retry", live).exit_code == 1
    assert cli("retry").exit_code == 2


def test_retry_failed_requeues_every_failed_job_of_a_queue(
    app: Flask, cli: Callable[..., Any]
) -> None:
    ids = [enqueue(app, worker_app.boom, queue="a") for _ in range(3)]
    other = enqueue(app, worker_app.boom, queue="b")
    drain(app)
    result = cli("retry", "--failed", "--queue", "a")
    assert result.exit_code == 0 and "Queued 3 failed job(s) again." in result.output
    assert {job_of(app, i).status for i in ids} == {"queued"}
    assert job_of(app, other).status == "failed"


def test_cancel_a_queued_job(app: Flask, cli: Callable[..., Any]) -> None:
    job_id = enqueue(app, worker_app.noop)
    assert cli("cancel", job_id).exit_code == 0
    assert drain(app) == 0
    assert "status:    cancelled" in cli("show", job_id).output
    assert cli("cancel", job_id).exit_code == 1


def test_purge_asks_first_then_deletes_by_state(app: Flask, cli: Callable[..., Any]) -> None:
    failed = enqueue(app, worker_app.boom)
    succeeded = enqueue(app, worker_app.noop)
    drain(app)
    waiting = enqueue(app, worker_app.noop)
    refused = cli("purge", "--state", "failed", input="n\n")
    assert refused.exit_code == 1
    assert cli("show", failed).exit_code == 0
    assert "Deleted 0 job(s)." in cli("purge", "--older-than", "1d", "--yes").output
    result = cli("purge", "--state", "failed", input="y\n")
    assert result.exit_code == 0 and "Deleted 1 job(s)." in result.output
    assert cli("show", failed).exit_code == 1
    assert "Deleted 1 job(s)." in cli("purge", "--yes").output
    assert cli("show", succeeded).exit_code == 1
    assert cli("show", waiting).exit_code == 0
    assert cli("purge", "--older-than", "soon", "--yes").exit_code == 2


def test_enqueue_by_task_name(app: Flask, cli: Callable[..., Any], tmp_path: Path) -> None:
    runs = tmp_path / "runs.txt"
    result = cli("enqueue", "record", json.dumps([str(runs)]), "--queue", "files")
    assert result.exit_code == 0
    job_id = result.output.strip()
    with app.app_context():
        job = worker_app.errands.job(job_id)
        assert job is not None and job.queue == "files" and job.args == (str(runs),)
    assert drain(app) == 1
    assert runs.read_text().startswith("start")
    unknown = cli("enqueue", "recrd")
    assert unknown.exit_code == 1 and "no task named 'recrd'" in _stderr(unknown)
    assert cli("enqueue", "record", "[not json").exit_code == 2
    wrong = cli("enqueue", "record", '{"nope": 1}')
    assert wrong.exit_code == 1 and "record.delay()" in _stderr(wrong)


def test_drain_runs_due_jobs_and_exits_1_if_any_failed(
    app: Flask, cli: Callable[..., Any]
) -> None:
    for _ in range(3):
        enqueue(app, worker_app.noop)
    ok = cli("drain")
    assert ok.exit_code == 0 and "Ran 3 job(s), 0 failed." in ok.output
    enqueue(app, worker_app.boom)
    enqueue(app, worker_app.noop, queue="elsewhere")
    bad = cli("drain", "-q", "default")
    assert bad.exit_code == 1 and "Ran 1 job(s), 1 failed." in bad.output


def test_drain_counts_a_failed_attempt_that_will_retry_as_failed(
    app: Flask, cli: Callable[..., Any]
) -> None:
    enqueue(app, worker_app.boom, retries=2)
    result = cli("drain")
    assert result.exit_code == 1
    assert "Ran 1 job(s), 1 failed (1 will retry)." in result.output


def test_retry_without_an_id_says_what_to_give(cli: Callable[..., Any]) -> None:
    result = cli("retry")
    assert result.exit_code == 2
    assert "give the JOB_ID of a finished job, or --failed" in _stderr(result)
    assert "not both" in _stderr(cli("retry", "abc", "--failed"))


def test_duration_options_show_a_duration_metavar(cli: Callable[..., Any]) -> None:
    assert "--older-than DURATION" in cli("purge", "--help").output
    assert "--delay DURATION" in cli("enqueue", "--help").output
    assert "PARSE_DURATION" not in cli("purge", "--help").output


def test_blocked_steps_are_listed_and_show_what_they_wait_for(
    app: Flask, cli: Callable[..., Any], tmp_path: Path
) -> None:
    with app.app_context():
        header = [worker_app.echo.s(1), worker_app.echo.options(queue="later").s(2)]
        flow = chord(header, worker_app.gather.s(str(tmp_path / "gathered"))).delay()
    blocked = cli("jobs", "--state", "blocked").output.splitlines()
    assert [line.split()[:2] for line in blocked[1:]] == [[flow.id, "blocked"]]
    assert "waits for: 2 of its 2 upstream steps to succeed" in cli("show", flow.id).output
    with app.app_context():
        assert worker_app.errands.drain(queues=["default"]) == 1
    shown = cli("show", flow.id).output.splitlines()
    assert shown[2:4] == ["status:    blocked", "waits for: 1 of its 2 upstream steps to succeed"]
    data = json.loads(cli("show", flow.id, "--json").output)
    assert (data["upstream_steps"], data["waiting_for"]) == (2, 1)
    drain(app)
    assert "waits for" not in cli("show", flow.id).output
    assert json.loads(cli("show", flow.id, "--json").output)["waiting_for"] == 0


def test_show_prints_no_result_for_a_cancelled_job(app: Flask, cli: Callable[..., Any]) -> None:
    job_id = enqueue(app, worker_app.noop)
    with app.app_context():
        worker_app.errands.job(job_id).cancel()  # type: ignore[union-attr]
    shown = cli("show", job_id)
    assert shown.exit_code == 0 and "cancelled" in shown.output
    assert "result:" not in shown.output


def test_a_store_that_is_down_is_one_error_line_and_exit_1(tmp_path: Path) -> None:
    app = Flask("down", instance_path=str(tmp_path))
    app.config.update(ERRANDS_URL=f"redis://127.0.0.1:{free_port()}/0")
    worker_app.errands.init_app(app)
    runner = app.test_cli_runner(mix_stderr=False) if _mixes() else app.test_cli_runner()
    result = runner.invoke(args=["errands", "status"])
    assert result.exit_code == 1
    assert _stderr(result).startswith("Error: ")
    assert "Traceback" not in _stderr(result) and len(_stderr(result).splitlines()) <= 2
    traced = runner.invoke(args=["errands", "--traceback", "status"])
    assert traced.exit_code != 0 and isinstance(traced.exception, BackendUnavailable)


def test_worker_rejects_bad_options(cli: Callable[..., Any]) -> None:
    assert cli("worker", "-c", "0").exit_code == 2
    assert cli("worker", "--processes", "0").exit_code == 2


def _stderr(result: Any) -> str:
    try:
        return str(result.stderr)
    except ValueError:
        return str(result.output)


# -- as real processes --------------------------------------------------------------


class WorkerProcess:
    """``flask errands …`` in a subprocess, against a given backend URL."""

    def __init__(self, url: str, tmp_path: Path, **config: Any) -> None:
        self.env = {
            **os.environ,
            "FLASK_ERRANDS_URL": url,
            "FLASK_ERRANDS_LEASE_SECONDS": "2",
            "WORKER_APP_INSTANCE": str(tmp_path),
            "PYTHONUNBUFFERED": "1",
        }
        self.env.update({f"FLASK_{k}": json.dumps(v) for k, v in config.items()})
        self.log = tmp_path / f"worker-{time.monotonic_ns()}.log"

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "flask", "--app", "tests.apps.worker_app", "errands", *args]

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.command(*args),
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def start(self, *args: str) -> subprocess.Popen[str]:
        with open(self.log, "w") as log:
            return subprocess.Popen(
                self.command("worker", *args),
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
            )

    def output(self) -> str:
        return self.log.read_text()


def runs(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def client_app(sqlite_url: str, tmp_path: Path) -> Iterator[Flask]:
    """An app in the test process that enqueues to the worker's backend, running nothing."""
    with client_of(worker_app.errands, sqlite_url, tmp_path) as app:
        yield app


def job_of(app: Flask, job_id: str) -> Any:
    with app.app_context():
        return worker_app.errands.job(job_id)


def test_every_command_works_as_a_real_process(
    sqlite_url: str, tmp_path: Path, client_app: Flask
) -> None:
    flask = WorkerProcess(sqlite_url, tmp_path)
    made = flask.run("enqueue", "boom", '["real"]')
    assert made.returncode == 0, made.stderr
    job_id = made.stdout.strip()
    assert flask.run("drain").returncode == 1
    assert "default" in flask.run("status").stdout
    assert job_id in flask.run("jobs").stdout
    assert "ValueError: real" in flask.run("show", job_id).stdout
    assert flask.run("retry", job_id).returncode == 0
    assert flask.run("cancel", job_id).returncode == 0
    assert "Deleted 1 job(s)." in flask.run("purge", "--yes").stdout
    missing = flask.run("show", job_id)
    assert missing.returncode == 1
    assert missing.stderr.strip() == f"Error: no job with id {job_id}"


def test_sigterm_lets_a_running_job_finish_then_exits_0(
    sqlite_url: str, tmp_path: Path, client_app: Flask
) -> None:
    log = tmp_path / "runs.txt"
    worker = WorkerProcess(sqlite_url, tmp_path)
    proc = worker.start("-c", "2")
    job_id = enqueue(client_app, worker_app.record, str(log), 2.0)
    wait_until(lambda: runs(log), "the job to start")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, worker.output()
    assert [r[0] for r in runs(log)] == ["start", "end"]
    job = job_of(client_app, job_id)
    assert job.status == "succeeded" and job.result() == 1
    assert "SIGTERM" in worker.output()


def test_a_worker_stopped_by_sigterm_is_no_longer_listed(
    shared_backend_url: str, tmp_path: Path
) -> None:
    worker = WorkerProcess(shared_backend_url, tmp_path)
    with (
        client_of(worker_app.errands, shared_backend_url, tmp_path) as client,
        client.app_context(),
    ):
        admin = worker_app.errands.admin
        proc = worker.start("-c", "4")
        wait_until(lambda: admin.workers(), "the worker to register")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, worker.output()
        assert admin.workers() == [], worker.output()


def test_a_job_still_running_at_the_grace_deadline_goes_back_to_its_queue(
    sqlite_url: str, tmp_path: Path, client_app: Flask
) -> None:
    log = tmp_path / "runs.txt"
    worker = WorkerProcess(sqlite_url, tmp_path)
    proc = worker.start("--grace", "0.5")
    job_id = enqueue(client_app, worker_app.record, str(log), 30.0)
    wait_until(lambda: runs(log), "the job to start")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, worker.output()
    job = job_of(client_app, job_id)
    assert (job.status, job.attempts, job.error) == ("queued", 0, None)


def test_a_killed_child_is_replaced_and_its_job_runs_again(
    sqlite_url: str, tmp_path: Path, client_app: Flask
) -> None:
    log = tmp_path / "runs.txt"
    worker = WorkerProcess(sqlite_url, tmp_path)
    proc = worker.start("--processes", "2", "-c", "1")
    try:
        job_id = enqueue(client_app, worker_app.record, str(log), 1.0)
        first = wait_until(lambda: runs(log), "the job to start")[0]
        os.kill(int(first[4]), signal.SIGKILL)
        job = wait_until(
            lambda: (j := job_of(client_app, job_id)).status == "succeeded" and j,
            "the job to run again after its lease",
        )
        assert job.attempts == 2
        starts = [r for r in runs(log) if r[0] == "start"]
        assert [r[3] for r in starts] == ["1", "2"]
        assert starts[1][4] != first[4]
        assert "replacing it" in worker.output()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, worker.output()


def test_a_job_that_ignores_its_timeout_is_killed_with_its_child(
    sqlite_url: str, tmp_path: Path, client_app: Flask
) -> None:
    worker = WorkerProcess(sqlite_url, tmp_path)
    proc = worker.start("--processes", "2", "-c", "1")
    try:
        stuck = enqueue(client_app, worker_app.stuck, 60.0)
        job = wait_until(
            lambda: (j := job_of(client_app, stuck)).status == "failed" and j, "the timeout"
        )
        assert job.error == "TimeoutError: job exceeded its timeout of 1s"
        wait_until(
            lambda: "exited (3); replacing it" in worker.output(), "the child to be replaced"
        )
        after = enqueue(client_app, worker_app.noop)
        wait_until(lambda: job_of(client_app, after).status == "succeeded", "work to go on")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, worker.output()


def test_live_workers_are_listed_by_status(
    sqlite_url: str, tmp_path: Path, client_app: Flask
) -> None:
    worker = WorkerProcess(sqlite_url, tmp_path)
    proc = worker.start("-q", "emails,reports", "-c", "3")
    try:
        status = wait_until(
            lambda: (out := worker.run("status", "--json").stdout) and json.loads(out)["workers"],
            "the worker to register",
        )
        [info] = status
        assert info["pid"] == proc.pid
        assert (info["queues"], info["concurrency"], info["kind"]) == (
            ["emails", "reports"],
            3,
            "worker",
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    assert json.loads(worker.run("status", "--json").stdout)["workers"] == []


def test_a_worker_started_while_redis_is_down_waits_and_then_works(tmp_path: Path) -> None:
    require("redis")
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    worker = WorkerProcess(url, tmp_path)
    proc = worker.start()
    server = None
    try:
        wait_until(lambda: "retrying" in worker.output(), "the worker to report the server down")
        complaint = next(line for line in worker.output().splitlines() if "retrying" in line)
        assert "Traceback" not in worker.output()
        assert str(port) in complaint or "Redis" in complaint
        server = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
        )
        client = Flask("client", instance_path=str(tmp_path))
        client.config.update(ERRANDS_URL=url)
        worker_app.errands.init_app(client)
        job_id = wait_until(lambda: _try_enqueue(client), "Redis to accept jobs")
        wait_until(lambda: job_of(client, job_id).status == "succeeded", "the worker to run it")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        if server is not None:
            server.terminate()
            server.wait(timeout=10)


def _try_enqueue(app: Flask) -> str | None:
    try:
        return enqueue(app, worker_app.noop)
    except Exception:
        return None


def test_schedules_shows_next_run_in_zone_and_utc_and_last_outcome(tmp_path: Path) -> None:
    from flask_errands import Errands
    from flask_errands.scheduler import Scheduler

    app = Flask("schedules_test", instance_path=str(tmp_path))
    app.config.update(ERRANDS_URL=f"sqlite:///{tmp_path}/s.db", ERRANDS_EMBEDDED_WORKER=False)
    errands = Errands()

    @errands.periodic(cron="0 3 * * *", timezone="Europe/Paris", name="nightly")
    def nightly() -> None: ...

    @errands.periodic(every=2, name="often")
    def often() -> str:
        return "done"

    errands.init_app(app)
    runner = app.test_cli_runner()
    listing = runner.invoke(args=["errands", "schedules"])
    assert listing.exit_code == 0
    lines = listing.output.splitlines()
    assert lines[0].split() == ["nightly", "cron", "0", "3", "*", "*", "*", "(Europe/Paris)"]
    assert lines[1].strip().startswith("next: ") and "03:00:00 CET (02:00:00 UTC)" in lines[1]
    assert lines[2].split()[:3] == ["often", "every", "2s"]
    assert "last:" not in listing.output
    with app.app_context():
        scheduler = Scheduler(app.extensions["errands"])
        past = time.time() - 10
        scheduler.tick(past)
        fired = scheduler.tick(past + 2.5)
        assert len(fired) == 1
        assert errands.drain() == 1
    data = json.loads(runner.invoke(args=["errands", "schedules", "--json"]).output)
    often_info = next(d for d in data if d["name"] == "often")
    assert often_info["last_status"] == "succeeded"
    assert "succeeded" in runner.invoke(args=["errands", "schedules"]).output
    app.extensions["errands"].backend.close()


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_the_example_app_runs_its_jobs_in_a_worker_process(tmp_path: Path, store: str) -> None:
    """`flask --app examples.app errands worker`, as the README says, on SQLite and Redis."""
    if store == "redis":
        require("redis")
        url = f"redis://127.0.0.1:6379/0?prefix=example-{time.monotonic_ns()}:"
    else:
        url = f"sqlite:///{tmp_path}/example.db"
    env = {
        **os.environ,
        "FLASK_ERRANDS_URL": url,
        "FLASK_ERRANDS_EMBEDDED_WORKER": "false",
        "FLASK_SLOW_SECONDS": "0.05",
    }
    worker = subprocess.Popen(
        [sys.executable, "-m", "flask", "--app", "examples.app", "errands", "worker"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        from examples.app import create_app

        os.environ.update({k: env[k] for k in ("FLASK_ERRANDS_URL", "FLASK_SLOW_SECONDS")})
        os.environ["FLASK_ERRANDS_EMBEDDED_WORKER"] = "false"
        try:
            web = create_app()
        finally:
            for key in (
                "FLASK_ERRANDS_URL",
                "FLASK_SLOW_SECONDS",
                "FLASK_ERRANDS_EMBEDDED_WORKER",
            ):
                os.environ.pop(key, None)
        client = web.test_client()
        reply = client.post("/reports", data={"days": 3})
        assert reply.status_code == 202
        status_url = reply.get_json()["status_url"]
        wait_until(
            lambda: client.get(status_url).get_json()["status"] == "succeeded",
            "the worker process to run the report",
        )
        assert client.get(status_url).get_json()["result"]["days"] == 3
        assert web.extensions["errands"].worker is None  # the web process ran nothing
    finally:
        worker.send_signal(signal.SIGTERM)
        output = worker.communicate(timeout=30)[0]
    assert worker.returncode == 0, output
    assert "build_report" in output and "succeeded" in output
    if store == "redis":
        web.extensions["errands"].backend.purge()


def test_a_worker_on_memory_warns_that_it_shares_nothing(tmp_path: Path) -> None:
    worker = WorkerProcess("memory://", tmp_path)
    proc = worker.start()
    try:
        wait_until(lambda: "Warning: memory://" in worker.output(), "the warning")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


# -- pausing, resuming and changing ----------------------------------------------------


def test_queue_pause_and_resume_show_in_status(app: Flask, cli: Callable[..., Any]) -> None:
    paused = cli("queue", "pause", "emails")
    assert paused.exit_code == 0, paused.output
    assert "Queue emails paused" in paused.output
    enqueue(app, worker_app.noop, queue="emails")
    assert drain(app) == 0
    status = cli("status")
    [row] = [line for line in status.output.splitlines() if line.startswith("emails")]
    assert row.split() == ["emails", "‖", "0", "1", "0", "0", "0", "0", "0"]
    assert "no worker claims from: emails" in status.output
    assert json.loads(cli("status", "--json").output)["paused_queues"] == ["emails"]
    assert cli("queue", "resume", "emails").output.strip() == "Queue emails resumed."
    assert drain(app) == 1
    assert "paused" not in cli("status").output
    assert cli("queue", "pause", "").exit_code == 1


def test_schedule_verbs_pause_resume_run_and_set(tmp_path: Path) -> None:
    from flask_errands import Errands

    app = Flask("schedule_verbs", instance_path=str(tmp_path))
    app.config.update(ERRANDS_URL=f"sqlite:///{tmp_path}/s.db", ERRANDS_EMBEDDED_WORKER=False)
    errands = Errands(app)

    @errands.periodic(cron="0 3 * * *", timezone="Europe/Paris", name="nightly")
    def nightly() -> str:
        return "done"

    runner = app.test_cli_runner()

    def run(*args: str) -> Any:
        return runner.invoke(args=["errands", "schedule", *args])

    try:
        assert run("pause", "nightly").output.strip() == "Schedule nightly paused."
        assert "PAUSED" in runner.invoke(args=["errands", "schedules"]).output
        job_id = run("run", "nightly").output.strip()
        with app.app_context():
            assert errands.drain() == 1
            ran = errands.job(job_id)
            assert ran is not None and ran.result() == "done"
        changed = run("set", "nightly", "--cron", "30 4 * * *")
        assert changed.exit_code == 0, changed.output
        assert "cron 30 4 * * * (Europe/Paris); next run " in changed.output
        assert "04:30:00 CE" in changed.output
        assert "every 5m" not in run("set", "nightly", "--every", "5m").output  # shown in seconds
        assert json.loads(runner.invoke(args=["errands", "schedules", "--json"]).output)[0][
            "every"
        ] == pytest.approx(300.0)
        resumed = run("resume", "nightly")
        assert resumed.output.startswith("Schedule nightly resumed; next run ")
        bad = run("set", "nightly", "--cron", "0 25 * * *")
        assert bad.exit_code == 1 and "hour must be 0-23, got 25" in bad.output
        assert run("set", "nightly").exit_code == 2  # neither --every nor --cron
        missing = run("pause", "nope")
        assert missing.exit_code == 1 and "no schedule named 'nope'" in missing.output
    finally:
        app.extensions["errands"].backend.close()


def test_a_worker_process_claims_nothing_from_a_paused_queue(
    sqlite_url: str, tmp_path: Path, client_app: Flask
) -> None:
    flask = WorkerProcess(sqlite_url, tmp_path)
    assert flask.run("queue", "pause", "emails").returncode == 0
    ledger = tmp_path / "runs.txt"
    held = enqueue(client_app, worker_app.record, str(ledger), 0.0, "held", queue="emails")
    proc = flask.start("-c", "2")
    try:
        enqueue(client_app, worker_app.record, str(ledger), 0.0, "free")
        wait_until(lambda: len(runs(ledger)) == 2, "the job of the other queue to run")
        time.sleep(1.0)  # idle-wait turns: the paused queue's job stays where it is
        assert [run[1] for run in runs(ledger)] == ["free", "free"]
        assert job_of(client_app, held).status == "queued"
        assert flask.run("queue", "resume", "emails").returncode == 0
        wait_until(lambda: len(runs(ledger)) == 4, "the resumed queue's job to run")
        assert job_of(client_app, held).refresh().status == "succeeded"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, flask.output()
