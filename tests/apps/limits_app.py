"""An app whose tasks have rate and concurrency limits, for tests with real worker processes.

Each task appends a line to an append-only ledger (one ``write`` on an ``O_APPEND`` file,
so lines from many processes never mix): what happened, the task, the wall-clock time,
the time the store claimed the job, and the process.
"""

from __future__ import annotations

import os
import time

from flask import Flask

from flask_errands import Errands, current_job

app = Flask(__name__, instance_path=os.environ.get("WORKER_APP_INSTANCE", "/tmp/limits-app"))
app.config["ERRANDS_URL"] = "memory://"
app.config.from_prefixed_env()
errands = Errands(app)


def ledger(path: str, what: str, task: str) -> None:
    job = errands.job(current_job.id)
    claimed = job.started_at.timestamp() if job is not None and job.started_at else 0.0
    line = f"{what} {task} {time.time():.6f} {claimed:.6f} {os.getpid()} {current_job.id}\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


@errands.task(name="pair", concurrency=2)
def pair(path: str, seconds: float) -> None:
    """At most two at once, across every worker."""
    ledger(path, "start", "pair")
    time.sleep(seconds)
    ledger(path, "end", "pair")


@errands.task(name="paced", rate_limit="5/s")
def paced(path: str) -> None:
    """At most five starts a second, across every worker."""
    ledger(path, "start", "paced")


@errands.task(name="free")
def free(path: str) -> None:
    """No limit: runs while the limited tasks of its queue wait."""
    ledger(path, "start", "free")


@errands.task(name="mailer", queue="emails")
def mailer(path: str, seconds: float) -> None:
    """No limit of its own: its queue's (``ERRANDS_QUEUE_LIMITS`` of the enqueuing app) holds."""
    ledger(path, "start", "mailer")
    time.sleep(seconds)
    ledger(path, "end", "mailer")


@errands.task(name="hog", concurrency=1)
def hog(path: str, seconds: float) -> None:
    """One at a time; sleeps long enough to be killed holding its slot."""
    ledger(path, "start", "hog")
    time.sleep(seconds)
    ledger(path, "end", "hog")
