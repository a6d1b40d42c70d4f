"""flask-errands on PostgreSQL, side by side with Procrastinate and the disk's own limit.

Measures, in one run, against one PostgreSQL server (each system in a schema of
its own, created for the run and dropped at the end; ``synchronous_commit`` as
the server has it, ``on`` by default, which the report prints):

1. the physical limit: a bare psycopg loop of one-row ``INSERT`` + ``COMMIT``,
   one round trip and one WAL flush each;
2. enqueue rate from one thread: flask-errands' ``.delay()`` and
   ``delay_many()`` of 100, Procrastinate's ``defer()`` and ``batch_defer()``
   of 100, all with no worker running;
3. drain rate: N no-op jobs are enqueued while no worker runs, then the
   workers start; the rate counts from the first finished job to the last (the
   count polled every 10 ms), so start-up is left out. flask-errands runs
   ``flask errands worker`` (its defaults: one process, 4 threads; and
   ``--processes 2``), Procrastinate ``App.run_worker`` in 2 processes with
   ``concurrency`` 8 and 16 (``--procrastinate-concurrency``);
4. enqueue-to-start latency p50/p99 at a steady 50 jobs/s against an idle
   worker: each job carries ``time.time()`` taken just before its enqueue call
   and inserts it with its own start time into a table, first thing.

A system that fails or times out is reported as failed; the run always
finishes. ``--quick`` drains 2,000 jobs instead of 20,000. About four minutes
with the defaults on a 2-core machine.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg

#: The schema each system works in, created for the run and dropped at its end.
SCHEMAS = {
    "psycopg INSERT+COMMIT": "bench_pg_baseline",
    "flask-errands": "bench_pg_errands",
    "flask-errands x2": "bench_pg_errands",
    "procrastinate 2x8": "bench_pg_procrastinate",
    "procrastinate 2x16": "bench_pg_procrastinate",
}
#: Longest wait for a drain, or for the last latency jobs, before the system is marked failed.
PATIENCE = 300.0
STAMPS = "bench_stamps"
_stamp_connection: psycopg.Connection[Any] | None = None


def conninfo(base: str, schema: str) -> str:
    """``base`` with the search_path set to ``schema``, so every table lands there."""
    separator = "&" if "?" in base else "?"
    return f"{base}{separator}options={quote(f'-csearch_path={schema}')}"


def _stamp(url: str, enqueued_at: float) -> None:
    """The latency job's body, in every system: note when it started, first thing."""
    started = time.time()
    global _stamp_connection
    if _stamp_connection is None:
        _stamp_connection = psycopg.connect(url, autocommit=True)
    _stamp_connection.execute(
        f"INSERT INTO {STAMPS} (enqueued_at, started_at) VALUES (%s, %s)", (enqueued_at, started)
    )


# -- one adapter per system ----------------------------------------------------


