"""What each job costs the Redis server: script time and server CPU, per phase of a job's life.

    python benchmarks/redis_server_cost.py [--redis URL] [--cluster URL] [--jobs N]

For each store (one Redis server; a Redis Cluster if ``--cluster`` names one, as
``redis+cluster://host:port,...``), it runs, on the node that holds the store
(use a server of your own: other clients' commands would count too): N single
``.delay()`` calls, N jobs in ``delay_many`` batches of 1,000, and a drain of
those 2N jobs by an in-process worker (4 threads). After each phase it reads
``INFO commandstats`` (EVALSHA's time, and the wake-ups' PUBLISH or SPUBLISH
inside it) and ``INFO cpu`` of that node, and prints microseconds per job.
Then, with S idle processes' worth of subscribers on the wake channel, it
reads what one wake-up publish costs.
These are server-side figures: the ceiling of one Redis core is 1 s of them.
"""

from __future__ import annotations

import argparse
import time
import uuid
from typing import Any

import redis
from flask import Flask

from flask_errands import Errands


def node_of(url: str, prefix: str) -> tuple[redis.Redis, str]:
    """A plain client on the node that holds the store's slot, and the store's prefix."""
    if url.startswith("redis+cluster://"):
        first = url.split("://", 1)[1].split(",")[0].split("/")[0]
        host, port = first.split(":")
        cluster = redis.RedisCluster(host=host, port=int(port))
        tagged = "{" + prefix.rstrip(":") + "}:"
        node = cluster.get_node_from_key(tagged)
        cluster.close()
        return redis.Redis(host=node.host, port=node.port, max_connections=1000), tagged
    return redis.Redis.from_url(url.split("?")[0], max_connections=1000), prefix


def stats(client: redis.Redis) -> dict[str, float]:
    """Cumulative script, publish and CPU seconds on the node."""
    commands: Any = client.info("commandstats")
    cpu: Any = client.info("cpu")
    out = {"cpu": float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])}
    for name in ("evalsha", "publish", "spublish"):
        out[name] = commands.get(f"cmdstat_{name}", {}).get("usec", 0) / 1e6
        out[name + "_calls"] = commands.get(f"cmdstat_{name}", {}).get("calls", 0)
    return out


def measure(url: str, jobs: int) -> None:
    prefix = f"bench-cost-{uuid.uuid4().hex[:6]}:"
    client, stored = node_of(url, prefix)
    app = Flask("cost", instance_path="/tmp")
    app.config.update(ERRANDS_URL=f"{url}?prefix={prefix}")
    errands = Errands(app)
    noop = errands.task(name="bench.noop")(lambda: None)
    label = "cluster" if url.startswith("redis+cluster") else "redis"

    def phase(name: str, run: Any, per: int) -> None:
        before = stats(client)
        started = time.perf_counter()
        run()
        wall = time.perf_counter() - started
        after = stats(client)
        delta = {key: after[key] - before[key] for key in after}
        wake = delta["publish"] + delta["spublish"]
        print(
            f"{label:8} {name:22} {per / wall:9,.0f} jobs/s  "
            f"scripts {delta['evalsha'] / per * 1e6:6.1f} µs/job  "
            f"(wake-ups {wake / per * 1e6:4.1f})  "
            f"server CPU {delta['cpu'] / per * 1e6:6.1f} µs/job  "
            f"scripts/job {delta['evalsha_calls'] / per:4.2f}"
        )

    with app.app_context():
        phase("delay()", lambda: [noop.delay() for _ in range(jobs)], jobs)
        phase(
            "delay_many(1000)",
            lambda: [noop.delay_many([()] * 1000) for _ in range(jobs // 1000)],
            jobs // 1000 * 1000,
        )
        total = jobs + jobs // 1000 * 1000

        def drain() -> None:
            errands.start_worker()
            while errands.backend.counts().get(("default", "succeeded"), 0) < total:
                time.sleep(0.01)
            errands.stop_worker(grace=5)

        phase("drain (4 threads)", drain, total)
        fanout(client, stored, label)
        errands.backend.purge()
        errands.backend.close()
    client.close()


def fanout(client: redis.Redis, prefix: str, label: str) -> None:
    """What one wake-up publish costs with S subscribers, as S idle worker processes."""
    sharded = label == "cluster"
    channel = prefix + "wake"
    for subscribers in (0, 10, 100, 200):
        listeners = []
        for _ in range(subscribers):
            pubsub = client.pubsub()
            if sharded:
                pubsub.ssubscribe(channel)
            else:
                pubsub.subscribe(channel)
            listeners.append(pubsub)
        time.sleep(0.2)
        command = "SPUBLISH" if sharded else "PUBLISH"
        name = command.lower()
        before = stats(client)
        for _ in range(2000):
            client.execute_command(command, channel, "default")
        after = stats(client)
        calls = after[name + "_calls"] - before[name + "_calls"]
        per = (after[name] - before[name]) / max(calls, 1) * 1e6
        print(f"{label:8} {command} to {subscribers:3} subscribers  {per:7.1f} µs per call")
        for pubsub in listeners:
            pubsub.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--cluster", default=None, help="redis+cluster://host:port,... URL")
    parser.add_argument("--jobs", type=int, default=5000)
    args = parser.parse_args()
    measure(args.redis, args.jobs)
    if args.cluster:
        measure(args.cluster, args.jobs)


if __name__ == "__main__":
    main()
