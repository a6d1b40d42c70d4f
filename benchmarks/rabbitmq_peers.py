"""flask-errands with RabbitMQ as its transport, side by side with Celery and Dramatiq on it.

The same no-op workload and harness as ``redis_peers.py`` (imported from it):
single-enqueue rate, drain rate of N jobs enqueued while no worker runs (from
the first finished job to the last), and enqueue-to-start latency p50/p99 at
50 jobs/s against an idle worker. Every system uses the same RabbitMQ server:

- flask-errands: ``ERRANDS_BROKER_URL`` on RabbitMQ, the Redis store (db 10);
  ``.delay()`` returns once the job is stored and its message written, unconfirmed;
- Celery: the RabbitMQ broker (py-amqp), Redis result backend (db 12), prefork -c 2;
- Dramatiq: ``RabbitmqBroker`` (pika) with its defaults, so ``send()`` is not
  confirmed; a no-op that counts itself in Redis, as Dramatiq keeps no results.

Latency stamps and counters live in Redis (``redis_peers``' databases). Run
``python benchmarks/rabbitmq_peers.py --help`` for the knobs.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pika
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
import redis_peers
from redis_peers import (
    Row,
    System,
    _dramatiq_noop,
    figure,
    measure,
    median_row,
)

AMQP_URL = os.environ.get("BENCH_AMQP", "amqp://guest:guest@127.0.0.1:5672/%2F")
#: Queues to empty before and after each system, by system.
QUEUES = {
    "flask-errands": ["bench-errands.default"],
    "celery": ["celery"],
    "dramatiq": ["default", "default.DQ", "default.XQ"],
}


def purge(names: list[str]) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    channel = connection.channel()
    for name in names:
        try:
            channel.queue_purge(name)
        except pika.exceptions.ChannelClosedByBroker:  # not declared yet
            channel = connection.channel()
    connection.close()


class Errands(redis_peers.Errands):
    settings = "1 worker process, 4 threads; Redis store, RabbitMQ transport"
    has_batches = False

    def config(self) -> dict[str, Any]:
        return {"ERRANDS_BROKER_URL": AMQP_URL + "?prefix=bench-errands."}

    def empty(self) -> None:
        super().empty()
        purge(QUEUES[self.name])


class Celery(redis_peers.Celery):
    settings = "prefork -c 2, RabbitMQ broker, Redis results, no gossip/mingle/heartbeat"

    def broker_url(self) -> str:
        return AMQP_URL

    def empty(self) -> None:
        super().empty()
        purge(QUEUES[self.name])


COUNTER = "bench:dramatiq-done"


class Dramatiq(redis_peers.Dramatiq):
    settings = "RabbitmqBroker, 2 processes x 8 threads, send() unconfirmed (its default)"

    def make_broker(self) -> Any:
        from dramatiq.brokers.rabbitmq import RabbitmqBroker

        return RabbitmqBroker(url=AMQP_URL)

    def noop_body(self) -> Callable[[], None]:
        return partial(_count, self.url)

    def finished(self) -> int:
        return int(self.client.get(COUNTER) or 0)

    def empty(self) -> None:
        super().empty()
        purge(QUEUES[self.name])


_counter: redis.Redis | None = None


def _count(url: str) -> None:
    """Dramatiq's no-op: count itself, the one way to see it finished."""
    global _counter
    if _counter is None:
        _counter = redis.Redis.from_url(url)
    _counter.incr(COUNTER)
    _dramatiq_noop()


SYSTEMS: dict[str, type[System]] = {s.name: s for s in (Errands, Dramatiq, Celery)}


def report(rows: list[Row], args: argparse.Namespace, load: tuple[str, str]) -> None:
    print(
        f"\nRabbitMQ at {AMQP_URL.split('@')[-1]}; Python {platform.python_version()}, "
        f"{os.cpu_count()} CPUs; load average {load[0]} before, {load[1]} after"
    )
    print(
        f"{args.enqueue_jobs:,} single enqueues; drain of {args.jobs:,} no-op jobs; "
        f"latency over {args.latency_jobs} jobs at {args.rate:g}/s; "
        f"median of {args.repeat} round(s)\n"
    )
    print("| system | version | settings | enqueue/s | drain/s | p50 ms | p99 ms |")
    print("|---|---|---|--:|--:|--:|--:|")
    for row in rows:
        if row.failure:
            print(f"| {row.name} | {row.version} | FAILED: {row.failure} | | | | |")
            continue
        print(
            f"| {row.name} | {row.version} | {row.settings} | {figure(row.enqueue)} | "
            f"{figure(row.drain)} | {figure(row.p50, 2)} | {figure(row.p99, 2)} |"
        )
    ours = next((r for r in rows if r.name == "flask-errands" and not r.failure), None)
    peers = [r for r in rows if r.name != "flask-errands" and not r.failure]
    if ours is None or not peers:
        print("\nno ratios: flask-errands or every peer failed")
        return
    print("\n| target | figure | ratio | met |")
    print("|---|---|--:|---|")
    fastest = max(peers, key=lambda r: r.drain or 0)
    if ours.drain and fastest.drain:
        ratio = ours.drain / fastest.drain
        detail = f"{ours.drain:,.0f}/s vs {fastest.name} {fastest.drain:,.0f}/s"
        print(f"| drain >= 2x the faster peer | {detail} | {ratio:.2f} | {ratio >= 2} |")
    sender = max(peers, key=lambda r: r.enqueue or 0)
    if ours.enqueue and sender.enqueue:
        ratio = ours.enqueue / sender.enqueue
        detail = f"{ours.enqueue:,.0f}/s vs {sender.name} {sender.enqueue:,.0f}/s"
        print(f"| .delay() >= the faster peer's send | {detail} | {ratio:.2f} | {ratio >= 1} |")
    quickest = min(peers, key=lambda r: r.p50 if r.p50 is not None else float("inf"))
    if ours.p50 is not None and quickest.p50:
        ratio = ours.p50 / quickest.p50
        detail = f"{ours.p50:.2f} ms vs {quickest.name} {quickest.p50:.2f} ms"
        print(f"| p50 <= the peers' | {detail} | {ratio:.2f} | {ratio <= 1} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379", help="server, no database")
    parser.add_argument("--jobs", type=int, default=20_000, help="jobs in the drain")
    parser.add_argument("--enqueue-jobs", type=int, default=5_000, help="single enqueues timed")
    parser.add_argument("--latency-jobs", type=int, default=500, help="0 skips latency")
    parser.add_argument("--rate", type=float, default=50.0, help="jobs/s in latency runs")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated")
    parser.add_argument("--repeat", type=int, default=1, help="rounds; figures are medians")
    parser.add_argument("--serve", choices=list(SYSTEMS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    base = args.redis.rstrip("/")
    if args.serve:
        SYSTEMS[args.serve](base).serve()
        return
    load_before = f"{os.getloadavg()[0]:.2f}"
    names = [name.strip() for name in args.systems.split(",")]
    rounds: dict[str, list[Row]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="errands-rabbitmq-bench-") as scratch:
        for round_ in range(args.repeat):
            for name in names:
                print(f"round {round_ + 1}: {name} ...", file=sys.stderr, flush=True)
                rounds[name].append(measure(name, base, args, scratch, SYSTEMS, __file__))
    load_after = f"{os.getloadavg()[0]:.2f}"
    report([median_row(rows) for rows in rounds.values()], args, (load_before, load_after))


if __name__ == "__main__":
    main()
