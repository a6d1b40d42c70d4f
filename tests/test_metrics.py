"""Prometheus metrics: the whole deployment's figures, read from the store at each scrape."""

from __future__ import annotations

import base64
import collections
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from werkzeug.security import generate_password_hash

from flask_errands import BasicAuth, Errands, JobStatus
from flask_errands.backends.base import TIMING_BOUNDS
from tests.apps import worker_app
from tests.helpers import require, wait_until
from tests.processes import client_of
from tests.test_cli import WorkerProcess

parser = require("prometheus_client.parser")

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(client: Any, **headers: str) -> Samples:
    """Every sample of a scrape, parsed by prometheus_client's own parser."""
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.content_type.startswith("text/plain; version=")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in parser.text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
def scraped_app(shared_backend_url: str, tmp_path: Path) -> Iterator[Flask]:
    """An app in the test process on the workers' store, serving metrics, running no job."""
    with client_of(worker_app.errands, shared_backend_url, tmp_path, "scraped") as app:
        worker_app.errands.init_metrics(app, authorize=lambda: "viewer")
        yield app


def test_a_process_that_ran_no_job_shows_what_two_worker_processes_did(
    shared_backend_url: str, tmp_path: Path, scraped_app: Flask
) -> None:
    ledger = tmp_path / "runs.txt"
    client = scraped_app.test_client()
    with scraped_app.app_context():
        record, boom, admin = worker_app.record, worker_app.boom, worker_app.errands.admin
        boom.options(queue="risky").delay_many([(("no",), {})] * 2)
        boom.options(queue="risky", retries=1, retry_delay=0).delay("twice")

    before = scrape(client)
    assert value(before, "errands_jobs_enqueued_total", task="boom", queue="risky") == 3
    assert value(before, "errands_queue_jobs", queue="risky", status="queued") == 3
    assert value(before, "errands_workers") == 0
    assert not any(name == "errands_jobs_finished_total" for name, _ in before)

    workers = [WorkerProcess(shared_backend_url, tmp_path) for _ in range(2)]
    procs: list[subprocess.Popen[str]] = []
    try:
        procs = [worker.start("-c", "2") for worker in workers]
        with scraped_app.app_context():
            wait_until(lambda: len(admin.workers()) == 2, "both workers to register")
            # Enqueued once both wait for work, so both take some.
            record.delay_many([((str(ledger), 0.2, str(n)), {}) for n in range(12)])
            wait_until(
                lambda: (
                    not admin.due()
                    and all(counts[JobStatus.RUNNING] == 0 for counts in admin.counts().values())
                ),
                "every job to end",
            )
        during = scrape(client)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc, worker in zip(procs, workers, strict=True):
            assert proc.wait(timeout=30) == 0, worker.output()

    lines = [line.split() for line in ledger.read_text().splitlines()]
    ends = collections.Counter(pid for kind, *_, pid in lines if kind == "end")
    assert len(ends) == 2, f"both workers ran jobs: {ends}"
    assert value(during, "errands_workers") == 2
    assert value(during, "errands_queue_jobs", queue="default", status="queued") == 0
    assert value(during, "errands_queue_jobs", queue="risky", status="running") == 0

    after = scrape(client)  # the workers are gone; their figures stay
    finished = "errands_jobs_finished_total"
    assert value(after, finished, task="record", queue="default", status="succeeded") == sum(
        ends.values()
    )
    assert value(after, finished, task="boom", queue="risky", status="failed") == 3
    assert value(after, finished, task="boom", queue="risky", status="retried") == 1
    assert value(after, "errands_jobs_enqueued_total", task="record", queue="default") == 12
    for task, queue, attempts in (("record", "default", 12), ("boom", "risky", 4)):
        labels = {"task": task, "queue": queue}
        for timing in ("duration", "wait"):
            name = f"errands_job_{timing}_seconds"
            assert value(after, f"{name}_count", **labels) == attempts
            assert value(after, f"{name}_bucket", le="+Inf", **labels) == attempts
            assert value(after, f"{name}_bucket", le="0.005", **labels) <= attempts
    record_seconds = value(
        after, "errands_job_duration_seconds_sum", task="record", queue="default"
    )
    assert 12 * 0.1 <= record_seconds < 12 * 5
    buckets = "errands_job_duration_seconds_bucket"
    assert value(after, buckets, le="0.1", task="record", queue="default") == 0  # slept 0.2 s
    assert len({labels for name, labels in after if name == buckets}) == 2 * (
        len(TIMING_BOUNDS) + 1
    )


@pytest.fixture
def memory_app(tmp_path: Path) -> Iterator[tuple[Flask, Errands]]:
    app = Flask("metrics_auth", instance_path=str(tmp_path))
    app.config.update(ERRANDS_URL="memory://", ERRANDS_EMBEDDED_WORKER=False)
    errands = Errands(app)
    yield app, errands


def basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def test_metrics_are_refused_as_the_dashboard_refuses(memory_app: tuple[Flask, Errands]) -> None:
    app, errands = memory_app
    auth = BasicAuth(
        viewers={"prometheus": generate_password_hash("scrape", method="pbkdf2:sha256:1000")}
    )
    errands.init_metrics(app, path="/internal/metrics", authorize=auth)
    client = app.test_client()
    refused = client.get("/internal/metrics")
    assert refused.status_code == 401
    assert refused.headers["WWW-Authenticate"].startswith('Basic realm="flask-errands"')
    assert "errands_" not in refused.text
    assert client.get("/internal/metrics", headers=basic("prometheus", "wrong")).status_code == 401
    allowed = client.get("/internal/metrics", headers=basic("prometheus", "scrape"))
    assert allowed.status_code == 200
    assert "errands_workers 0.0" in allowed.text
    assert client.get("/metrics").status_code == 404


def test_without_http_basic_a_refusal_is_403_and_authorize_is_required(
    memory_app: tuple[Flask, Errands],
) -> None:
    app, errands = memory_app
    with pytest.raises(ValueError, match="authorize="):
        errands.init_metrics(app)
    errands.init_metrics(app, authorize=lambda: None)
    assert app.test_client().get("/metrics").status_code == 403


def test_label_values_are_queue_task_and_status_names_only(
    memory_app: tuple[Flask, Errands],
) -> None:
    app, errands = memory_app

    @errands.task(name="hello")
    def hello(n: int) -> int:
        return n

    errands.init_metrics(app, authorize=lambda: "admin")
    with app.app_context():
        hello.delay_many([((n,), {}) for n in range(50)])
        assert errands.drain() == 50
    samples = scrape(app.test_client())
    labels = {key for _, pairs in samples for key, _ in pairs}
    assert labels == {"task", "queue", "status", "le"}
    values = {v for _, pairs in samples for key, v in pairs if key != "le"}
    assert values <= {"hello", "default", "succeeded", "queued", "scheduled", "running"}
    assert (
        value(samples, "errands_job_duration_seconds_count", task="hello", queue="default") == 50
    )