class System:
    """What the benchmark needs of a job queue: enqueue, count finished jobs, serve."""

    name = ""
    settings = ""
    package = ""

    def __init__(self, base: str) -> None:
        self.base = base
        self.schema = SCHEMAS[self.name]
        self.url = conninfo(base, self.schema)
        self.admin = psycopg.connect(self.url, autocommit=True)

    def version(self) -> str:
        return importlib.metadata.version(self.package)

    def enqueue(self) -> None:
        raise NotImplementedError

    def enqueue_batches(self, count: int, size: int) -> None:
        for start in range(0, count, size):
            self.enqueue_batch(min(size, count - start))

    def enqueue_batch(self, size: int) -> None:
        raise NotImplementedError

    def enqueue_stamp(self, now: float) -> None:
        raise NotImplementedError

    def finished(self) -> int:
        raise NotImplementedError

    def empty(self) -> None:
        raise NotImplementedError

    def worker_command(self) -> list[str]:
        raise NotImplementedError

    def workers(self) -> int:
        return 1

    def serve(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.admin.close()


def _errands_app(url: str) -> Any:
    """The Flask app the benchmark and its worker processes share: two tasks."""
    from flask import Flask

    from flask_errands import Errands as Extension

    app = Flask("postgres_peers", instance_path=tempfile.gettempdir())
    app.config.update(ERRANDS_URL=url, ERRANDS_EMBEDDED_WORKER=False)
    errands = Extension(app)
    errands.task(name="bench.noop")(_noop)

    @errands.task(name="bench.stamp")
    def stamp(at: float) -> None:
        _stamp(url, at)

    app.config["BENCH_ERRANDS"] = errands
    return app


def create_app() -> Any:
    """``flask --app benchmarks/postgres_peers.py:create_app errands worker``."""
    return _errands_app(os.environ["BENCH_ERRANDS_URL"])


def _noop() -> None:
    """The drain and enqueue job: nothing, so the figures are the queue's own cost."""


class Errands(System):
    name = "flask-errands"
    settings = "`flask errands worker` (defaults: 1 process, 4 threads)"
    package = "flask-errands"
    processes = 1

    def __init__(self, base: str) -> None:
        super().__init__(base)
        self.admin.execute(f"CREATE SCHEMA IF NOT EXISTS {self.schema}")
        self.app = _errands_app(self.url)
        self.errands = self.app.config["BENCH_ERRANDS"]
        self.noop = self.errands.tasks["bench.noop"]
        self.stamp = self.errands.tasks["bench.stamp"]
        self.context = self.app.app_context()
        self.context.push()
        self.noop.delay()  # the tables made, the pool warm
        self.empty()

    def enqueue(self) -> None:
        self.noop.delay()

    def enqueue_batch(self, size: int) -> None:
        self.noop.delay_many([()] * size)

    def enqueue_stamp(self, now: float) -> None:
        self.stamp.delay(now)

    def finished(self) -> int:
        counts = self.errands.backend.counts()
        return int(sum(n for (_, status), n in counts.items() if status == "succeeded"))

    def empty(self) -> None:
        tables = self.admin.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = %s AND tablename <> %s",
            (self.schema, "errands_schema"),
        ).fetchall()
        names = ", ".join(f"{self.schema}.{name}" for (name,) in tables)
        self.admin.execute(f"TRUNCATE {names}")

    def worker_command(self) -> list[str]:
        app = f"{Path(__file__).resolve()}:create_app"
        command = [sys.executable, "-m", "flask", "--app", app, "errands", "worker"]
        return [*command, "--processes", str(self.processes)]

    def close(self) -> None:
        self.errands.backend.close()
        self.context.pop()
        super().close()


class ErrandsTwoProcesses(Errands):
    name = "flask-errands x2"
    settings = "`flask errands worker --processes 2` (2 processes x 4 threads)"
    processes = 2


class Procrastinate(System):
    name = "procrastinate 2x8"
    package = "procrastinate"
    concurrency = 8

    def __init__(self, base: str) -> None:
        super().__init__(base)
        import procrastinate

        self.settings = (
            f"2 processes, each `App.run_worker(concurrency={self.concurrency})`, LISTEN/NOTIFY"
        )
        self.admin.execute(f"CREATE SCHEMA IF NOT EXISTS {self.schema}")
        self.app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=self.url))
        self.noop = self.app.task(name="bench.noop")(_noop)
        url = self.url

        @self.app.task(name="bench.stamp")
        def stamp(enqueued_at: float) -> None:
            _stamp(url, enqueued_at)

        self.stamp = stamp
        exists = self.admin.execute(
            "SELECT 1 FROM pg_tables WHERE schemaname = %s AND tablename = 'procrastinate_jobs'",
            (self.schema,),
        ).fetchone()
        self.app.open()
        if not exists:
            self.app.schema_manager.apply_schema()

    def enqueue(self) -> None:
        self.noop.defer()

    def enqueue_batch(self, size: int) -> None:
        self.noop.batch_defer(*({} for _ in range(size)))

    def enqueue_stamp(self, now: float) -> None:
        self.stamp.defer(enqueued_at=now)

    def finished(self) -> int:
        row = self.admin.execute(
            "SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'"
        ).fetchone()
        return int(row[0]) if row else 0

    def empty(self) -> None:
        self.admin.execute(
            "TRUNCATE procrastinate_jobs, procrastinate_events, procrastinate_periodic_defers "
            "CASCADE"
        )

    def workers(self) -> int:
        return 2

    def worker_command(self) -> list[str]:
        return [sys.executable, __file__, "--serve", self.name, "--postgres", self.base]

    def serve(self) -> None:
        self.app.run_worker(
            concurrency=self.concurrency, install_signal_handlers=False, delete_jobs="never"
        )

    def close(self) -> None:
        self.app.close()
        super().close()


