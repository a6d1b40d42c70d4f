"""Another process holding SQLite's write lock for a while, for tests/test_embedded.py.

Run as ``python tests/apps/hold_lock.py DB SECONDS``: it takes the write lock,
prints ``locked``, holds it for SECONDS, then commits and exits.
"""

from __future__ import annotations

import sqlite3
import sys
import time


def main(path: str, seconds: float) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("BEGIN IMMEDIATE")
    print("locked", flush=True)
    time.sleep(seconds)
    db.execute("COMMIT")
    db.close()


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
