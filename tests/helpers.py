"""Small helpers shared by the test modules."""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
from flask import Flask

from flask_errands import Errands

T = TypeVar("T")

#: The type of the ``make_app`` fixture: keyword config in, an app and its extension out.
MakeApp = Callable[..., tuple[Flask, Errands]]

#: Apps and scripts that tests run in processes of their own.
APPS = Path(__file__).resolve().parent / "apps"


def wait_until(predicate: Callable[[], T | None], what: str, timeout: float = 30.0) -> T:
    """Poll ``predicate`` until it returns something true, and return that.

    Fails the test, saying what never happened, after ``timeout`` seconds:
    generous, because it only bounds a wait that should end far sooner. A
    predicate whose answer may be false but wanted (0, an empty list) wraps
    it, as in ``lambda: (n := count()) is not None and (n,)``.
    """
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            pytest.fail(f"gave up after {timeout:g}s waiting for {what}")
        time.sleep(0.005)
    return value


def free_port() -> int:
    """A loopback TCP port nobody listens on, for a server a test starts itself."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def app_command(name: str, *args: str) -> list[str]:
    """The command that runs ``tests/apps/NAME.py`` with ``args`` in a process of its own."""
    return [sys.executable, str(APPS / f"{name}.py"), *args]
