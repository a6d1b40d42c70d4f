"""Small helpers shared by the test modules."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from typing import TypeVar

import pytest

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], what: str, timeout: float = 30.0) -> T:
    """Poll ``predicate`` until it returns something true, and return that.

    Fails the test, saying what never happened, after ``timeout`` seconds:
    generous, because it only bounds a wait that should end far sooner.
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


def eventually(attempt: Callable[[], T | None], what: str, timeout: float = 30.0) -> T:
    """Call ``attempt`` until it returns something other than None (0 and [] count), and
    return that; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while (value := attempt()) is None:
        if time.monotonic() > deadline:
            pytest.fail(f"gave up after {timeout:g}s waiting for {what}")
        time.sleep(0.02)
    return value
