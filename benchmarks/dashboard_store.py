"""How fast the dashboard's reads answer with 1,000,000 finished and 10,000 queued jobs.

    python benchmarks/dashboard_store.py [--stores sqlite,redis,postgres]
        [--finished 1000000] [--queued 10000] [--repeat 7]

Each store is filled straight through its own bulk path (SQLite ``executemany``,
PostgreSQL ``COPY``, Redis pipelines), writing the rows, index entries, per-minute
counts and depth samples the backend itself would have written, spread over
the last 24 hours; then the admin API the dashboard calls is timed:

- overview: ``counts()``, ``queues()``, ``stats()``, ``workers()``;
- jobs list: the first page (50 jobs) unfiltered and by status, queue, task and
  status + task; a deep page reached by following 100 cursors, and one reached
  by a cursor pointing half way down;
- a job's detail: ``job(id)``.

Figures are the median over ``--repeat`` calls, in milliseconds; the target is
under 100 ms for each. Writes only a temporary SQLite file, a fresh PostgreSQL
schema and a fresh Redis key prefix, all removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from flask import Flask  # noqa: E402

from flask_errands import Admin, Errands  # noqa: E402
from flask_errands.admin import encode_cursor  # noqa: E402

QUEUES = ("default", "emails", "reports")
TASKS = tuple(f"app.tasks.task_{n}" for n in range(5))
PAYLOAD = '{"args":[42,"x"],"kwargs":{"flag":true}}'
COLUMNS = [
    "seq",
    "id",
    "task",
    "payload",
    "queue",
    "priority",
    "status",
    "attempts",
    "max_attempts",
    "retry_delay",
    "eta",
    "enqueued_at",
    "started_at",
    "finished_at",
    "result",
    "error",
    "worker_id",
    "ended_at",
]


def rows(finished: int, queued: int, now: float) -> Iterator[tuple[Any, ...]]:
    """Every job, in enqueue order: the finished ones over the last day, then the queued ones."""
    rng = random.Random(7)
    span = 86400.0
    for seq in range(1, finished + 1):
        enqueued = now - span + span * seq / finished
        roll = rng.random()
        status = "succeeded" if roll < 0.95 else "failed" if roll < 0.99 else "cancelled"
        ended = enqueued + 0.05
        yield (
            seq,
            uuid.UUID(int=rng.getrandbits(128)).hex,
            TASKS[seq % len(TASKS)],
            PAYLOAD,
            QUEUES[seq % len(QUEUES)],
            0,
            status,
            1,
            1,
            1.0,
            enqueued,
            enqueued,
            enqueued + 0.01,
            ended,
            '"ok"' if status == "succeeded" else None,
            "ValueError: nope" if status == "failed" else None,
            "bench-host:1234:abcd",
            ended,
        )
    for seq in range(finished + 1, finished + queued + 1):
        enqueued = now - 60 + 60 * (seq - finished) / queued
        yield (
            seq,
            uuid.UUID(int=rng.getrandbits(128)).hex,
            TASKS[seq % len(TASKS)],
            PAYLOAD,
            QUEUES[seq % len(QUEUES)],
            0,
            "queued",
            0,
            1,
            1.0,
            enqueued,
            enqueued,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def figures(
    finished: int, queued: int, now: float
) -> tuple[Counter[tuple[int, str, str, str]], dict[int, list[list[Any]]]]:
    """The per-minute counts finish would have kept, and an hour of depth samples."""
    counts: Counter[tuple[int, str, str, str]] = Counter()
    for row in rows(finished, 0, now):
        counts[(int(row[13] // 60), row[4], row[2], row[6])] += 1
    per_queue = Counter(
        QUEUES[seq % len(QUEUES)] for seq in range(finished + 1, finished + queued + 1)
    )
    last = int(now // 60)
    samples = {
        minute: [[queue, "queued", n] for queue, n in sorted(per_queue.items())]
        for minute in range(last - 59, last)
    }
    return counts, samples


# -- filling each store ----------------------------------------------------------


def fill_sqlite(url: str, finished: int, queued: int, now: float) -> None:
    path = url.removeprefix("sqlite:///")
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA synchronous = OFF")
    db.execute("BEGIN")
    marks = ", ".join("?" for _ in COLUMNS)
    db.executemany(
        f"INSERT INTO errands_jobs ({', '.join(COLUMNS)}) VALUES ({marks})",
        rows(finished, queued, now),
    )
    counts, samples = figures(finished, queued, now)
    db.executemany(
        "INSERT INTO errands_finished_counts VALUES (?, ?, ?, ?, ?)",
        [(*key, n) for key, n in counts.items()],
    )
    db.executemany(
        "INSERT INTO errands_depth_samples VALUES (?, ?)",
        [(minute, json.dumps(sample)) for minute, sample in samples.items()],
    )
    db.execute("COMMIT")
    db.execute("ANALYZE")
    db.close()


def fill_postgres(url: str, finished: int, queued: int, now: float) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        columns = ", ".join(c for c in COLUMNS if c != "ended_at")
        with conn.cursor() as cursor:
            with cursor.copy(f"COPY errands_jobs ({columns}) FROM STDIN") as copy:
                for row in rows(finished, queued, now):
                    copy.write_row(row[:-1])
            counts, samples = figures(finished, queued, now)
            with cursor.copy("COPY errands_finished_counts FROM STDIN") as copy:
                for (minute, queue, task, outcome), n in counts.items():
                    copy.write_row((minute, queue, task, outcome, 0, n))
            for minute, sample in samples.items():
                cursor.execute(
                    "INSERT INTO errands_depth_samples VALUES (%s, %s)",
                    (minute, json.dumps(sample)),
                )
            cursor.execute("SELECT setval('errands_jobs_seq_seq', %s)", (finished + queued,))
            # Finished jobs are counted from the per-minute counts above: their totals
            # (errands_finished_totals) only hold what those do not say, nothing here.
        conn.execute("VACUUM ANALYZE errands_jobs")


def fill_redis(url: str, prefix: str, finished: int, queued: int, now: float) -> None:
    import redis

    client = redis.Redis.from_url(url)
    pipe = client.pipeline(transaction=False)
    p = prefix
    for n, row in enumerate(rows(finished, queued, now), 1):
        record = dict(zip(COLUMNS, row, strict=True))
        del record["ended_at"]
        fields = {k: (repr(v) if isinstance(v, float) else v) for k, v in record.items()}
        pipe.hset(
            f"{p}job:{record['id']}", mapping={k: v for k, v in fields.items() if v is not None}
        )
        status, queue, seq = record["status"], record["queue"], record["seq"]
        pipe.zadd(f"{p}idx:{queue}:{status}", {record["id"]: seq})
        if status == "queued":
            pipe.zadd(f"{p}wait:{queue}:0", {f"{seq:016d}{record['id']}": record["eta"]})
        else:
            pipe.zadd(f"{p}finished", {record["id"]: record["finished_at"]})
        if n % 20000 == 0:
            pipe.execute()
    for queue in QUEUES:
        pipe.sadd(f"{p}queues", queue)
        pipe.sadd(f"{p}prios:{queue}", "0")
    pipe.set(f"{p}seq", finished + queued)
    counts, samples = figures(finished, queued, now)
    for (minute, queue, task, outcome), n in counts.items():
        pipe.hset(f"{p}finished:{minute}", f"{queue}\n{task}\n{outcome}", n)
        pipe.zadd(f"{p}finishedminutes", {str(minute): minute})
    for minute, sample in samples.items():
        pipe.set(f"{p}depth:{minute}", json.dumps(sample))
        pipe.zadd(f"{p}depthminutes", {str(minute): minute})
    pipe.execute()
    client.close()


# -- timing ----------------------------------------------------------------------


def median_ms(call: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def measure(admin: Admin, finished: int, queued: int, repeat: int) -> dict[str, float]:
    found: dict[str, float] = {}
    found["counts()"] = median_ms(admin.counts, repeat)
    found["queues()"] = median_ms(admin.queues, repeat)
    found["stats()"] = median_ms(admin.stats, repeat)
    found["workers()"] = median_ms(admin.workers, repeat)
    found["overview (all four)"] = median_ms(
        lambda: (admin.counts(), admin.queues(), admin.stats(), admin.workers()), repeat
    )
    found["first page"] = median_ms(lambda: admin.job_page(limit=50), repeat)
    found["first page, failed"] = median_ms(lambda: admin.job_page("failed", limit=50), repeat)
    found["first page, queue"] = median_ms(lambda: admin.job_page(queue="emails"), repeat)
    found["first page, task"] = median_ms(lambda: admin.job_page(task=TASKS[3]), repeat)
    found["first page, failed+task"] = median_ms(
        lambda: admin.job_page("failed", task=TASKS[3]), repeat
    )
    cursor = None
    for _ in range(99):
        cursor = admin.job_page(limit=50, cursor=cursor).next_cursor
    found["page 100 (99 cursors followed)"] = median_ms(
        lambda: admin.job_page(limit=50, cursor=cursor), repeat
    )
    middle = encode_cursor((finished + queued) // 2)
    found["page at half depth (cursor)"] = median_ms(
        lambda: admin.job_page(limit=50, cursor=middle), repeat
    )
    found["page at half depth, failed"] = median_ms(
        lambda: admin.job_page("failed", limit=50, cursor=middle), repeat
    )
    some = admin.job_page(limit=1, cursor=middle).jobs[0].id
    found["job(id)"] = median_ms(lambda: admin.job(some), repeat)
    return found


def run_store(store: str, args: argparse.Namespace, scratch: str) -> dict[str, float]:
    now = time.time()
    prefix = f"errands-bench-{uuid.uuid4().hex[:8]}:"
    schema = f"errands_bench_{uuid.uuid4().hex[:8]}"
    if store == "sqlite":
        url = f"sqlite:///{scratch}/bench.db"
    elif store == "redis":
        url = f"{args.redis}?prefix={prefix}"
    else:
        import psycopg

        with psycopg.connect(args.postgres, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        url = f"{args.postgres}?options=-csearch_path%3D{schema}"
    app = Flask("dashboard_bench", instance_path=scratch)
    app.config.update(ERRANDS_URL=url, ERRANDS_EMBEDDED_WORKER=False)
    errands = Errands(app)
    try:
        with app.app_context():
            errands.admin.counts()  # tables created
            started = time.monotonic()
            if store == "sqlite":
                fill_sqlite(url, args.finished, args.queued, now)
            elif store == "redis":
                fill_redis(args.redis, prefix, args.finished, args.queued, now)
            else:
                fill_postgres(
                    f"{args.postgres}?options=-csearch_path%3D{schema}",
                    args.finished,
                    args.queued,
                    now,
                )
            # A worker's sample of this minute, as a running store has (the SQL stores then fold
            # per-minute counts older than FIGURE_MINUTES into minute 0).
            errands.backend.sample_depth(now)
            print(f"{store}: filled in {time.monotonic() - started:.0f}s", file=sys.stderr)
            return measure(errands.admin, args.finished, args.queued, args.repeat)
    finally:
        with app.app_context():
            errands.backend.close()
        if store == "redis":
            import redis

            client = redis.Redis.from_url(args.redis)
            for keys in _batched(client.scan_iter(match=f"{prefix}*", count=10000), 10000):
                client.delete(*keys)
            client.close()
        elif store == "postgres":
            import psycopg

            with psycopg.connect(args.postgres, autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA {schema} CASCADE")


def _batched(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stores", default="sqlite,redis,postgres")
    parser.add_argument("--finished", type=int, default=1_000_000)
    parser.add_argument("--queued", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument(
        "--redis", default=os.environ.get("ERRANDS_TEST_REDIS", "redis://127.0.0.1:6379/0")
    )
    parser.add_argument(
        "--postgres",
        default=os.environ.get(
            "ERRANDS_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
        ),
    )
    args = parser.parse_args()
    stores = args.stores.split(",")
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for store in stores:
            results[store] = run_store(store, args, scratch)
    names = list(next(iter(results.values())))
    print(
        f"\n{args.finished:,} finished + {args.queued:,} queued jobs; median ms of {args.repeat}"
    )
    print(f"{'':<32}" + "".join(f"{store:>10}" for store in stores))
    for name in names:
        print(f"{name:<32}" + "".join(f"{results[s][name]:>10.1f}" for s in stores))


if __name__ == "__main__":
    main()
