"""A chord of 10,000 no-op steps: time from ``.delay()`` to the callback's start, against Celery.

    python benchmarks/chord.py [--steps 10000] [--rounds 3] [--processes 2] [--concurrency 4]

Both sides run on the Redis server at ``--redis`` (default
``redis://127.0.0.1:6379``) in the same run, round after round, alternating
which goes first: flask-errands under its own key prefix in db 0, Celery
(``pip install flask-errands[bench]``) with its broker and result backend in
db ``CHORD_BENCH_CELERY_DB`` (default 11, flushed before and after). Each
side gets one worker command of the same size: ``flask errands worker
--processes P -c C``, and Celery's usual prefork pool with ``--concurrency P``
(one task at a time per process), or with ``--celery-pool threads`` P x C
threads in one process.

Figures per round: ``enqueue`` (seconds ``.delay()`` took to return),
``callback`` (seconds from calling ``.delay()`` to the first line of the
callback), and the ratio Celery / flask-errands of ``callback``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis
from flask import Flask

from flask_errands import Errands, chord

HERE = Path(__file__).resolve().parent
REDIS = os.environ.get("CHORD_BENCH_REDIS", "redis://127.0.0.1:6379")
PREFIX = os.environ.get("CHORD_BENCH_PREFIX", "errands-chord-bench:")
CELERY_DB = int(os.environ.get("CHORD_BENCH_CELERY_DB", "11"))
#: Where each callback writes when it started and how many results it got.
STARTED, RECEIVED = PREFIX + "callback-started", PREFIX + "callback-received"

app = Flask("chord_bench", instance_path=str(HERE / ".instance"))
app.config.update(ERRANDS_URL=f"{REDIS}/0?prefix={PREFIX}", ERRANDS_EMBEDDED_WORKER=False)
errands = Errands(app)
_marks = redis.Redis.from_url(f"{REDIS}/0")


def _mark(results: list[Any]) -> None:
    _marks.set(STARTED, repr(time.time()))
    _marks.set(RECEIVED, len(results))


@errands.task(name="bench.noop")
def noop() -> None:
    """Do nothing: a chord's header step."""


@errands.task(name="bench.mark")
def mark(results: list[Any]) -> None:
    """The chord's callback: say when it started."""
    _mark(results)


try:
    from celery import Celery
    from celery import chord as celery_chord
except ImportError:  # only the flask-errands side can run
    Celery = celery_chord = None

if Celery is not None:
    celery_app = Celery(
        "chord_bench", broker=f"{REDIS}/{CELERY_DB}", backend=f"{REDIS}/{CELERY_DB}"
    )
    celery_app.conf.update(
        worker_hijack_root_logger=False, broker_connection_retry_on_startup=True
    )

    @celery_app.task(name="bench.celery_noop")
    def celery_noop() -> None:
        """Do nothing: a chord's header step."""

    @celery_app.task(name="bench.celery_mark")
    def celery_mark(results: list[Any]) -> None:
        """The chord's callback: say when it started."""
        _mark(results)


def _worker(side: str, processes: int, concurrency: int, pool: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), *sys.path])}
    if side == "errands":
        command = ["flask", "--app", "chord:app", "errands", "worker"]
        command += ["--processes", str(processes), "-c", str(concurrency), "--no-scheduler"]
    else:
        command = ["celery", "-A", "chord:celery_app", "worker", "--loglevel", "warning"]
        if pool == "threads":
            command += ["--pool", "threads", "--concurrency", str(processes * concurrency)]
        else:
            command += ["--pool", "prefork", "--concurrency", str(processes)]
    return subprocess.Popen(
        [sys.executable, "-m", *command],
        cwd=HERE,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _wait_for_callback(started: float, timeout: float) -> tuple[float, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = _marks.get(STARTED)
        if value is not None:
            return float(value) - started, int(_marks.get(RECEIVED) or 0)
        time.sleep(0.01)
    raise TimeoutError(f"no callback within {timeout:g}s")


def _clean(side: str) -> None:
    _marks.delete(STARTED, RECEIVED)
    if side == "errands":
        keys = list(_marks.scan_iter(match=f"{PREFIX}*", count=1000))
        for start in range(0, len(keys), 1000):
            _marks.delete(*keys[start : start + 1000])
    else:
        redis.Redis.from_url(f"{REDIS}/{CELERY_DB}").flushdb()


def one_round(side: str, steps: int, args: argparse.Namespace) -> dict[str, float]:
    """Start a worker, warm it up, time one chord, stop it; return the figures."""
    _clean(side)
    worker = _worker(side, args.processes, args.concurrency, args.celery_pool)
    try:
        with app.app_context():
            if side == "errands":
                noop.delay().result(timeout=60)  # the worker is up
                started = time.time()
                chord((noop.s() for _ in range(steps)), mark.s()).delay()
            else:
                celery_noop.delay().get(timeout=60)
                started = time.time()
                celery_chord(celery_noop.s() for _ in range(steps))(celery_mark.s())
            enqueued = time.time() - started
            callback, received = _wait_for_callback(started, args.timeout)
        assert received == steps, f"{side}: the callback got {received} results, not {steps}"
        return {"enqueue": enqueued, "callback": callback}
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
        _clean(side)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--celery-pool", choices=["prefork", "threads"], default="prefork")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--sides", default="errands,celery")
    args = parser.parse_args()
    sides = args.sides.split(",")
    if "celery" in sides and Celery is None:
        sys.exit("celery is not installed: pip install flask-errands[bench]")
    figures: dict[str, list[dict[str, float]]] = {side: [] for side in sides}
    for n in range(args.rounds):
        for side in sides if n % 2 == 0 else reversed(sides):
            result = one_round(side, args.steps, args)
            figures[side].append(result)
            print(
                f"round {n + 1} {side:>8}: enqueue {result['enqueue']:7.2f}s  "
                f"callback starts after {result['callback']:7.2f}s",
                flush=True,
            )
    print(
        f"\n{args.steps:,} steps, {args.processes} processes x {args.concurrency} threads "
        f"(celery: {args.celery_pool}), median of {args.rounds} rounds"
    )
    for side in sides:
        enqueue = statistics.median(r["enqueue"] for r in figures[side])
        callback = statistics.median(r["callback"] for r in figures[side])
        print(f"  {side:>8}: enqueue {enqueue:7.2f}s  callback starts after {callback:7.2f}s")
    if len(sides) == 2:
        ratios = [c["callback"] / e["callback"] for e, c in zip(*figures.values(), strict=True)]
        print(f"  celery / errands (callback start): {statistics.median(ratios):.1f}x")


if __name__ == "__main__":
    main()
