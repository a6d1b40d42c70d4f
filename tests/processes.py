"""Real processes for tests: `flask …` and gunicorn in a session of their own, and their logs."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flask import Flask

from flask_errands import Errands

ROOT = Path(__file__).resolve().parent.parent


class Served:
    """A command run with the test apps' environment, its output in a file.

    It runs in a session of its own, so a test can signal its whole process
    group as a terminal's Ctrl-C or systemd's stop does.
    """

    def __init__(self, tmp_path: Path, url: str, **config: Any) -> None:
        self.env = {
            **os.environ,
            "FLASK_ERRANDS_URL": url,
            "WORKER_APP_INSTANCE": str(tmp_path),
            "WEB_APP_INSTANCE": str(tmp_path),
            "PYTHONUNBUFFERED": "1",
        }
        self.env.update({f"FLASK_{k}": json.dumps(v) for k, v in config.items()})
        self.log = tmp_path / f"process-{time.monotonic_ns()}.log"
        self.proc: subprocess.Popen[str] | None = None
        self.command: tuple[str, ...] = ()

    def start(self, *command: str) -> subprocess.Popen[str]:
        self.command = command
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", *command],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,
            )
        return self.proc

    def flask(self, app: str, *args: str) -> subprocess.Popen[str]:
        return self.start("flask", "--app", app, *args)

    def signal_group(self, signum: int) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signum)

    def output(self) -> str:
        return self.log.read_text()

    def close(self) -> None:
        """Kill what is left of the process group (after a failed test)."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)


def alive(pid: int) -> bool:
    """Whether a process (not necessarily our child) exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def gone(pid: int) -> bool:
    """Whether a process has exited (or is a zombie): the opposite of :func:`alive`."""
    return not alive(pid)


def lines(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def get(url: str) -> str | None:
    """GET ``url`` and return the body, or None while nothing answers there."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())
    except OSError:
        return None


@contextlib.contextmanager
def client_of(
    errands: Errands, url: str, instance: Path, name: str = "client", **config: Any
) -> Iterator[Flask]:
    """An app in the test process on the store real processes serve, running nothing itself."""
    app = Flask(name, instance_path=str(instance))
    app.config.update(ERRANDS_URL=url, ERRANDS_EMBEDDED_WORKER=False, **config)
    errands.init_app(app)
    yield app
    app.extensions["errands"].backend.close()
