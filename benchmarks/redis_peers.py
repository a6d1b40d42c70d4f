"""flask-errands on Redis, side by side with Celery, RQ, Dramatiq and Huey on the same server.

Measures, in one run, against one Redis server (each system in a database of its
own, emptied before and after; nothing is written outside Redis and /tmp):

1. enqueue rate from one thread: a loop of single enqueues of a no-op task for
   every system, and flask-errands' ``delay_many()`` in batches of 100 and 1000
   (RQ's ``enqueue_many()`` too, the only peer with a batch call); the baseline
   is a bare redis-py ``LPUSH`` loop, one command and one round trip each;
2. drain rate: N no-op jobs are enqueued while no worker runs, then the workers
   start; the rate counts from the first finished job to the last, so start-up
   time is left out. Settings: flask-errands' worker defaults (one process, 4
   threads), Huey 2 worker processes, Dramatiq 2 processes x 8 threads, Celery
   prefork with 2 processes, RQ 2 SimpleWorker processes;
3. enqueue-to-start latency p50/p99 at a steady rate (50 jobs/s) against an idle
   worker: each job carries ``time.time()`` at enqueue and records ``time.time()``
   as its first statement.

A system that fails or times out is reported as failed; the run always finishes.
Run ``python benchmarks/redis_peers.py --help`` for the knobs; the defaults take
about four minutes on a 2-core machine, and each ``--repeat`` round as long again.
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

import redis

#: The database each system uses on the server, so each can be emptied on its own.
DATABASES = {
    "flask-errands": 10,
    "flask-errands x2": 10,
    "celery": 11,  # broker; results in 12
    "rq": 13,
    "dramatiq": 14,
    "huey": 15,
    "redis-py LPUSH": 15,
}
CELERY_RESULTS_DB = 12
#: Longest wait for a drain, or for the last latency jobs, before the system is marked failed.
PATIENCE = 180.0
STAMPS = "bench:stamps"

_stamp_client: redis.Redis | None = None


def _stamp(url: str, enqueued_at: float) -> None:
    """The latency job's body, in every system: note when it started, first thing."""
    started = time.time()
    global _stamp_client
    if _stamp_client is None:
        _stamp_client = redis.Redis.from_url(url)
    _stamp_client.rpush(STAMPS, f"{enqueued_at!r} {started!r}")


def _noop() -> None:
    """The drain and enqueue job: nothing, so the figures are the queue's own cost."""


#: RQ refuses functions of ``__main__``: its workers import this file as a module by name.
RQ_NOOP = f"{Path(__file__).stem}._noop"
RQ_STAMP = f"{Path(__file__).stem}._stamp"


# -- one adapter per system ----------------------------------------------------


class System:
    """What the benchmark needs of a job queue: enqueue, count finished jobs, serve."""

    name = ""
    settings = ""
    package = ""

    def __init__(self, base: str) -> None:
        self.base = base
        self.url = f"{base}/{DATABASES[self.name]}"

    def version(self) -> str:
        return importlib.metadata.version(self.package)

    def enqueue(self) -> None:
        raise NotImplementedError

    def enqueue_batches(self, count: int, size: int) -> None:
        """Enqueue ``count`` no-op jobs in batches of ``size``, as the system does best."""
        for _ in range(count):
            self.enqueue()

    def enqueue_stamp(self, now: float) -> None:
        raise NotImplementedError

    def finished(self) -> int:
        raise NotImplementedError

    def workers(self) -> int:
        """How many worker processes to start, each running :meth:`serve`."""
        return 1

    def serve(self) -> None:
        raise NotImplementedError

    def empty(self) -> None:
        redis.Redis.from_url(self.url).flushdb()

    has_batches = False

    def close(self) -> None:
        pass


