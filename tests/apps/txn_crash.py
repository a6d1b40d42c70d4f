"""An app killed (SIGKILL) right after its commit, before the jobs held for it are enqueued.

Run as ``python tests/apps/txn_crash.py ERRANDS_URL APP_DATABASE_URI INSTANCE_PATH RUNS``,
with any other setting in ``FLASK_ERRANDS_*`` variables (``FLASK_ERRANDS_OUTBOX_URL``).
It signs one user up inside ``errands.transaction(db.session)`` (the job appends to
RUNS when it runs), prints the job's id, commits, and dies in the first
``after_commit`` listener: the row is stored; the job is in the outbox if there is
one, and was never handed to the store if not.
"""

from __future__ import annotations

import os
import signal
import sys

from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import event, text

from tests.apps import worker_app

app = Flask("txn_crash", instance_path=sys.argv[3])
app.config.update(
    ERRANDS_URL=sys.argv[1], ERRANDS_EMBEDDED_WORKER=False, SQLALCHEMY_DATABASE_URI=sys.argv[2]
)
app.config.from_prefixed_env()
worker_app.errands.init_app(app)
db = SQLAlchemy(app)


def die(session: object) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    with app.app_context():
        db.session.execute(text("CREATE TABLE IF NOT EXISTS signups (email text)"))
        db.session.commit()
        with worker_app.errands.transaction(db.session):
            db.session.execute(text("INSERT INTO signups VALUES ('ada@example.com')"))
            job = worker_app.record.delay(sys.argv[4], 0.0, "ada@example.com")
        print(job.id, flush=True)
        # Before flask-errands' own listener, which would enqueue the job.
        event.listen(db.session(), "after_commit", die, insert=True)
        db.session.commit()


if __name__ == "__main__":
    main()
