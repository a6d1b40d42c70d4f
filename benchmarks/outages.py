"""How long `.delay()` takes to give up on a store that cannot answer, with default settings.

    python benchmarks/outages.py [--stores postgres,redis,sqlite]

- PostgreSQL and Redis: the app talks to the shared server through a loopback
  TCP proxy (``tests/proxy.py``) that goes silent after the first call, as a
  firewall dropping packets does; the figure is the time until ``EnqueueError``.
- SQLite: another connection holds the write lock; the same figure.

Each figure is one measurement: the bounds are set by timeouts, not by load.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flask import Flask  # noqa: E402
from tests.proxy import Proxy  # noqa: E402

from flask_errands import EnqueueError, Errands  # noqa: E402


def time_to_give_up(url: str, scratch: str, before: object = None) -> float:
    """Seconds from a ``.delay()`` to its ``EnqueueError`` once ``before`` broke the store."""
    app = Flask("outages", instance_path=scratch)
    app.config.update(ERRANDS_URL=url, ERRANDS_EMBEDDED_WORKER=False)
    errands = Errands(app)

    @errands.task(name="noop")
    def noop() -> None:
        """Do nothing."""

    with app.app_context():
        noop.delay()  # connected, tables created
        if callable(before):
            before()
        started = time.monotonic()
        try:
            noop.delay()
        except EnqueueError:
            return time.monotonic() - started
        finally:
            errands.backend.close()
    raise SystemExit(f"{url}: .delay() did not raise EnqueueError")


def through_silent_proxy(store: str, scratch: str, redis_url: str, postgres_url: str) -> float:
    if store == "redis":
        proxy = Proxy(6379)
        url = proxy.url("redis://", f"/0?prefix=outages-{uuid.uuid4().hex[:8]}:")
    else:
        import psycopg

        schema = f"outages_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute(f"CREATE SCHEMA {schema}")
        proxy = Proxy(5432)
        url = proxy.url("postgresql://postgres@", f"/test?options=-csearch_path%3D{schema}")
    try:
        return time_to_give_up(url, scratch, lambda: proxy.set_mode("silent"))
    finally:
        proxy.close()
        if store == "postgres":
            with psycopg.connect(postgres_url, autocommit=True) as admin:
                admin.execute(f"DROP SCHEMA {schema} CASCADE")


def behind_a_sqlite_lock(scratch: str) -> float:
    path = f"{scratch}/outages.db"
    holder: list[sqlite3.Connection] = []

    def lock() -> None:
        holder.append(sqlite3.connect(path, isolation_level=None))
        holder[0].execute("BEGIN IMMEDIATE")

    try:
        return time_to_give_up(f"sqlite:///{path}", scratch, lock)
    finally:
        for db in holder:
            db.execute("ROLLBACK")
            db.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stores", default="postgres,redis,sqlite")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    for store in args.stores.split(","):
        scratch = tempfile.mkdtemp()
        if store == "sqlite":
            seconds = behind_a_sqlite_lock(scratch)
            how = "another connection holds the write lock"
        else:
            seconds = through_silent_proxy(store, scratch, args.redis, args.postgres)
            how = "its connection went silent"
        print(f"{store:<9} .delay() raised EnqueueError after {seconds:5.1f}s ({how})")


if __name__ == "__main__":
    main()
