"""``flask errands worker`` stopped as systemd, a terminal and the OOM killer stop it.

Every test runs the worker as a real process in a session of its own and
sends real signals: to the whole process group (as systemd's default
KillMode=control-group and Ctrl-C do), a deliberate second one later, and
SIGKILL to the supervisor.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from tests.apps import worker_app
from tests.helpers import free_port, wait_until
from tests.processes import Served, client_of, gone, lines


@pytest.fixture
def client(sqlite_url: str, tmp_path: Path) -> Iterator[Flask]:
    """An app in the test process on the worker's store, running nothing itself."""
    with client_of(worker_app.errands, sqlite_url, tmp_path) as app:
        yield app


@pytest.fixture
def served(tmp_path: Path) -> Iterator[list[Served]]:
    started: list[Served] = []
    yield started
    for process in started:
        process.close()


def worker(served: list[Served], tmp_path: Path, url: str, *args: str) -> Served:
    process = Served(tmp_path, url)
    process.flask("tests.apps.worker_app", "errands", "worker", *args)
    served.append(process)
    return process


def enqueue(app: Flask, *args: Any) -> str:
    with app.app_context():
        return str(worker_app.record.delay(*args).id)


def job(app: Flask, job_id: str) -> Any:
    with app.app_context():
        return worker_app.errands.job(job_id)


def started(log: Path, count: int) -> list[list[str]]:
    return wait_until(
        lambda: len(s := [r for r in lines(log) if r[0] == "start"]) >= count and s,
        f"{count} job(s) to start",
    )


POOLS = [pytest.param((), id="threads"), pytest.param(("--processes", "2"), id="processes")]


@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_the_whole_group_lets_running_jobs_finish(
    pool: tuple[str, ...],
    signum: int,
    sqlite_url: str,
    tmp_path: Path,
    client: Flask,
    served: list[Served],
) -> None:
    for attempt in range(2):
        process = worker(served, tmp_path, sqlite_url, *pool, "-c", "2", "--grace", "3")
        _signal_group_while_jobs_run(process, signum, client, tmp_path / f"runs-{attempt}.txt")


def _signal_group_while_jobs_run(process: Served, signum: int, client: Flask, log: Path) -> None:
    slots = 2 * (2 if "--processes" in process.command else 1)
    ids = [enqueue(client, str(log), 1.0) for _ in range(slots)]
    started(log, slots)
    process.signal_group(signum)
    wait_until(lambda: "finishing running jobs" in process.output(), "the stop request")
    process.signal_group(signum)  # another copy in the same burst
    assert process.proc is not None
    assert process.proc.wait(timeout=60) == 0, process.output()
    assert [job(client, i).status for i in ids] == ["succeeded"] * slots, process.output()
    assert sorted(r[0] for r in lines(log)) == ["end"] * slots + ["start"] * slots
    assert "stopping now" not in process.output()


@pytest.mark.parametrize("pool", POOLS)
def test_a_deliberate_second_ctrl_c_releases_running_jobs_at_once(
    pool: tuple[str, ...], sqlite_url: str, tmp_path: Path, client: Flask, served: list[Served]
) -> None:
    log = tmp_path / "runs.txt"
    process = worker(served, tmp_path, sqlite_url, *pool, "-c", "1", "--grace", "60")
    job_id = enqueue(client, str(log), 60.0)
    started(log, 1)
    process.signal_group(signal.SIGINT)
    wait_until(lambda: "finishing running jobs" in process.output(), "the first stop request")
    time.sleep(1.6)  # past the burst: this one is meant
    process.signal_group(signal.SIGINT)
    assert process.proc is not None
    assert process.proc.wait(timeout=30) == 1, process.output()
    stopped = job(client, job_id)
    assert (stopped.status, stopped.attempts, stopped.error) == ("queued", 0, None)
    assert "SIGINT again: stopping now" in process.output()


def test_children_of_a_killed_supervisor_finish_their_job_and_exit(
    sqlite_url: str, tmp_path: Path, client: Flask, served: list[Served]
) -> None:
    log = tmp_path / "runs.txt"
    process = worker(served, tmp_path, sqlite_url, "--processes", "2", "-c", "1")
    children = wait_until(
        lambda: len(p := re.findall(r"worker process (\d+) started", process.output())) == 2 and p,
        "two children",
    )
    job_id = enqueue(client, str(log), 2.0)
    started(log, 1)
    assert process.proc is not None
    os.kill(process.proc.pid, signal.SIGKILL)
    process.proc.wait(timeout=30)
    for pid in children:
        wait_until(partial(gone, int(pid)), f"child {pid} to exit")
    finished = job(client, job_id)
    assert (finished.status, finished.attempts) == ("succeeded", 1)
    assert process.output().count("is gone: finishing running jobs, then stopping") == 2


def test_a_worker_says_once_when_its_store_goes_and_comes_back_and_stops_at_once(
    tmp_path: Path, served: list[Served]
) -> None:
    pytest.importorskip("flask_errands.backends.redis")
    port = free_port()
    process = worker(served, tmp_path, f"redis://127.0.0.1:{port}/0")
    wait_until(lambda: "retrying until it is back" in process.output(), "the outage warning")
    redis = _redis_server(port)
    try:
        wait_until(lambda: _backs(process), "the worker to say the store is back")
    finally:
        redis.terminate()
        redis.wait(timeout=30)
    wait_until(lambda: len(_outages(process)) == 2, "the second outage warning")
    assert process.proc is not None
    asked = time.monotonic()
    process.proc.send_signal(signal.SIGTERM)
    assert process.proc.wait(timeout=30) == 0, process.output()
    print(f"stopped {time.monotonic() - asked:.2f}s after SIGTERM with the store down")
    output = process.output()
    assert "Traceback" not in output
    assert (_outages(process), _backs(process)) == (["worker", "worker"], ["worker"]), output
    assert all(str(port) in line for line in output.splitlines() if "until it is back" in line)


def _outages(process: Served) -> list[str]:
    return re.findall(r"errands (worker|scheduler)\b.*retrying until it is back", process.output())


def _backs(process: Served) -> list[str]:
    return re.findall(r"errands (worker|scheduler)\b.* reachable again", process.output())


def _redis_server(port: int) -> subprocess.Popen[bytes]:
    command = ["redis-server", "--bind", "127.0.0.1", "--appendonly", "no", "--save"]
    return subprocess.Popen([*command, "", "--port", str(port)], stdout=subprocess.DEVNULL)
