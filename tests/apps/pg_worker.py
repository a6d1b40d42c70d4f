"""A worker process on PostgreSQL, for tests/backends/test_postgres.py.

Run as ``python tests/apps/pg_worker.py URL RAN_FILE INSTANCE_PATH``. It prints ``ready``
once its worker runs; each job of ``tests.pg.record`` appends its id to RAN_FILE. SIGTERM
stops it with 10 s of grace.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

from flask import Flask

from flask_errands import Errands, current_job

app = Flask("errands_pg_worker", instance_path=sys.argv[3])
app.config.update(ERRANDS_URL=sys.argv[1], ERRANDS_CONCURRENCY=4)
errands = Errands(app)
lock = threading.Lock()


@errands.task(name="tests.pg.record")
def record(n: int) -> int:
    """Write down which job ran, in this process's own file."""
    with lock, open(sys.argv[2], "a") as ran:
        ran.write(current_job.id + "\n")
    return n


def main() -> None:
    Path(sys.argv[2]).touch()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with app.app_context():
        errands.start_worker()
        print("ready", flush=True)
        while not stop.wait(0.1):
            pass
        errands.stop_worker(grace=10)


if __name__ == "__main__":
    main()
