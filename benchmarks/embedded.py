"""Throughput and pick-up latency of flask-errands' embedded backends, with two baselines.

Measures, in one run, for flask-errands on ``memory://`` and ``sqlite:///`` (a file
in a temporary directory), for Huey's ``SqliteHuey`` and for a plain
``concurrent.futures.ThreadPoolExecutor``:

1. enqueue rate from one thread: ``task.delay()`` in a loop, and ``task.delay_many()``
   in batches of 100 (Huey has no batched enqueue: ``task.map()`` is the nearest);
2. drain rate with 4 worker threads: N no-op jobs are enqueued while no worker
   runs, then the worker starts and the clock runs until the backend counts
   every job finished;
3. enqueue-to-start latency (p50, p99) at a steady rate (50 jobs/s): each job
   gets ``time.time()`` at enqueue as its argument and records ``time.time()`` as
   its first statement, (a) with the worker in the enqueuing process and (b) with
   the worker in a separate process sharing the SQLite file.

Everything is written under a fresh temporary directory, removed at the end.
Run ``python benchmarks/embedded.py --help`` for the knobs; the defaults take
about two and a half minutes on a 2-core machine. Results and method: README.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import math
import os
import platform
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from flask import Flask

# Measure the checkout this script lives in, whatever copy of the package is installed.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "src"))

from flask_errands import Errands
from flask_errands.backends.base import FINISHED, SUCCEEDED

try:
    import huey
    from huey import SqliteHuey
    from huey.storage import SqliteStorage
except ImportError:  # pragma: no cover - the Huey rows are skipped
    huey = None

BATCH = 100
WORKERS = 4
#: Longest wait for a drain or for the last latency jobs before the row is marked failed.
PATIENCE = 120.0

# -- the jobs ----------------------------------------------------------------

#: Where ``stamp`` reports ``(enqueued_at, started_at)``; a list in-process, a file in a worker.
_stamps: list[tuple[float, float]] = []


def noop() -> None:
    """The drain and enqueue job: nothing, so the figures are the engine's own cost."""


def stamp(enqueued_at: float) -> None:
    """The latency job: note when it started, first thing."""
    _stamps.append((enqueued_at, time.time()))


errands = Errands()
errands_noop = errands.task(name="bench.noop")(noop)
errands_stamp = errands.task(name="bench.stamp")(stamp)

_huey_done = threading.Semaphore(0)


def _huey_noop() -> None:
    _huey_done.release()


if huey is not None:

    class NormalSyncStorage(SqliteStorage):
        """SqliteHuey's storage with ``synchronous=NORMAL``, the durability flask-errands uses."""

        def _create_connection(self) -> sqlite3.Connection:
            conn: sqlite3.Connection = super()._create_connection()
            conn.execute("PRAGMA synchronous = NORMAL")
            return conn


@dataclass
class HueyApp:
    """A SqliteHuey instance on one file with the benchmark's two tasks."""

    huey: Any
    noop: Any
    stamp: Any


def make_huey(path: str, synchronous: str) -> HueyApp:
    """SqliteHuey on ``path``; ``synchronous`` is NORMAL (matched) or FULL (Huey's default)."""
    storage = NormalSyncStorage if synchronous == "NORMAL" else SqliteStorage
    h = SqliteHuey("bench", filename=path, storage_class=storage)
    return HueyApp(h, h.task(name="bench.noop")(_huey_noop), h.task(name="bench.stamp")(stamp))


def make_app(url: str, directory: str, *, embedded: bool, synchronous: str = "NORMAL") -> Flask:
    """A Flask app with flask-errands on ``url``; ``synchronous`` applies to SQLite."""
    app = Flask("errands_bench", instance_path=directory)
    app.config.update(
        ERRANDS_URL=url, ERRANDS_EMBEDDED_WORKER=embedded, ERRANDS_CONCURRENCY=WORKERS
    )
    errands.init_app(app)
    if synchronous != "NORMAL":
        # Not a setting users have: swap in a backend built with the other PRAGMA.
        from flask_errands.backends.sqlite import SQLiteBackend

        state = app.extensions["errands"]
        state.backend.close()
        state.backend = state.runner.backend = SQLiteBackend(
            url[len("sqlite:///") :], synchronous=synchronous
        )
    return app


