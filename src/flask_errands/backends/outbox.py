"""The outbox: jobs written into a table of the app's own database, in its transaction.

``errands.transaction()`` writes a job here when the store is elsewhere
(SQLite, Redis, another database) and ``ERRANDS_OUTBOX_URL`` names the app's
database: the app's commit keeps the row, its rollback drops it, and no
process can die between the two. Workers then move the rows to the store
(:meth:`Outbox.relay`): each row is enqueued under its own job id and deleted
in one transaction of the app's database, so a relay that dies half-way
enqueues nothing twice (the store refuses a stored id, and the row goes).

It speaks SQLAlchemy Core, so it works on any database SQLAlchemy does;
SQLAlchemy is imported only when an outbox is configured.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Sequence

import sqlalchemy as sa

from ..exceptions import BackendUnavailable, DuplicateJob
from .base import Backend, JobRecord

logger = logging.getLogger("flask_errands")

#: How many rows one relay step moves.
RELAY_BATCH = 100
#: The pause between two relay steps that found nothing.
RELAY_INTERVAL = 0.2

_metadata = sa.MetaData()
OUTBOX = sa.Table(
    "errands_outbox",
    _metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.String(64), nullable=False),
    sa.Column("record", sa.Text, nullable=False),
)


class Outbox:
    """The outbox table of one app database, named by a SQLAlchemy URL."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._engine: sa.Engine | None = None
        self._lock = threading.Lock()

    @property
    def engine(self) -> sa.Engine:
        """The relay's own engine on the app's database, made on first use."""
        with self._lock:
            if self._engine is None:
                self._engine = sa.create_engine(self.url)
            return self._engine

    def write(self, connection: sa.Connection, jobs: Sequence[JobRecord]) -> None:
        """Add ``jobs`` through the app's connection, in its open transaction; commits nothing.

        The table is created in that transaction if it is missing: a rollback
        takes it away again with the rows.
        """
        _metadata.create_all(connection, checkfirst=True)
        connection.execute(
            OUTBOX.insert(),
            [{"job_id": job.id, "record": json.dumps(job.to_dict())} for job in jobs],
        )

    def relay(self, backend: Backend, limit: int = RELAY_BATCH) -> int:
        """Move up to ``limit`` committed jobs to ``backend``, oldest first; return how many.

        Rows are locked (``FOR UPDATE SKIP LOCKED`` where the database has
        it), so relays in several processes share the work.
        """
        with self.engine.begin() as conn:
            if not sa.inspect(conn).has_table(OUTBOX.name):
                return 0
            query = sa.select(OUTBOX).order_by(OUTBOX.c.seq).limit(limit)
            if conn.dialect.name != "sqlite":
                query = query.with_for_update(skip_locked=True)
            rows = conn.execute(query).all()
            if not rows:
                return 0
            records = [JobRecord.from_mapping(json.loads(row.record)) for row in rows]
            try:
                backend.enqueue(records)
            except DuplicateJob:
                # A relay before this one stored some of them and died before deleting.
                for record in records:
                    with contextlib.suppress(DuplicateJob):
                        backend.enqueue([record])
            conn.execute(OUTBOX.delete().where(OUTBOX.c.seq.in_([row.seq for row in rows])))
        return len(rows)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()


class Relay:
    """A thread that keeps moving an outbox's jobs to the store, until stopped."""

    def __init__(
        self, outbox: Outbox, backend: Backend, *, interval: float = RELAY_INTERVAL
    ) -> None:
        self.outbox = outbox
        self.backend = backend
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run(self) -> None:
        """Relay until stopped; a failed step is tried again after a pause, and said once."""
        failing = False
        while not self._stop.is_set():
            try:
                moved = self.outbox.relay(self.backend)
            except (sa.exc.SQLAlchemyError, BackendUnavailable) as exc:
                if not failing:
                    logger.warning("errands: could not relay the outbox: %s", _one_line(exc))
                failing, moved = True, 0
            else:
                if failing:
                    logger.info("errands: relaying the outbox again")
                failing = False
            if moved < RELAY_BATCH:
                self._stop.wait(self.interval)

    def start(self) -> Relay:
        self._thread = threading.Thread(target=self.run, name="errands-outbox", daemon=True)
        self._thread.start()
        return self

    def stop(self, *, wait: bool = True) -> None:
        self._stop.set()
        if wait and self._thread is not None:
            self._thread.join()


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())
