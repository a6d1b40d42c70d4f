"""An app on the embedded default, for tests that serve it with `flask run` or gunicorn.

Configured from FLASK_* environment variables (FLASK_ERRANDS_URL=...). With
WEB_APP_TICKS set to a file path it has a schedule, ``tick``, every second,
whose runs are appended to that file.
"""

from __future__ import annotations

import os
import time

import click
from flask import Flask, request

from flask_errands import Errands, current_job

app = Flask(__name__, instance_path=os.environ.get("WEB_APP_INSTANCE", "/tmp/web-app"))
app.config["ERRANDS_URL"] = "memory://"
app.config.from_prefixed_env()
errands = Errands(app)


@errands.task(name="record")
def record(path: str, seconds: float = 0.0) -> int:
    """Append this run to a file (so tests see it start and end), after sleeping ``seconds``."""
    with open(path, "a") as runs:
        runs.write(f"start {current_job.id} {current_job.attempt} {os.getpid()}\n")
    time.sleep(seconds)
    with open(path, "a") as runs:
        runs.write(f"end {current_job.id} {current_job.attempt} {os.getpid()}\n")
    return current_job.attempt


TICKS = os.environ.get("WEB_APP_TICKS")
if TICKS:
    ticks_path: str = TICKS

    @errands.periodic(every=1, name="tick")
    def tick() -> None:
        """Append this run to the ticks file."""
        with open(ticks_path, "a") as ticks:
            ticks.write(f"{current_job.id} {os.getpid()}\n")


@app.get("/enqueue")
def enqueue() -> str:
    """Enqueue ``record`` for the file and duration in the query string; return its id."""
    job = record.delay(request.args["path"], float(request.args.get("seconds", 0)))
    return str(job.id)


@app.cli.command("idle")
@click.argument("seconds", type=float)
def idle(seconds: float) -> None:
    """Do nothing for a while (a CLI command must never start the worker)."""
    time.sleep(seconds)