@contextlib.contextmanager
def errands_app(url: str, directory: str, **options: Any) -> Iterator[Flask]:
    app = make_app(url, directory, **options)
    try:
        with app.app_context():
            try:
                yield app
            finally:
                errands.stop_worker(grace=5)
    finally:
        app.extensions["errands"].backend.close()


def finished_count(app: Flask) -> int:
    """How many jobs the backend counts as finished; raises if any did not succeed."""
    counts = app.extensions["errands"].backend.counts()
    bad = {key: n for key, n in counts.items() if key[1] in FINISHED and key[1] != SUCCEEDED}
    if bad:
        raise RuntimeError(f"jobs did not succeed: {bad}")
    return sum(n for (_, status), n in counts.items() if status in FINISHED)


def wait_finished(app: Flask, total: int) -> None:
    """Poll the backend's counts until ``total`` jobs finished.

    The pause between polls is at least 20 times the last poll's cost, so polling
    takes under 5% of the backend's time however large the table grows.
    """
    deadline = time.monotonic() + PATIENCE
    while True:
        started = time.perf_counter()
        if finished_count(app) >= total:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{total} jobs not finished after {PATIENCE:.0f}s")
        time.sleep(max(0.005, 20 * (time.perf_counter() - started)))


# -- measurements ------------------------------------------------------------


def rate(n: int, call: Callable[[], object], cap: float, per_call: int = 1) -> float:
    """Jobs per second of ``call()`` repeated up to ``n`` jobs or ``cap`` seconds."""
    done = 0
    started = time.perf_counter()
    while done < n:
        call()
        done += per_call
        if done % 1000 < per_call and time.perf_counter() - started > cap:
            break
    return done / (time.perf_counter() - started)


def percentiles(samples: list[float]) -> tuple[float, float]:
    """p50 and p99 of latencies in seconds, returned in milliseconds."""
    ordered = sorted(samples)
    p99 = ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]
    return statistics.median(ordered) * 1e3, p99 * 1e3


def latencies(stamps: list[tuple[float, float]]) -> tuple[float, float]:
    """p50 and p99 in ms of start minus enqueue; warm-up jobs (enqueued at 0) are left out."""
    return percentiles([started - enqueued for enqueued, started in stamps if enqueued > 0])


