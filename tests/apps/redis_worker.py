"""A worker process on Redis, for tests/backends/test_redis.py.

Run as ``python tests/apps/redis_worker.py URL INSTANCE_PATH LEASE_SECONDS``; it runs
until killed. ``tests.mark`` pushes each job's id onto the ``runs`` list under the URL's
key prefix, so the test can count the runs.
"""

from __future__ import annotations

import functools
import sys
import time

import redis
from flask import Flask

from flask_errands import Errands, current_job

app = Flask("redis_test_worker", instance_path=sys.argv[2])
app.config.update(ERRANDS_URL=sys.argv[1], ERRANDS_LEASE_SECONDS=float(sys.argv[3]))
errands = Errands(app)
base, _, query = sys.argv[1].partition("?")
runs_key = query.partition("prefix=")[2] + "runs"
client = functools.cache(lambda: redis.Redis.from_url(base))  # made by tests.mark only


@errands.task(name="tests.mark")
def mark() -> None:
    """Write down that this job ran."""
    client().rpush(runs_key, current_job.id)


@errands.task(name="tests.hang_first")
def hang_first(seconds: float) -> int:
    """Hang on the first attempt only, as a job whose worker dies mid-run."""
    if current_job.attempt == 1:
        time.sleep(seconds)
    return current_job.attempt


@errands.task(name="tests.add")
def add(a: int, b: int) -> int:
    """Add."""
    return a + b


def main() -> None:
    with app.app_context():
        errands.start_worker()
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main()
