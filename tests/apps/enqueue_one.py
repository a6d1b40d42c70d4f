"""A process that stores one job and exits, to wake another process's watchers.

Run as ``python tests/apps/enqueue_one.py URL``.
"""

from __future__ import annotations

import sys
import time
import uuid

from flask_errands.backends import JobRecord, backend_from_url


def main(url: str) -> None:
    backend = backend_from_url(url, instance_path="/tmp")
    job = JobRecord(id=uuid.uuid4().hex, task="t", payload="{}", enqueued_at=time.time())
    backend.enqueue([job])


if __name__ == "__main__":
    main(sys.argv[1])
