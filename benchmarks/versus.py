"""flask-errands against an earlier revision of itself, in the same run: did a change cost speed?

    python benchmarks/versus.py --base dabf92f [--rounds 3] [--jobs 3000]
                                [--stores memory,sqlite,redis,postgres]

The base revision is checked out into a temporary git worktree; each round
measures both trees in a fresh process each (``PYTHONPATH`` pointing at their
``src``), store by store with a store's two runs back to back, alternating
which goes first, so a neighbour's burst of load spreads over both. Figures
per store: ``delay()`` per second, ``delay_many`` (batches of 100) jobs per
second, drain with 4 embedded threads and ``errands.drain()`` in the calling
thread (``drain_sync``) in jobs per second, and bare ``Backend.enqueue`` calls
per second (``store_enqueue``). The table gives each side's median and the
median of the per-round ratios (head / base): above 1 is faster. Redis and
PostgreSQL need their servers (``--redis``, ``--postgres``); each run uses
its own key prefix or schema and removes it.

``--limit 100000/s,1000`` compares this checkout with itself instead: the base
column without limits, the head column with the no-op task limited to that rate
and concurrency (set high enough never to bind), so the table says what limits
cost the claim path.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
METRICS = ("delay", "delay_many", "drain", "drain_sync", "store_enqueue")


def measure(
    store: str, jobs: int, redis_url: str, postgres_url: str, limit: str | None = None
) -> dict[str, float]:
    """Run in a child process: the figures for one store, with this tree's code.

    ``limit`` (``"RATE,CONCURRENCY"``) puts those limits on the task.
    """
    from flask import Flask

    from flask_errands import Errands

    scratch = tempfile.mkdtemp()
    cleanup = _prepare(store, scratch, redis_url, postgres_url)
    app = Flask("versus", instance_path=scratch)
    app.config.update(ERRANDS_URL=cleanup[0], ERRANDS_EMBEDDED_WORKER=False)
    errands = Errands(app)

    rate, _, concurrency = (limit or ",").partition(",")
    # Only the options given, so a revision from before limits can run this script too.
    limits: dict[str, Any] = {"rate_limit": rate, "concurrency": int(concurrency or 0)}
    limits = {name: value for name, value in limits.items() if value}

    @errands.task(name="noop", **limits)
    def noop() -> None:
        """Do nothing."""

    figures: dict[str, float] = {}
    with app.app_context():
        noop.delay()  # connected and warmed up
        started = time.perf_counter()
        for _ in range(jobs):
            noop.delay()
        figures["delay"] = jobs / (time.perf_counter() - started)
        started = time.perf_counter()
        for _ in range(jobs // 100):
            noop.delay_many([()] * 100)
        figures["delay_many"] = (jobs // 100 * 100) / (time.perf_counter() - started)
        total = 1 + jobs + jobs // 100 * 100
        started = time.perf_counter()
        errands.start_worker()
        while _finished(errands.backend.counts()) < total:
            time.sleep(0.005)
        figures["drain"] = total / (time.perf_counter() - started)
        errands.stop_worker(grace=5)
        noop.delay_many([()] * jobs)
        started = time.perf_counter()
        ran = errands.drain()
        figures["drain_sync"] = ran / (time.perf_counter() - started)
        figures["store_enqueue"] = _store_enqueues(errands.backend, jobs)
        errands.backend.close()
    cleanup[1]()
    return figures


def _store_enqueues(backend: Any, jobs: int) -> float:
    """Single-job ``Backend.enqueue`` calls per second, below the task API."""
    from flask_errands.backends.base import JobRecord

    payload = '{"args":[],"kwargs":{}}'
    records = [
        JobRecord(id=uuid.uuid4().hex, task="noop", payload=payload, eta=0.0, enqueued_at=0.0)
        for _ in range(jobs)
    ]
    started = time.perf_counter()
    for record in records:
        backend.enqueue([record])
    return jobs / (time.perf_counter() - started)


def _finished(counts: dict[tuple[str, str], int]) -> int:
    return sum(n for (_, status), n in counts.items() if status == "succeeded")


def _prepare(
    store: str, scratch: str, redis_url: str, postgres_url: str
) -> tuple[str, Callable[[], None]]:
    """The store's URL for this run, and how to remove what the run left."""
    if store == "memory":
        return "memory://", lambda: None
    if store == "sqlite":
        return f"sqlite:///{scratch}/versus.db", lambda: None
    if store == "redis":
        import redis

        prefix = f"errands-versus-{uuid.uuid4().hex[:8]}:"

        def drop_keys() -> None:
            client = redis.Redis.from_url(redis_url)
            keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
            if keys:
                client.delete(*keys)
            client.close()

        return f"{redis_url}?prefix={prefix}", drop_keys
    import psycopg

    schema = f"errands_versus_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {schema}")

    def drop_schema() -> None:
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")

    return f"{postgres_url}?options=-csearch_path%3D{schema}", drop_schema


def run_child(
    tree: Path, store: str, args: argparse.Namespace, limit: str | None = None
) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--measure",
        store,
        "--jobs",
        str(args.jobs),
        "--redis",
        args.redis,
        "--postgres",
        args.postgres,
        *(("--task-limit", limit) if limit else ()),
    ]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    figures: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return figures


def compare(args: argparse.Namespace) -> None:
    stores = args.stores.split(",")
    base_tree = ROOT if args.limit else Path(tempfile.mkdtemp(prefix="errands-base-"))
    if not args.limit:
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base_tree), args.base],
            check=True,
            capture_output=True,
        )
    results: dict[tuple[str, str, str], list[float]] = {}
    try:
        for round_ in range(args.rounds):
            sides = [("base", base_tree, None), ("head", ROOT, args.limit)]
            for store in stores:  # a store's two sides back to back: less drift between them
                for side, tree, limit in sides if round_ % 2 == 0 else reversed(sides):
                    for metric, value in run_child(tree, store, args, limit).items():
                        results.setdefault((store, metric, side), []).append(value)
            print(f"round {round_ + 1} of {args.rounds} done", file=sys.stderr)
    finally:
        if not args.limit:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_tree)],
                check=False,
                capture_output=True,
            )
    print(f"{'store':<9} {'figure':<11} {'base/s':>10} {'head/s':>10} {'head/base':>10}")
    for store in stores:
        for metric in METRICS:
            base, head = results[(store, metric, "base")], results[(store, metric, "head")]
            ratio = statistics.median(h / b for h, b in zip(head, base, strict=True))
            print(
                f"{store:<9} {metric:<11} {statistics.median(base):>10,.0f} "
                f"{statistics.median(head):>10,.0f} {ratio:>10.2f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", default="HEAD~1", help="the revision to compare with")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (figures are medians)")
    parser.add_argument("--jobs", type=int, default=3000, help="jobs per figure")
    parser.add_argument("--stores", default="memory,sqlite,redis,postgres")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument(
        "--limit",
        help="RATE,CONCURRENCY (such as 100000/s,1000): this checkout without limits (base) "
        "against itself with them on the task (head), instead of --base",
    )
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--task-limit", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        figures = measure(args.measure, args.jobs, args.redis, args.postgres, args.task_limit)
        print(json.dumps(figures))
    else:
        compare(args)


if __name__ == "__main__":
    main()
