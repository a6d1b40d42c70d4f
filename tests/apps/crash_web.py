"""A web process on a SQLite file with its embedded worker running, for tests/test_crash.py.

Run as ``python tests/apps/crash_web.py DB RUNS_DIR LEASE_SECONDS``. Each job appends its
number to a file of this process's own, so the test can count how many times each job
really ran; a ``ready-PID`` file says the worker is running.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from flask import Flask

from flask_errands import Errands

db, runs, lease = sys.argv[1], sys.argv[2], float(sys.argv[3])
app = Flask("crash_app", instance_path=os.path.dirname(db))
app.config.update(
    ERRANDS_URL="sqlite:///" + db, ERRANDS_LEASE_SECONDS=lease, ERRANDS_CONCURRENCY=4
)
errands = Errands(app)


@errands.task(name="crash.record")
def record(n: int, seconds: float) -> int:
    """Write down that job ``n`` ran in this process, then take ``seconds``."""
    with open(os.path.join(runs, f"runs-{os.getpid()}.txt"), "a") as out:
        out.write(f"{n}\n")
    time.sleep(seconds)
    return n


def main() -> None:
    # What a server does on SIGTERM: leave through sys.exit, so atexit hooks run.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with app.app_context():
        errands.start_worker()
    Path(runs, f"ready-{os.getpid()}").touch()
    while True:
        time.sleep(0.05)


if __name__ == "__main__":
    main()