class Errands(System):
    name = "flask-errands"
    settings = "1 worker process, 4 threads (ERRANDS_CONCURRENCY default)"
    package = "flask-errands"
    has_batches = True

    def __init__(self, base: str) -> None:
        super().__init__(base)
        from flask import Flask

        from flask_errands import Errands as Extension

        self.app = Flask("redis_peers", instance_path=tempfile.gettempdir())
        self.app.config.update(ERRANDS_URL=self.url + "?prefix=bench:", **self.config())
        self.errands = Extension(self.app)
        self.noop = self.errands.task(name="bench.noop")(lambda: None)
        url = self.url
        self.stamp = self.errands.task(name="bench.stamp")(lambda at: _stamp(url, at))
        self.context = self.app.app_context()
        self.context.push()

    def config(self) -> dict[str, Any]:
        """More of the app's config (``rabbitmq_peers`` adds its broker)."""
        return {}

    def enqueue(self) -> None:
        self.noop.delay()

    def enqueue_batches(self, count: int, size: int) -> None:
        for start in range(0, count, size):
            self.noop.delay_many([()] * min(size, count - start))

    def enqueue_stamp(self, now: float) -> None:
        self.stamp.delay(now)

    def finished(self) -> int:
        counts = self.errands.backend.counts()
        return sum(n for (_, status), n in counts.items() if status == "succeeded")

    def serve(self) -> None:
        self.errands.start_worker()
        while True:
            time.sleep(3600)

    def close(self) -> None:
        self.errands.backend.close()
        self.context.pop()


class ErrandsTwoProcesses(Errands):
    """Not a default: how the drain scales with a second process, as Huey and Dramatiq use."""

    name = "flask-errands x2"
    settings = "2 worker processes x 4 threads (as `flask errands worker --processes 2`)"
    has_batches = False

    def workers(self) -> int:
        return 2


class Celery(System):
    name = "celery"
    settings = "prefork -c 2, Redis broker and result backend, no gossip/mingle/heartbeat"
    package = "celery"

    def __init__(self, base: str) -> None:
        super().__init__(base)
        import celery

        self.app = celery.Celery(
            "bench",
            broker=self.broker_url(),
            backend=f"{base}/{CELERY_RESULTS_DB}",
            set_as_current=False,
        )
        self.app.conf.update(worker_hijack_root_logger=False, broker_connection_retry=True)
        self.app.conf.broker_connection_retry_on_startup = True
        self.noop = self.app.task(name="bench.noop")(_noop)
        self.stamp = self.app.task(name="bench.stamp")(_stamp)

    def broker_url(self) -> str:
        """Where Celery's messages go: this Redis database (``rabbitmq_peers`` says RabbitMQ)."""
        return self.url

    def enqueue(self) -> None:
        self.noop.delay()

    def enqueue_stamp(self, now: float) -> None:
        self.stamp.delay(self.url, now)

    def finished(self) -> int:
        return int(redis.Redis.from_url(f"{self.base}/{CELERY_RESULTS_DB}").dbsize())

    def serve(self) -> None:
        self.app.worker_main(
            [
                *("worker", "-P", "prefork", "-c", "2", "-l", "WARNING"),
                *("--without-gossip", "--without-mingle", "--without-heartbeat"),
            ]
        )

    def empty(self) -> None:
        super().empty()
        redis.Redis.from_url(f"{self.base}/{CELERY_RESULTS_DB}").flushdb()

    def close(self) -> None:
        self.app.close()


class RQ(System):
    name = "rq"
    settings = "2 SimpleWorker processes"
    package = "rq"
    has_batches = True

    def __init__(self, base: str) -> None:
        super().__init__(base)
        import rq

        self.rq = rq
        self.connection = redis.Redis.from_url(self.url)
        self.queue = rq.Queue("default", connection=self.connection)

    def enqueue(self) -> None:
        self.queue.enqueue(RQ_NOOP)

    def enqueue_batches(self, count: int, size: int) -> None:
        for start in range(0, count, size):
            calls = [self.rq.Queue.prepare_data(RQ_NOOP) for _ in range(min(size, count - start))]
            self.queue.enqueue_many(calls)

    def enqueue_stamp(self, now: float) -> None:
        self.queue.enqueue(RQ_STAMP, self.url, now)

    def finished(self) -> int:
        return int(self.queue.finished_job_registry.count)

    def workers(self) -> int:
        return 2

    def serve(self) -> None:
        self.rq.SimpleWorker([self.queue], connection=self.connection).work(
            logging_level="WARNING"
        )


