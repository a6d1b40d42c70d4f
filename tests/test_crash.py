"""Real processes sharing one SQLite file, killed with real signals.

Each process runs ``tests/apps/crash_web.py``: a Flask app with flask-errands on a SQLite
file and its embedded worker started, as a web process would have it. The
task appends the number it was given to a file of its own process, so the
test can count how many times each job really ran.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from flask import Flask

import flask_errands
from flask_errands import Errands, JobStatus
from tests.helpers import app_command, wait_until

AppFactory = Callable[..., tuple[Flask, Errands]]


class Processes:
    """Starts web processes on one SQLite file and reads what their tasks recorded."""

    def __init__(self, tmp_path: Path) -> None:
        self.db = tmp_path / "errands.db"
        self.runs = tmp_path / "runs"
        self.runs.mkdir()
        self.logs = tmp_path / "logs"
        self.logs.mkdir()
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, lease_seconds: float = 30) -> subprocess.Popen[bytes]:
        """Start one web process and wait until its worker is running."""
        env = dict(os.environ)
        # The children import the same flask_errands as this test, wherever it lives.
        package_root = str(Path(flask_errands.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        log = open(self.logs / f"{len(self.started)}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            app_command("crash_web", str(self.db), str(self.runs), str(lease_seconds)),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.started.append(proc)
        wait_until(
            lambda: (self.runs / f"ready-{proc.pid}").exists() or proc.poll() is not None,
            "a web process to start",
        )
        assert proc.poll() is None, self.output()
        return proc

    def runs_by_process(self) -> dict[int, list[int]]:
        """The job numbers each process ran (or began to run), by pid."""
        runs = {}
        for path in self.runs.glob("runs-*.txt"):
            pid = int(path.stem.split("-")[1])
            runs[pid] = [int(line) for line in path.read_text().split()]
        return runs

    def run_counts(self) -> collections.Counter[int]:
        return collections.Counter(n for ns in self.runs_by_process().values() for n in ns)

    def output(self) -> str:
        return "\n".join(
            f"--- process {path.stem}:\n{path.read_text(errors='replace')}"
            for path in sorted(self.logs.glob("*.log"))
        )

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
        """Send ``sig`` and wait for the process to end; return its exit code."""
        if proc.poll() is None:
            proc.send_signal(sig)
        try:
            return proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail(f"process {proc.pid} ignored signal {sig}:\n{self.output()}")

    def cleanup(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    yield procs
    procs.cleanup()


@pytest.fixture
def enqueuer(make_app: AppFactory, processes: Processes) -> Iterator[tuple[Flask, Errands]]:
    """The test's own app on the same file: it enqueues and looks, and never runs a job."""
    app, errands = make_app(ERRANDS_URL=f"sqlite:///{processes.db}", ERRANDS_EMBEDDED_WORKER=False)

    @errands.task(name="crash.record")
    def record(n: int, seconds: float) -> int:
        raise AssertionError("jobs run in the web processes only")

    with app.app_context():
        yield app, errands


def by_status(errands: Errands) -> dict[str, set[int]]:
    """Job numbers per status, as the store has them now."""
    found: dict[str, set[int]] = collections.defaultdict(set)
    for record in errands.backend.list_jobs(limit=100_000):
        found[record.status].add(json.loads(record.payload)["args"][0])
    return found


def test_a_killed_process_loses_nothing_and_reruns_only_what_was_in_flight(
    processes: Processes, enqueuer: tuple[Flask, Errands]
) -> None:
    _, errands = enqueuer
    jobs = errands.tasks["crash.record"].delay_many([(n, 0.2) for n in range(40)])

    first = processes.start(lease_seconds=1)  # short, so the restart re-delivers soon
    wait_until(lambda: sum(processes.run_counts().values()) >= 8, "some jobs to start")
    processes.stop(first, signal.SIGKILL)
    at_kill = by_status(errands)
    assert len(at_kill["succeeded"]) < 40, "the process finished everything before the kill"

    second = processes.start(lease_seconds=1)
    wait_until(
        lambda: errands.backend.counts() == {("default", "succeeded"): 40},
        "all 40 jobs to succeed after the restart",
        timeout=60,
    )
    assert processes.stop(second) == 0, processes.output()

    counts = processes.run_counts()
    assert sorted(counts) == list(range(40)), "every job ran"
    ran_twice = {n for n, times in counts.items() if times > 1}
    assert ran_twice <= at_kill["running"], "only jobs in flight at the kill ran again"
    assert max(counts.values()) <= 2
    assert [job.result(timeout=30) for job in jobs] == list(range(40))
    # A job in flight was delivered again when its lease ran out; no other was.
    assert [job.attempts for job in jobs] == [
        2 if n in at_kill["running"] else 1 for n in range(40)
    ]


def test_two_processes_share_2000_jobs_and_run_each_exactly_once(
    processes: Processes, enqueuer: tuple[Flask, Errands]
) -> None:
    _, errands = enqueuer
    workers = [processes.start(), processes.start()]
    errands.tasks["crash.record"].delay_many([(n, 0) for n in range(2000)])
    wait_until(
        lambda: errands.backend.counts() == {("default", "succeeded"): 2000},
        "2,000 jobs to succeed",
        timeout=120,
    )
    for proc in workers:
        assert processes.stop(proc) == 0, processes.output()

    counts = processes.run_counts()
    assert sorted(counts) == list(range(2000))
    assert set(counts.values()) == {1}, [n for n, times in counts.items() if times > 1]
    per_process = processes.runs_by_process()
    assert sorted(per_process) == sorted(proc.pid for proc in workers)
    assert all(per_process.values()), "both processes ran jobs"


def test_sigterm_lets_the_running_job_finish_before_the_process_ends(
    processes: Processes, enqueuer: tuple[Flask, Errands]
) -> None:
    _, errands = enqueuer
    web = processes.start()
    job = errands.tasks["crash.record"].delay(7, 1.5)
    wait_until(lambda: processes.run_counts() == {7: 1}, "the job to start")
    assert processes.stop(web, signal.SIGTERM) == 0, processes.output()
    assert job.refresh().status is JobStatus.SUCCEEDED, processes.output()
    assert job.result() == 7
    assert job.attempts == 1
