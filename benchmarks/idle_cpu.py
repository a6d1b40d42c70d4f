"""CPU an idle embedded worker costs its process: what every web process pays while waiting.

    python benchmarks/idle_cpu.py [--seconds 10]

Starts the embedded worker on a SQLite file in a temporary folder, lets it wait
for work, and prints the process's CPU time over the wait as a share of one core.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time

from flask import Flask

from flask_errands import Errands


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="how long to wait idle")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        app = Flask("idle", instance_path=folder)
        app.config["ERRANDS_URL"] = f"sqlite:///{folder}/errands.db"
        errands = Errands(app)
        with app.app_context():
            errands.start_worker()
            time.sleep(1.0)  # start-up is not idling
            cpu, wall = cpu_seconds(), time.monotonic()
            time.sleep(options.seconds)
            cpu, wall = cpu_seconds() - cpu, time.monotonic() - wall
            errands.stop_worker(grace=1)
    print(f"idle embedded worker on SQLite: {cpu / wall * 100:.2f}% of one core over {wall:.0f}s")


if __name__ == "__main__":
    main()
