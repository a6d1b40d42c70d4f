"""A process whose first store call creates the tables, for tests/backends/test_postgres.py.

Run as ``python tests/apps/create_tables.py URL START``: it waits until the timestamp
START, so several processes make their first call together, and prints the counts.
"""

from __future__ import annotations

import sys
import time

from flask_errands.backends import backend_from_url


def main(url: str, start: float) -> None:
    backend = backend_from_url(url, instance_path="")
    time.sleep(max(0.0, start - time.time()))
    print(backend.counts())
    backend.close()


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
