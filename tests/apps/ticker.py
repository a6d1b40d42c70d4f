"""A worker process with one periodic job, for tests/test_scheduler.py.

Run as ``python tests/apps/ticker.py URL INSTANCE_PATH``. It prints ``ready``, reads
``BEGIN END`` (two timestamps) from stdin, runs a worker and its scheduler from BEGIN
to END, and prints how many ticks its scheduler fired and whether it was still running.
The job's task is ``__main__.tick``.
"""

from __future__ import annotations

import json
import sys
import time

from flask import Flask

from flask_errands import Errands

app = Flask("ticker", instance_path=sys.argv[2])
app.config.update(ERRANDS_URL=sys.argv[1], ERRANDS_EMBEDDED_WORKER=False)
errands = Errands(app)


@errands.periodic(every=1, name="ticker")
def tick() -> float:
    """Say when the tick ran."""
    return time.time()


def main() -> None:
    print("ready", flush=True)
    begin, end = map(float, sys.stdin.readline().split())
    time.sleep(max(0.0, begin - time.time()))
    with app.app_context():
        errands.start_worker()
        scheduler = app.extensions["errands"].scheduler
        time.sleep(max(0.0, end - time.time()))
        running = scheduler.running
        errands.stop_worker(grace=10)
    print(json.dumps({"won": scheduler.ticks_fired, "running": running}), flush=True)


if __name__ == "__main__":
    main()