class Dramatiq(System):
    name = "dramatiq"
    settings = "2 processes x 8 threads (the dramatiq CLI's defaults on 2 cores)"
    package = "dramatiq"

    def __init__(self, base: str) -> None:
        super().__init__(base)
        import dramatiq

        self.dramatiq = dramatiq
        self.broker = self.make_broker()
        dramatiq.set_broker(self.broker)
        self.noop = dramatiq.actor(actor_name="bench_noop", max_retries=0)(self.noop_body())
        url = self.url
        self.stamp = dramatiq.actor(actor_name="bench_stamp", max_retries=0)(
            lambda at: _stamp(url, at)
        )
        self.client = redis.Redis.from_url(self.url)
        self.total = 0

    def make_broker(self) -> Any:
        from dramatiq.brokers.redis import RedisBroker

        return RedisBroker(url=self.url)

    def noop_body(self) -> Callable[[], None]:
        return _dramatiq_noop

    def enqueue(self) -> None:
        self.noop.send()
        self.total += 1

    def enqueue_stamp(self, now: float) -> None:
        self.stamp.send(now)

    def finished(self) -> int:
        # Dramatiq keeps no results: a message leaves this hash when its job is acked.
        return self.total - int(self.client.hlen("dramatiq:default.msgs"))

    def workers(self) -> int:
        return 2

    def serve(self) -> None:
        worker = self.dramatiq.Worker(self.broker, worker_threads=8)
        worker.start()
        while True:
            time.sleep(3600)

    def empty(self) -> None:
        super().empty()
        self.total = 0


def _dramatiq_noop() -> None:
    pass


class Huey(System):
    name = "huey"
    settings = "RedisHuey, 2 worker processes (consumer -w 2 -k process)"
    package = "huey"

    def __init__(self, base: str) -> None:
        super().__init__(base)
        from huey import RedisHuey

        self.huey = RedisHuey("bench", url=self.url)
        # A result to store, as every other system here keeps one per job.
        self.noop = self.huey.task(name="bench.noop")(lambda: True)
        url = self.url
        self.stamp = self.huey.task(name="bench.stamp")(lambda at: _stamp(url, at))

    def enqueue(self) -> None:
        self.noop()

    def enqueue_stamp(self, now: float) -> None:
        self.stamp(now)

    def finished(self) -> int:
        return int(self.huey.result_count())

    def serve(self) -> None:
        self.huey.create_consumer(workers=2, worker_type="process").run()


SYSTEMS: dict[str, type[System]] = {
    system.name: system for system in (Errands, ErrandsTwoProcesses, Huey, Dramatiq, Celery, RQ)
}


# -- measuring -----------------------------------------------------------------


@dataclass
class Row:
    """One system's figures; a figure left None was not measured."""

    name: str
    version: str = ""
    settings: str = ""
    enqueue: float | None = None
    batches: dict[int, float] = field(default_factory=dict)
    drain: float | None = None
    p50: float | None = None
    p99: float | None = None
    failure: str | None = None


def rate(count: int, work: Callable[[], None]) -> float:
    """Calls per second of ``work``, called ``count`` times."""
    started = time.perf_counter()
    for _ in range(count):
        work()
    return count / (time.perf_counter() - started)