class ProcrastinateWide(Procrastinate):
    name = "procrastinate 2x16"
    concurrency = 16


SYSTEMS: dict[str, type[System]] = {
    system.name: system
    for system in (Errands, ErrandsTwoProcesses, Procrastinate, ProcrastinateWide)
}


# -- measuring -----------------------------------------------------------------


@dataclass
class Row:
    """One system's figures; a figure left None was not measured."""

    name: str
    version: str = ""
    settings: str = ""
    enqueue: float | None = None
    batch: float | None = None
    drain: float | None = None
    p50: float | None = None
    p99: float | None = None
    failure: str | None = None
    extra: dict[str, float] = field(default_factory=dict)


def rate(count: int, work: Callable[[], None]) -> float:
    """Calls per second of ``work``, called ``count`` times."""
    started = time.perf_counter()
    for _ in range(count):
        work()
    return count / (time.perf_counter() - started)


@contextlib.contextmanager
def workers(system: System, scratch: str) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Start the system's worker processes (each in its own session), and kill them after."""
    processes = []
    environment = {**os.environ, "BENCH_ERRANDS_URL": system.url}
    for n in range(system.workers()):
        log = open(os.path.join(scratch, f"{system.name}-{n}.log"), "wb")  # noqa: SIM115
        processes.append(
            subprocess.Popen(
                system.worker_command(),
                stdout=log,
                stderr=log,
                env=environment,
                start_new_session=True,
            )
        )
    try:
        yield processes
    finally:
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def wait_for(
    what: str, done: Callable[[], bool], processes: list[subprocess.Popen[bytes]]
) -> None:
    deadline = time.monotonic() + PATIENCE
    while not done():
        if any(process.poll() is not None for process in processes):
            raise RuntimeError(f"a worker process exited while waiting for {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {PATIENCE:g}s waiting for {what}")
        time.sleep(0.01)


def drain(system: System, jobs: int, processes: list[subprocess.Popen[bytes]]) -> float:
    """Jobs per second from the first finished job to the last."""
    first: tuple[float, int] | None = None

    def all_done() -> bool:
        nonlocal first
        finished = system.finished()
        if first is None and finished > 0:
            first = (time.perf_counter(), finished)
        return finished >= jobs

    wait_for(f"{jobs} jobs to finish", all_done, processes)
    assert first is not None
    return (jobs - first[1]) / max(time.perf_counter() - first[0], 1e-9)


def latency(
    system: System, count: int, per_second: float, processes: list[subprocess.Popen[bytes]]
) -> tuple[float, float]:
    """p50 and p99 of enqueue-to-start, in milliseconds, at ``per_second``."""
    admin = system.admin
    admin.execute(f"CREATE TABLE IF NOT EXISTS {STAMPS} (enqueued_at float8, started_at float8)")
    admin.execute(f"TRUNCATE {STAMPS}")

    def stamped() -> int:
        row = admin.execute(f"SELECT count(*) FROM {STAMPS}").fetchone()
        return int(row[0]) if row else 0

    for _ in range(3):  # warm up: imports, connections, first-use caches
        system.enqueue_stamp(time.time())
    wait_for("warm-up jobs", lambda: stamped() >= 3, processes)
    time.sleep(0.5)  # the workers idle again
    admin.execute(f"TRUNCATE {STAMPS}")
    started = time.perf_counter()
    for n in range(count):
        pause = started + n / per_second - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        system.enqueue_stamp(time.time())
    wait_for(f"{count} latency jobs", lambda: stamped() >= count, processes)
    rows = admin.execute(f"SELECT started_at - enqueued_at FROM {STAMPS}").fetchall()
    cuts = statistics.quantiles([row[0] * 1000.0 for row in rows], n=100, method="inclusive")
    return cuts[49], cuts[98]


