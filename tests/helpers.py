"""Small helpers shared by the test modules."""

from __future__ import annotations

import importlib
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Literal, NoReturn, TypeVar

import pytest
from flask import Flask

from flask_errands import Errands

T = TypeVar("T")

#: The type of the ``make_app`` fixture: keyword config in, an app and its extension out.
MakeApp = Callable[..., tuple[Flask, Errands]]

#: Apps and scripts that tests run in processes of their own.
APPS = Path(__file__).resolve().parent / "apps"


def wait_until(
    predicate: Callable[[], T | Literal[False] | None], what: str, timeout: float = 30.0
) -> T:
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


def away_from_a_minute_boundary(margin: float = 5.0) -> None:
    """Sleep past the next minute boundary when it is nearer than ``margin`` seconds.

    For tests that read per-minute figures and would see two minutes if one turned mid-test.
    """
    left = 60 - time.time() % 60
    if left < margin:
        time.sleep(left + 0.01)


def free_port() -> int:
    """A loopback TCP port nobody listens on, for a server a test starts itself."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def worker_ports(first: int, span: int) -> range:
    """This test process's own ``span`` ports, counted from ``first``, for servers on fixed ports.

    Each pytest-xdist worker (``gwN``) gets the Nth block of ``span`` ports, so
    parallel workers never start servers on one port; ERRANDS_TEST_PORT_OFFSET
    moves every block, away from another test run's servers.
    """
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    start = first + int(os.environ.get("ERRANDS_TEST_PORT_OFFSET", "0")) + int(worker) * span
    return range(start, start + span)


def app_command(name: str, *args: str) -> list[str]:
    """The command that runs ``tests/apps/NAME.py`` with ``args`` in a process of its own."""
    return [sys.executable, str(APPS / f"{name}.py"), *args]


def unavailable(reason: str) -> NoReturn:
    """Skip for want of a server, driver or tool; fail instead under CI (``CI`` set).

    So a green CI run means every backend and every outage was tested for real.
    """
    if os.environ.get("CI"):
        pytest.fail(f"CI must run every test: {reason}")
    pytest.skip(reason, allow_module_level=True)


def require(module: str) -> ModuleType:
    """Import a driver the tests need, or skip (fail under CI) without it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        unavailable(f"{module} is not installed ({exc})")


def create_database(url: str) -> bool:
    """Create the PostgreSQL database that ``url`` names, if it is missing; True if created.

    It connects to the server's ``postgres`` maintenance database with the same
    user and host, so a fresh server needs nothing done by hand before the suite.
    """
    import psycopg
    from psycopg import errors, sql
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    name = str(conninfo_to_dict(url).get("dbname") or "postgres")
    maintenance = make_conninfo(url, dbname="postgres", connect_timeout=10)
    with psycopg.connect(maintenance, autocommit=True) as admin:
        if admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            return False
        try:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        except errors.DuplicateDatabase:
            return False  # another test session created it a moment ago
    return True