def wait_for(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` every 10 ms; raise after ``PATIENCE`` seconds."""
    deadline = time.monotonic() + PATIENCE
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting after {PATIENCE:.0f}s")
        time.sleep(0.01)


def warm_then_paced(
    opts: Options, warm_up: Callable[[], object], done: Callable[[], int]
) -> Iterator[None]:
    """Run one warm-up job to its start, then yield at the latency run's steady rate."""
    warm_up()
    wait_for(lambda: done() >= 1)
    yield from paced(opts.latency_seconds, opts.rate)


def paced(seconds: float, per_second: float) -> Iterator[None]:
    """Yield at a steady ``per_second`` for ``seconds``; late yields are not made up by bursts."""
    started = time.perf_counter()
    for i in range(int(seconds * per_second)):
        pause = started + i / per_second - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        yield


@dataclass
class Options:
    jobs: int
    latency_seconds: float
    rate: float
    repeat: int
    cap: float
    directory: str
    latency: bool
    counter: Iterator[int] = field(default_factory=lambda: iter(range(1_000_000)))

    def path(self, name: str) -> str:
        """A new file name in the scratch directory."""
        return os.path.join(self.directory, f"{name}-{next(self.counter)}.db")


def errands_url(kind: str, opts: Options) -> str:
    return "memory://" if kind == "memory" else "sqlite:///" + opts.path("errands")


def errands_enqueue(kind: str, opts: Options, sync: str = "NORMAL") -> tuple[float, float]:
    url = errands_url(kind, opts)
    with errands_app(url, opts.directory, embedded=False, synchronous=sync):
        single = rate(opts.jobs, errands_noop.delay, opts.cap)
        batch = [()] * BATCH
        many = rate(opts.jobs, lambda: errands_noop.delay_many(batch), opts.cap, BATCH)
    return single, many


def errands_drain(kind: str, opts: Options, sync: str = "NORMAL") -> float:
    url = errands_url(kind, opts)
    with errands_app(url, opts.directory, embedded=False, synchronous=sync) as app:
        for _ in range(opts.jobs // BATCH):
            errands_noop.delay_many([()] * BATCH)
        total = opts.jobs // BATCH * BATCH
        started = time.perf_counter()
        errands.start_worker()
        wait_finished(app, total)
        return total / (time.perf_counter() - started)


def errands_latency_local(kind: str, opts: Options) -> tuple[float, float]:
    url = errands_url(kind, opts)
    _stamps.clear()
    with errands_app(url, opts.directory, embedded=True):
        errands.start_worker()
        n = 0
        for _ in warm_then_paced(opts, lambda: errands_stamp.delay(0.0), lambda: len(_stamps)):
            errands_stamp.delay(time.time())
            n += 1
        wait_for(lambda: len(_stamps) > n)
    return latencies(_stamps)


@contextlib.contextmanager
def worker_process(kind: str, db: str, out: str, synchronous: str = "NORMAL") -> Iterator[None]:
    """Run ``--serve kind`` in a child process for the block; it writes stamps to ``out``."""
    command = [sys.executable, os.path.abspath(__file__), "--serve", kind, "--db", db]
    command += ["--out", out, "--sync", synchronous]
    child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdin is not None
        if child.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the {kind} worker process did not start")
        yield
        child.stdin.close()  # asks the worker to stop and write its stamps
        child.wait(PATIENCE)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def read_stamps(out: str) -> list[tuple[float, float]]:
    with open(out, encoding="ascii") as lines:
        return [(float(a), float(b)) for a, b in (line.split() for line in lines)]


def errands_latency_remote(opts: Options) -> tuple[float, float]:
    url = errands_url("sqlite", opts)
    out = os.path.join(opts.directory, f"stamps-{next(opts.counter)}.txt")
    with (
        errands_app(url, opts.directory, embedded=False) as app,
        worker_process("errands", url[len("sqlite:///") :], out),
    ):
        n = 0
        warm = lambda: errands_stamp.delay(0.0)  # noqa: E731
        for _ in warm_then_paced(opts, warm, lambda: finished_count(app)):
            errands_stamp.delay(time.time())
            n += 1
        wait_finished(app, n + 1)
    return latencies(read_stamps(out))


@contextlib.contextmanager
def huey_consumer(h: Any, workers: int) -> Iterator[None]:
    """Huey's consumer in this process, as ``huey_consumer -w N -k thread`` runs it."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    hup = signal.getsignal(signal.SIGHUP) if hasattr(signal, "SIGHUP") else None
    consumer = h.create_consumer(workers=workers, worker_type="thread")
    consumer.start()
    try:
        yield
    finally:
        consumer.stop(graceful=True)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if hup is not None:
            signal.signal(signal.SIGHUP, hup)


def huey_enqueue(opts: Options, sync: str) -> tuple[float, float]:
    h = make_huey(opts.path("huey"), sync)
    single = rate(opts.jobs, h.noop, opts.cap)
    batch = [()] * BATCH
    many = rate(opts.jobs, lambda: h.noop.map(batch), opts.cap, BATCH)
    h.huey.storage.close()
    return single, many


def huey_drain(opts: Options, sync: str, workers: int) -> float:
    h = make_huey(opts.path("huey"), sync)
    for _ in range(opts.jobs):
        h.noop()
    while _huey_done.acquire(blocking=False):
        pass
    started = time.perf_counter()
    with huey_consumer(h.huey, workers):
        for _ in range(opts.jobs):
            if not _huey_done.acquire(timeout=PATIENCE):
                raise TimeoutError(f"SqliteHuey did not drain {opts.jobs} jobs")
        elapsed = time.perf_counter() - started
    h.huey.storage.close()
    return opts.jobs / elapsed


def huey_latency_local(opts: Options, sync: str) -> tuple[float, float]:
    h = make_huey(opts.path("huey"), sync)
    _stamps.clear()
    with huey_consumer(h.huey, WORKERS):
        n = 0
        for _ in warm_then_paced(opts, lambda: h.stamp(0.0), lambda: len(_stamps)):
            h.stamp(time.time())
            n += 1
        wait_for(lambda: len(_stamps) > n)
    h.huey.storage.close()
    return latencies(_stamps)


def huey_latency_remote(opts: Options, sync: str) -> tuple[float, float]:
    db = opts.path("huey")
    out = os.path.join(opts.directory, f"stamps-{next(opts.counter)}.txt")
    h = make_huey(db, sync)
    with worker_process("huey", db, out, sync):
        h.stamp(0.0)  # warm-up, not counted
        wait_for(lambda: not h.huey.pending_count())
        for _ in paced(opts.latency_seconds, opts.rate):
            h.stamp(time.time())
        wait_for(lambda: not h.huey.pending_count())
    h.huey.storage.close()  # the consumer stops gracefully: dequeued jobs still start
    return latencies(read_stamps(out))


@contextlib.contextmanager
def gated_pool() -> Iterator[tuple[concurrent.futures.ThreadPoolExecutor, threading.Event]]:
    """A pool of 4 threads held on a gate, so submissions queue up as if no worker ran."""
    gate = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        for _ in range(WORKERS):
            pool.submit(gate.wait)
        try:
            yield pool, gate
        finally:
            gate.set()


def pool_enqueue(opts: Options) -> tuple[float, float]:
    with gated_pool() as (pool, _):
        single = rate(opts.jobs, lambda: pool.submit(noop), opts.cap)
    with gated_pool() as (pool, _):
        many = rate(opts.jobs, lambda: [pool.submit(noop) for _ in range(BATCH)], opts.cap, BATCH)
    return single, many


def pool_drain(opts: Options) -> float:
    with gated_pool() as (pool, gate):
        futures = [pool.submit(noop) for _ in range(opts.jobs)]
        started = time.perf_counter()
        gate.set()
        concurrent.futures.wait(futures)
        return opts.jobs / (time.perf_counter() - started)


def pool_latency(opts: Options) -> tuple[float, float]:
    _stamps.clear()
    with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        pool.submit(stamp, 0.0).result()  # warm-up, not counted
        futures = [pool.submit(stamp, time.time()) for _ in paced(opts.latency_seconds, opts.rate)]
        concurrent.futures.wait(futures)
    return latencies(_stamps)


# -- the run -----------------------------------------------------------------

Pair = tuple[float, float]


@dataclass
class Row:
    """One system's figures; None where a measurement does not apply or was skipped."""

    name: str
    enqueue: Callable[[], Pair] | None = None
    drain: Callable[[], float] | None = None
    local: Callable[[], Pair] | None = None
    remote: Callable[[], Pair] | None = None
    results: dict[str, Any] = field(default_factory=dict)


def build_rows(opts: Options) -> dict[str, Row]:
    rows = {
        "memory": Row(
            "flask-errands memory://",
            lambda: errands_enqueue("memory", opts),
            lambda: errands_drain("memory", opts),
            lambda: errands_latency_local("memory", opts),
        ),
        "sqlite": Row(
            "flask-errands sqlite:/// (synchronous=NORMAL)",
            lambda: errands_enqueue("sqlite", opts),
            lambda: errands_drain("sqlite", opts),
            lambda: errands_latency_local("sqlite", opts),
            lambda: errands_latency_remote(opts),
        ),
        "sqlite-full": Row(
            "flask-errands sqlite:/// (synchronous=FULL)",
            lambda: errands_enqueue("sqlite", opts, "FULL"),
            lambda: errands_drain("sqlite", opts, "FULL"),
        ),
    }
    if huey is not None:
        rows["huey"] = Row(
            f"SqliteHuey, {WORKERS} threads (synchronous=NORMAL)",
            lambda: huey_enqueue(opts, "NORMAL"),
            lambda: huey_drain(opts, "NORMAL", WORKERS),
            lambda: huey_latency_local(opts, "NORMAL"),
            lambda: huey_latency_remote(opts, "NORMAL"),
        )
        rows["huey-1"] = Row(
            "SqliteHuey, 1 thread (synchronous=NORMAL)",
            drain=lambda: huey_drain(opts, "NORMAL", 1),
        )
        rows["huey-full"] = Row(
            f"SqliteHuey defaults, {WORKERS} threads (synchronous=FULL)",
            lambda: huey_enqueue(opts, "FULL"),
            lambda: huey_drain(opts, "FULL", WORKERS),
        )
    rows["pool"] = Row(
        f"ThreadPoolExecutor({WORKERS})",
        lambda: pool_enqueue(opts),
        lambda: pool_drain(opts),
        lambda: pool_latency(opts),
    )
    return rows


def median_pair(pairs: list[Pair]) -> Pair:
    return statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)


def run(rows: dict[str, Row], opts: Options) -> None:
    # Rounds interleave the systems, so a burst of load from a neighbour spreads over all.
    for round_ in range(opts.repeat):
        for row in rows.values():
            if row.enqueue is not None:
                row.results.setdefault("enqueue", []).append(row.enqueue())
            if row.drain is not None:
                row.results.setdefault("drain", []).append(row.drain())
        print(f"  round {round_ + 1}/{opts.repeat} of enqueue and drain done", file=sys.stderr)
    if not opts.latency:
        return
    for row in rows.values():
        for mode in ("local", "remote"):
            measure = getattr(row, mode)
            if measure is not None:
                row.results[mode] = measure()
                print(f"  latency {mode}: {row.name} done", file=sys.stderr)


def fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def report(rows: dict[str, Row], opts: Options) -> None:
    print(
        f"\npython {platform.python_version()}, SQLite {sqlite3.sqlite_version}, "
        f"flask {flask_version()}, flask-errands {flask_errands_version()}, "
        f"huey {huey.__version__ if huey else 'not installed'}, {os.cpu_count()} CPUs"
    )
    print(
        f"{opts.jobs:,} jobs per enqueue/drain figure (median of {opts.repeat}); "
        f"latency at {opts.rate:g} jobs/s for {opts.latency_seconds:g}s; "
        f"{WORKERS} worker threads\n"
    )
    head = (
        "| system | enqueue/s `delay()` | enqueue/s batches of 100 | drain/s |"
        " in-process p50 / p99 ms | cross-process p50 / p99 ms |"
    )
    print(head)
    print("|---|--:|--:|--:|--:|--:|")
    figures: dict[str, dict[str, Any]] = {}
    for key, row in rows.items():
        got: dict[str, Any] = {}
        if "enqueue" in row.results:
            got["enqueue"], got["batch"] = median_pair(row.results["enqueue"])
        if "drain" in row.results:
            got["drain"] = statistics.median(row.results["drain"])
        got["local"] = row.results.get("local")
        got["remote"] = row.results.get("remote")
        figures[key] = got

        def lat(pair: Pair | None) -> str:
            return "-" if pair is None else f"{pair[0]:.2f} / {pair[1]:.2f}"

        print(
            f"| {row.name} | {fmt(got.get('enqueue'))} | {fmt(got.get('batch'))} |"
            f" {fmt(got.get('drain'))} | {lat(got['local'])} | {lat(got['remote'])} |"
        )
    print_targets(figures)


def print_targets(figures: dict[str, dict[str, Any]]) -> None:
    sq, hu = figures.get("sqlite", {}), figures.get("huey", {})
    print("\nTargets (issue 2):")
    if "enqueue" in sq and "enqueue" in hu:
        print(
            f"  SQLite enqueue / SqliteHuey enqueue (both NORMAL): "
            f"{sq['enqueue'] / hu['enqueue']:.2f}x (target >= 2x)"
        )
    if "drain" in sq and "drain" in hu:
        best = max(f.get("drain", 0.0) for k, f in figures.items() if k.startswith("huey"))
        print(
            f"  SQLite drain / SqliteHuey drain ({WORKERS} threads): "
            f"{sq['drain'] / hu['drain']:.2f}x; / best SqliteHuey drain: "
            f"{sq['drain'] / best:.2f}x (target >= 2x)"
        )
    if sq.get("remote"):
        print(f"  SQLite pick-up p50 across processes: {sq['remote'][0]:.2f} ms (target < 5 ms)")
    if sq.get("local"):
        print(f"  SQLite pick-up p50 in-process: {sq['local'][0]:.2f} ms (target < 1 ms)")
    mem = figures.get("memory", {})
    if mem.get("local"):
        print(f"  memory pick-up p50 in-process: {mem['local'][0]:.2f} ms (target < 1 ms)")
    full = figures.get("sqlite-full", {})
    if "enqueue" in full and "enqueue" in sq:
        cost = (1 / full["enqueue"] - 1 / sq["enqueue"]) * 1e6
        print(f"  synchronous=FULL costs {cost:.0f} us per delay() (one commit each)")


def flask_version() -> str:
    from importlib.metadata import version

    return version("flask")


def flask_errands_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("flask-errands")
    except PackageNotFoundError:
        return "source"


# -- the worker process of the cross-process latency figures ------------------


def serve(kind: str, db: str, out: str, synchronous: str) -> None:
    """Run a worker on ``db`` until stdin closes, then write the stamps to ``out``."""
    if kind == "errands":
        directory = os.path.dirname(db)
        app = make_app("sqlite:///" + db, directory, embedded=False)
        with app.app_context():
            errands.start_worker()
            print("ready", flush=True)
            sys.stdin.read()
            errands.stop_worker(grace=5)
    else:
        h = make_huey(db, synchronous)
        consumer = h.huey.create_consumer(workers=WORKERS, worker_type="thread")
        consumer.start()
        print("ready", flush=True)
        sys.stdin.read()
        consumer.stop(graceful=True)
    with open(out, "w", encoding="ascii") as lines:
        lines.writelines(f"{a!r} {b!r}\n" for a, b in _stamps)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=5000, help="jobs per enqueue/drain figure")
    parser.add_argument(
        "--latency-seconds", type=float, default=15.0, help="sampling time per latency figure"
    )
    parser.add_argument("--rate", type=float, default=50.0, help="jobs/s in latency runs")
    parser.add_argument("--repeat", type=int, default=3, help="enqueue/drain rounds (median)")
    parser.add_argument(
        "--cap", type=float, default=5.0, help="longest seconds one enqueue figure may take"
    )
    parser.add_argument("--no-latency", action="store_true", help="skip the latency runs")
    parser.add_argument(
        "--only", help="comma-separated rows: memory,sqlite,sqlite-full,huey,huey-1,huey-full,pool"
    )
    parser.add_argument("--dir", help="parent of the scratch directory (default: system temp)")
    parser.add_argument("--serve", choices=["errands", "huey"], help=argparse.SUPPRESS)
    parser.add_argument("--db", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--sync", default="NORMAL", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, args.db, args.out, args.sync)
        return
    directory = tempfile.mkdtemp(prefix="errands-bench-", dir=args.dir)
    opts = Options(
        jobs=args.jobs,
        latency_seconds=args.latency_seconds,
        rate=args.rate,
        repeat=args.repeat,
        cap=args.cap,
        directory=directory,
        latency=not args.no_latency,
    )
    try:
        rows = build_rows(opts)
        if args.only:
            wanted = args.only.split(",")
            unknown = set(wanted) - set(rows)
            if unknown:
                parser.error(f"unknown rows: {', '.join(sorted(unknown))}")
            rows = {key: rows[key] for key in wanted}
        started = time.monotonic()
        run(rows, opts)
        report(rows, opts)
        print(f"\n(total {time.monotonic() - started:.0f}s)")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