def measure(name: str, base: str, args: argparse.Namespace, scratch: str) -> Row:
    row = Row(name)
    system: System | None = None
    try:
        system = SYSTEMS[name](base)
        row.version, row.settings = system.version(), system.settings
        if not name.endswith(("x2", "2x16")):  # the same enqueue path as the row above
            system.empty()
            row.enqueue = rate(args.enqueue_jobs, system.enqueue)
            system.empty()
            rounds = max(args.enqueue_jobs // 100, 10)
            row.batch = rate(rounds, partial(system.enqueue_batch, 100)) * 100
        system.empty()
        system.enqueue_batches(args.jobs, 500)
        with workers(system, scratch) as processes:
            row.drain = drain(system, args.jobs, processes)
            if args.latency_jobs:
                row.p50, row.p99 = latency(system, args.latency_jobs, args.rate, processes)
    except Exception as exc:  # a peer that fails is a row, not a crash
        row.failure = f"{type(exc).__name__}: {exc}"
        traceback.print_exc(file=sys.stderr)
    finally:
        if system is not None:
            with contextlib.suppress(Exception):
                system.empty()
                system.close()
    return row


def baseline(base: str, count: int) -> Row:
    """A bare psycopg loop: one-row INSERT + COMMIT, one round trip and one WAL flush each."""
    schema = SCHEMAS["psycopg INSERT+COMMIT"]
    with psycopg.connect(conninfo(base, schema), autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
        admin.execute("CREATE TABLE IF NOT EXISTS baseline (id bigserial PRIMARY KEY, x text)")
        admin.execute("TRUNCATE baseline")
    row = Row("psycopg INSERT+COMMIT", importlib.metadata.version("psycopg"))
    row.settings = "one INSERT of one row, then COMMIT (two statements, one round trip each)"
    with psycopg.connect(conninfo(base, schema)) as conn:

        def insert() -> None:
            conn.execute("INSERT INTO baseline (x) VALUES (%s)", ("x",))
            conn.commit()

        row.enqueue = rate(count, insert)
        conn.autocommit = True

        def autocommitted() -> None:
            conn.execute("INSERT INTO baseline (x) VALUES (%s)", ("x",))

        row.extra["autocommit"] = rate(count, autocommitted)
    return row


# -- reporting -----------------------------------------------------------------


def figure(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def report(rows: list[Row], args: argparse.Namespace, server: str, load: tuple[str, str]) -> None:
    print(
        f"\n{server} at {args.postgres}; Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs; load average {load[0]} before, {load[1]} after"
    )
    print(
        f"{args.enqueue_jobs:,} single enqueues; drain of {args.jobs:,} no-op jobs; "
        f"latency over {args.latency_jobs} jobs at {args.rate:g}/s; "
        f"median of {args.repeat} round(s)\n"
    )
    print(
        "| system | version | settings | enqueue/s | batches of 100/s | drain/s "
        "| p50 ms | p99 ms |"
    )
    print("|---|---|---|--:|--:|--:|--:|--:|")
    for row in rows:
        if row.failure:
            print(f"| {row.name} | {row.version} | FAILED: {row.failure} | | | | | |")
            continue
        print(
            f"| {row.name} | {row.version} | {row.settings} | {figure(row.enqueue)} | "
            f"{figure(row.batch)} | {figure(row.drain)} | {figure(row.p50, 2)} | "
            f"{figure(row.p99, 2)} |"
        )
    named = {row.name: row for row in rows if not row.failure}
    bare = named.get("psycopg INSERT+COMMIT")
    if bare is not None and "autocommit" in bare.extra:
        print(f"\n(one autocommitted INSERT, one round trip: {bare.extra['autocommit']:,.0f}/s)")
    ours = named.get("flask-errands")
    peers = [row for name, row in named.items() if name.startswith("procrastinate")]
    print("\n| target | figure | ratio | met |")
    print("|---|---|--:|---|")

    def line(target: str, detail: str, ratio: float, goal: float, lower: bool = False) -> None:
        met = ratio <= goal if lower else ratio >= goal
        print(f"| {target} | {detail} | {ratio:.2f} | {'yes' if met else 'no'} |")

    if ours and bare and ours.enqueue and bare.enqueue:
        line(
            ".delay() >= 0.9x bare INSERT+COMMIT",
            f"{ours.enqueue:,.0f}/s vs {bare.enqueue:,.0f}/s",
            ours.enqueue / bare.enqueue,
            0.9,
        )
    if ours and ours.enqueue and ours.batch:
        line(
            "delay_many(100) >= 20x .delay()",
            f"{ours.batch:,.0f}/s vs {ours.enqueue:,.0f}/s",
            ours.batch / ours.enqueue,
            20,
        )
    best_ours = max(
        (row for name, row in named.items() if name.startswith("flask-errands")),
        key=lambda row: row.drain or 0,
        default=None,
    )
    best_peer = max(peers, key=lambda row: row.drain or 0, default=None)
    if best_ours and best_peer and best_ours.drain and best_peer.drain:
        line(
            "drain >= 4x Procrastinate's best",
            f"{best_ours.name} {best_ours.drain:,.0f}/s vs "
            f"{best_peer.name} {best_peer.drain:,.0f}/s",
            best_ours.drain / best_peer.drain,
            4,
        )
    if ours and ours.p50 is not None:
        line("pick-up p50 <= 2 ms, idle", f"{ours.p50:.2f} ms", ours.p50 / 2.0, 1.0, lower=True)
    enqueuer = next((row for row in peers if row.enqueue), None)
    if ours and enqueuer and ours.enqueue and enqueuer.enqueue:
        print(
            f"\n.delay() / Procrastinate defer(): {ours.enqueue / enqueuer.enqueue:.2f}; "
            f"delay_many(100) / batch_defer(100): "
            f"{(ours.batch or 0) / (enqueuer.batch or 1):.2f}"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--postgres", default="postgresql://postgres@127.0.0.1:5432/test", help="server URL"
    )
    parser.add_argument("--jobs", type=int, default=20_000, help="jobs in the drain")
    parser.add_argument("--quick", action="store_true", help="2,000 jobs in the drain")
    parser.add_argument("--enqueue-jobs", type=int, default=3_000, help="single enqueues timed")
    parser.add_argument("--latency-jobs", type=int, default=300, help="0 skips latency")
    parser.add_argument("--rate", type=float, default=50.0, help="jobs/s in latency runs")
    parser.add_argument(
        "--systems", default=",".join(SYSTEMS), help=f"comma-separated, of {', '.join(SYSTEMS)}"
    )
    parser.add_argument("--repeat", type=int, default=1, help="rounds; figures are medians")
    parser.add_argument("--serve", choices=list(SYSTEMS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.jobs = 2_000
        args.enqueue_jobs = min(args.enqueue_jobs, 1_000)
        args.latency_jobs = min(args.latency_jobs, 100)
    base = args.postgres
    if args.serve:
        SYSTEMS[args.serve](base).serve()
        return
    with psycopg.connect(base, autocommit=True) as conn:
        version = conn.execute("SHOW server_version").fetchone()
        commit = conn.execute("SHOW synchronous_commit").fetchone()
    server = (
        f"PostgreSQL {version[0] if version else '?'} (synchronous_commit={commit and commit[0]})"
    )
    load_before = f"{os.getloadavg()[0]:.2f}"
    names = ["psycopg INSERT+COMMIT", *(name.strip() for name in args.systems.split(","))]
    rounds: dict[str, list[Row]] = {name: [] for name in names}
    try:
        with tempfile.TemporaryDirectory(prefix="errands-pg-bench-") as scratch:
            for round_ in range(args.repeat):
                for name in names:
                    print(f"round {round_ + 1}: {name} ...", file=sys.stderr, flush=True)
                    if name == "psycopg INSERT+COMMIT":
                        rounds[name].append(baseline(base, args.enqueue_jobs))
                    else:
                        rounds[name].append(measure(name, base, args, scratch))
    finally:
        with psycopg.connect(base, autocommit=True) as conn:
            for schema in sorted(set(SCHEMAS.values())):
                conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    load_after = f"{os.getloadavg()[0]:.2f}"
    report([median_row(rows) for rows in rounds.values()], args, server, (load_before, load_after))


def median_row(rows: list[Row]) -> Row:
    """The median of each figure over the rounds that did not fail."""
    good = [row for row in rows if not row.failure]
    if not good:
        return rows[-1]

    def middle(values: list[float | None]) -> float | None:
        present = [value for value in values if value is not None]
        return statistics.median(present) if present else None

    first = good[0]
    return Row(
        first.name,
        first.version,
        first.settings,
        enqueue=middle([row.enqueue for row in good]),
        batch=middle([row.batch for row in good]),
        drain=middle([row.drain for row in good]),
        p50=middle([row.p50 for row in good]),
        p99=middle([row.p99 for row in good]),
        extra={key: statistics.median(row.extra[key] for row in good) for key in first.extra},
    )


if __name__ == "__main__":
    main()
