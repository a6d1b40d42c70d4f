"""A process that claims and finishes jobs until none is left, for the conformance suite.

Run as ``python tests/apps/claimer.py URL INSTANCE_PATH WORKER_ID``. It connects, prints
``ready``, waits for a line on stdin (the start line shared by every process), then
prints the id of every job it claimed, one a line.
"""

from __future__ import annotations

import sys
import time

from flask_errands.backends import backend_from_url


def main(url: str, instance_path: str, worker_id: str) -> None:
    backend = backend_from_url(url, instance_path=instance_path)
    backend.counts()  # connected and warmed up before the start line
    print("ready", flush=True)
    sys.stdin.readline()
    claimed = []
    while True:
        got = backend.reserve(None, 5, worker_id, 30, time.time())
        if not got:
            break
        for record in got:
            assert record.lease_token is not None
            backend.finish(record.id, record.lease_token, "succeeded", time.time())
            claimed.append(record.id)
    print("\n".join(claimed))


if __name__ == "__main__":
    main(*sys.argv[1:4])
