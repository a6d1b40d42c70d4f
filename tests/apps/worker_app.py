"""A small app for tests that run `flask errands …` as a real process.

Configured from FLASK_* environment variables (FLASK_ERRANDS_URL=...), so a
test can point it at any backend.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

from flask import Flask, current_app

from flask_errands import Errands, current_job

app = Flask(__name__, instance_path=os.environ.get("WORKER_APP_INSTANCE", "/tmp/worker-app"))
app.config["ERRANDS_URL"] = "memory://"
app.config.from_prefixed_env()
errands = Errands(app)


@errands.task(name="noop")
def noop() -> None:
    """Do nothing."""


@errands.task(name="record")
def record(path: str, seconds: float = 0.0, label: str = "-") -> int:
    """Append this run to a file (so tests count runs), after sleeping ``seconds``."""
    with open(path, "a") as runs:
        runs.write(f"start {label} {current_job.id} {current_job.attempt} {os.getpid()}\n")
    time.sleep(seconds)
    with open(path, "a") as runs:
        runs.write(f"end {label} {current_job.id} {current_job.attempt} {os.getpid()}\n")
    return current_job.attempt


@errands.task(name="boom")
def boom(message: str = "boom") -> None:
    """Fail."""
    raise ValueError(message)


@errands.task(name="stuck", timeout=1)
def stuck(seconds: float) -> None:
    """Sleep in C code, where a thread cannot be interrupted."""
    time.sleep(seconds)


@errands.task(name="die", retries=2)
def die(path: str) -> None:
    """Write down this attempt, then end the worker process at once, as a segfault would."""
    with open(path, "a") as runs:
        runs.write(f"{current_job.attempt} {os.getpid()}\n")
    os._exit(1)


@errands.task(name="nap")
async def nap(seconds: float) -> list[object]:
    """Sleep on the event loop, saying so as progress; return where and how it ran."""
    current_job.set_progress(0.5, "napping")
    await asyncio.sleep(seconds)
    return [current_app.name, os.getpid(), current_job.attempt]


@errands.task(name="echo")
def echo(value: object, seconds: float = 0.0) -> object:
    """Return ``value`` after ``seconds``: a workflow step."""
    time.sleep(seconds)
    return value


@errands.task(name="gather")
def gather(values: list[object], path: str) -> int:
    """Write down the results a chord's callback received, one line per run."""
    with open(path, "a") as runs:
        runs.write(json.dumps({"values": values, "attempt": current_job.attempt}) + "\n")
    return len(values)