@contextlib.contextmanager
def workers(
    system: System, scratch: str, script: str = __file__
) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Start the system's worker processes (each in its own session), and kill them after.

    Each runs ``script --serve NAME --redis BASE``: this file, or another benchmark
    that reuses this harness with systems of its own.
    """
    processes = []
    for n in range(system.workers()):
        log = open(os.path.join(scratch, f"{system.name}-{n}.log"), "wb")  # noqa: SIM115
        command = [sys.executable, script, "--serve", system.name, "--redis", system.base]
        processes.append(subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True))
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
        time.sleep(0.005)


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
    client = redis.Redis.from_url(system.url)
    client.delete(STAMPS)
    for _ in range(3):  # warm up: imports, connections, first-use caches
        system.enqueue_stamp(time.time())
    wait_for("warm-up jobs", lambda: client.llen(STAMPS) >= 3, processes)
    client.delete(STAMPS)
    started = time.perf_counter()
    for n in range(count):
        pause = started + n / per_second - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        system.enqueue_stamp(time.time())
    wait_for(f"{count} latency jobs", lambda: client.llen(STAMPS) >= count, processes)
    delays = []
    for item in client.lrange(STAMPS, 0, -1):
        enqueued_at, started_at = map(float, item.split())
        delays.append((started_at - enqueued_at) * 1000.0)
    cuts = statistics.quantiles(delays, n=100, method="inclusive")
    return cuts[49], cuts[98]


def measure(
    name: str,
    base: str,
    args: argparse.Namespace,
    scratch: str,
    systems: dict[str, type[System]] = SYSTEMS,
    script: str = __file__,
) -> Row:
    """One round of every figure for system ``name`` of ``systems``, served by ``script``."""
    row = Row(name)
    system: System | None = None
    try:
        system = systems[name](base)
        row.version, row.settings = system.version(), system.settings
        system.empty()
        row.enqueue = rate(args.enqueue_jobs, system.enqueue)
        if system.has_batches:
            for size in (100, 1000):
                system.empty()
                rounds = max(args.enqueue_jobs // size, 10)
                batch = partial(system.enqueue_batches, size, size)
                row.batches[size] = rate(rounds, batch) * size
        system.empty()
        system.enqueue_batches(args.jobs, 500)
        with workers(system, scratch, script) as processes:
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
    """A bare redis-py LPUSH loop: one command, one round trip, nothing else."""
    client = redis.Redis.from_url(f"{base}/{DATABASES['redis-py LPUSH']}")
    key = "bench:lpush-baseline"
    client.delete(key)
    row = Row("redis-py LPUSH", importlib.metadata.version("redis"), "one LPUSH per call")
    row.enqueue = rate(count, partial(client.lpush, key, b"x"))
    client.delete(key)
    return row


# -- reporting -----------------------------------------------------------------


def figure(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def report(rows: list[Row], args: argparse.Namespace, server: str, load: tuple[str, str]) -> None:
    print(
        f"\nRedis {server} at {args.redis}; Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs; load average {load[0]} before, {load[1]} after"
    )
    print(
        f"{args.enqueue_jobs:,} single enqueues; drain of {args.jobs:,} no-op jobs; "
        f"latency over {args.latency_jobs} jobs at {args.rate:g}/s; "
        f"median of {args.repeat} round(s)\n"
    )
    print(
        "| system | version | settings | enqueue/s | delay_many/s (100; 1000) | drain/s "
        "| p50 ms | p99 ms |"
    )
    print("|---|---|---|--:|--:|--:|--:|--:|")
    for row in rows:
        batches = "; ".join(figure(row.batches.get(size)) for size in (100, 1000))
        if row.failure:
            print(f"| {row.name} | {row.version} | FAILED: {row.failure} | | | | | |")
            continue
        print(
            f"| {row.name} | {row.version} | {row.settings} | {figure(row.enqueue)} | "
            f"{batches if row.batches else '-'} | {figure(row.drain)} | "
            f"{figure(row.p50, 2)} | {figure(row.p99, 2)} |"
        )
    ours = next((row for row in rows if row.name == "flask-errands" and not row.failure), None)
    lpush = next(row for row in rows if row.name == "redis-py LPUSH")
    peers = [row for row in rows if not row.name.startswith(("flask-errands", "redis-py"))]
    peers = [row for row in peers if not row.failure]
    if ours is None or not peers:
        print("\nno ratios: flask-errands or every peer failed")
        return
    best_drain = max(peers, key=lambda row: row.drain or 0)
    best_enqueue = max(peers, key=lambda row: row.enqueue or 0)
    huey = next((row for row in peers if row.name == "huey"), None)
    print("\n| target | figure | ratio | met |")
    print("|---|---|--:|---|")

    def line(target: str, detail: str, ratio: float, met: bool) -> None:
        print(f"| {target} | {detail} | {ratio:.2f} | {'yes' if met else 'no'} |")

    if ours.drain and best_drain.drain:
        ratio = ours.drain / best_drain.drain
        line(
            "drain >= 2x the fastest peer",
            f"{ours.drain:,.0f}/s vs {best_drain.name} {best_drain.drain:,.0f}/s",
            ratio,
            ratio >= 2,
        )
    if ours.enqueue and lpush.enqueue:
        ratio = ours.enqueue / lpush.enqueue
        line(
            ".delay() >= 0.9x bare LPUSH",
            f"{ours.enqueue:,.0f}/s vs {lpush.enqueue:,.0f}/s",
            ratio,
            ratio >= 0.9,
        )
    if ours.batches and best_enqueue.enqueue:
        best_batch = max(ours.batches.values())
        ratio = best_batch / best_enqueue.enqueue
        line(
            "delay_many >= 5x the fastest peer's enqueue",
            f"{best_batch:,.0f}/s vs {best_enqueue.name} {best_enqueue.enqueue:,.0f}/s",
            ratio,
            ratio >= 5,
        )
    if ours.p50 is not None and huey is not None and huey.p50:
        line(
            "p50 <= Huey's",
            f"{ours.p50:.2f} ms vs {huey.p50:.2f} ms",
            ours.p50 / huey.p50,
            ours.p50 <= huey.p50,
        )
    if ours.p99 is not None:
        line("p99 <= 3 ms", f"{ours.p99:.2f} ms", ours.p99 / 3.0, ours.p99 <= 3.0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379", help="server, no database")
    parser.add_argument("--jobs", type=int, default=20_000, help="jobs in the drain")
    parser.add_argument("--enqueue-jobs", type=int, default=5_000, help="single enqueues timed")
    parser.add_argument("--latency-jobs", type=int, default=500, help="0 skips latency")
    parser.add_argument("--rate", type=float, default=50.0, help="jobs/s in latency runs")
    parser.add_argument(
        "--systems", default=",".join(SYSTEMS), help=f"comma-separated, of {', '.join(SYSTEMS)}"
    )
    parser.add_argument("--repeat", type=int, default=1, help="rounds; figures are medians")
    parser.add_argument("--serve", choices=list(SYSTEMS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    base = args.redis.rstrip("/")
    if args.serve:
        SYSTEMS[args.serve](base).serve()
        return
    client = redis.Redis.from_url(base)
    server = str(client.info("server")["redis_version"])
    load_before = f"{os.getloadavg()[0]:.2f}"
    names = ["redis-py LPUSH", *(name.strip() for name in args.systems.split(","))]
    rounds: dict[str, list[Row]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="errands-redis-bench-") as scratch:
        # Rounds go through every system in turn, so a busy spell on the machine
        # does not land on one system's figures only.
        for round_ in range(args.repeat):
            for name in names:
                print(f"round {round_ + 1}: {name} ...", file=sys.stderr, flush=True)
                if name == "redis-py LPUSH":
                    rounds[name].append(baseline(base, args.enqueue_jobs))
                else:
                    rounds[name].append(measure(name, base, args, scratch))
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
        batches={
            size: statistics.median(row.batches[size] for row in good) for size in first.batches
        },
        drain=middle([row.drain for row in good]),
        p50=middle([row.p50 for row in good]),
        p99=middle([row.p99 for row in good]),
    )


if __name__ == "__main__":
    main()
