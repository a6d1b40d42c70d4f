"""``errands.transaction(...)``: the jobs enqueued in a block belong to the app's own transaction.

Two ways, chosen at the first ``.delay()`` of the block for each app:

- **In the transaction.** The store is PostgreSQL in the very database the
  app's connection reaches, through psycopg 3 (or, under SQLAlchemy,
  psycopg2): the job rows (and the workers' wake-up, ``NOTIFY``) are written
  through that connection's DB-API cursor, so the app's commit stores them and
  its rollback drops them, atomically. Other drivers (pg8000, asyncpg) take
  their own parameter style, so their jobs go the second way.
- **Through the outbox.** Any other store, with ``ERRANDS_OUTBOX_URL`` set:
  the jobs are written into the ``errands_outbox`` table of the app's database
  through its SQLAlchemy session or connection, and workers move them to the
  store after the commit. Nothing is lost between the two.
- **After the commit.** Any other store, without an outbox: the jobs are
  held and enqueued right after the outermost commit, and dropped on rollback
  (savepoints included). Only a SQLAlchemy ``Session`` says when it commits, so
  only a session can take this way; a process that dies between the app's
  commit and the enqueue loses the jobs.

Nothing here commits: the app's own commit or rollback decides. SQLAlchemy and
psycopg are imported only if the app already has; flask-errands needs neither.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Protocol

from .backends.base import Backend, JobRecord, JobStatus
from .exceptions import ConfigurationError, EnqueueError, ErrandsError
from .jobs import Job

if TYPE_CHECKING:
    import psycopg

    from .backends.outbox import Outbox

#: SQLAlchemy drivers whose DB-API cursors the PostgreSQL backend writes through.
DIRECT_DRIVERS = ("psycopg", "psycopg2")
logger = logging.getLogger("flask_errands")

ACCEPTED = (
    "a SQLAlchemy Session (Flask-SQLAlchemy's db.session included), "
    "a SQLAlchemy Connection, or a psycopg 3 Connection"
)


class Target(Protocol):
    """What a transaction needs of the app that enqueues (its ``Runtime``)."""

    @property
    def backend(self) -> Backend: ...

    @property
    def eager(self) -> bool: ...

    @property
    def outbox(self) -> Outbox | None:
        """The outbox in the app's database (``ERRANDS_OUTBOX_URL``), if any."""
        ...

    def store(self, records: list[JobRecord]) -> list[Job]:
        """Enqueue now, as outside a transaction (or run now, when eager)."""
        ...

    def written(self, records: list[JobRecord]) -> list[Job]:
        """Handles on records just written to the store; sends ``job_enqueued``."""
        ...


_current: ContextVar[Transaction | None] = ContextVar("flask_errands_transaction", default=None)


def current() -> Transaction | None:
    """The transaction the calling thread (or task) is inside of, if any."""
    return _current.get()


def transaction(session_or_connection: Any) -> contextlib.AbstractContextManager[Transaction]:
    """Make every ``.delay()`` in the block, in this thread, part of the app's transaction.

    Raises ``TypeError`` at once for anything but a session or connection.
    """
    return _block(Transaction(_adapt(session_or_connection)))


@contextlib.contextmanager
def _block(entered: Transaction) -> Iterator[Transaction]:
    token = _current.set(entered)
    try:
        yield entered
    finally:
        _current.reset(token)


class Transaction:
    """One ``errands.transaction()`` block: where its jobs go, decided once per app's store."""

    def __init__(self, adapter: _Adapter) -> None:
        self.adapter = adapter
        self._in_transaction: dict[int, bool] = {}

    def enqueue(self, target: Target, records: list[JobRecord]) -> list[Job]:
        """Write ``records`` in the app's transaction, or hold them until it commits."""
        backend = target.backend
        if not target.eager:
            connection = self.adapter.dbapi_connection()
            if connection is not None:
                key = id(backend)
                if key not in self._in_transaction:
                    with connection.cursor() as cursor:
                        self._in_transaction[key] = backend.shares_database(cursor)
                if self._in_transaction[key]:
                    self.adapter.check_open()
                    with connection.cursor() as cursor:
                        stored = backend.enqueue_in(cursor, records)
                    new = {record.id for record in records}
                    jobs = target.written([_pending(r) if r.id in new else r for r in stored])
                    self.adapter.at_commit(functools.partial(_settle, target, stored, jobs))
                    return jobs
        connection = self.adapter.sqlalchemy_connection()
        if target.outbox is not None and connection is not None and not target.eager:
            target.outbox.write(connection, records)
            return target.written([_pending(record) for record in records])
        if not self.adapter.tells_commit:
            raise ConfigurationError(
                f"errands.transaction() with {self.adapter.what} needs ERRANDS_URL to be "
                "PostgreSQL in the same database as that connection (and no ERRANDS_EAGER), so "
                f"the jobs are written in its transaction; {backend.url} is not. Only a "
                "SQLAlchemy Session tells when it commits, to enqueue elsewhere after it: "
                "pass one instead, or set ERRANDS_OUTBOX_URL to keep the jobs in your database "
                "through a SQLAlchemy session or connection"
            )
        jobs = [Job(_pending(record), backend) for record in records]
        self.adapter.at_commit(functools.partial(_release, target, records, jobs))
        return jobs


def _pending(record: JobRecord) -> JobRecord:
    return dataclasses.replace(record, status=JobStatus.PENDING.value)


def _settle(target: Target, records: list[JobRecord], jobs: list[Job]) -> None:
    """Jobs written in a transaction that has committed: their handles show them stored."""
    for job, record in zip(jobs, records, strict=True):
        job._become(Job(record, target.backend))


def _release(target: Target, records: list[JobRecord], jobs: list[Job]) -> None:
    """Enqueue jobs held until a commit that has happened; their handles follow."""
    try:
        stored = target.store(records)
    except ErrandsError as exc:
        ids = ", ".join(record.id for record in records)
        logger.error("errands: the transaction committed but jobs %s were not enqueued", ids)
        raise EnqueueError(
            f"the transaction committed, but its jobs {ids} were not enqueued: {exc}"
        ) from exc
    for job, now in zip(jobs, stored, strict=True):
        job._become(now)


# -- what the app hands in -------------------------------------------------------


class _Adapter:
    """The app's session or connection, seen as the two ways need it."""

    def dbapi_connection(self) -> Any | None:
        """The driver's connection under it, in its transaction; None for other drivers."""
        return None

    def check_open(self) -> None:
        """Refuse a connection on which a write would commit at once."""

    #: Whether it says when its transaction commits (only a Session does).
    tells_commit = False

    def sqlalchemy_connection(self) -> Any | None:
        """The SQLAlchemy connection to write the outbox through, in the transaction."""
        return None

    def at_commit(self, action: Callable[[], None]) -> None:
        """Run ``action`` once the transaction open now commits, and never if it rolls back.

        Where nobody says so, nothing runs: jobs written in the transaction
        keep ``pending`` handles until refreshed.
        """

    what = "this connection"


def _psycopg(connection: object) -> psycopg.Connection[Any] | None:
    psycopg = sys.modules.get("psycopg")
    return connection if psycopg and isinstance(connection, psycopg.Connection) else None


class _Psycopg(_Adapter):
    what = "a psycopg connection"

    def __init__(self, connection: psycopg.Connection[Any]) -> None:
        self.connection = connection

    def dbapi_connection(self) -> psycopg.Connection[Any]:
        return self.connection

    def check_open(self) -> None:
        from psycopg.pq import TransactionStatus

        status = self.connection.info.transaction_status
        if self.connection.autocommit and status == TransactionStatus.IDLE:
            raise ErrandsError(
                "the psycopg connection given to errands.transaction() is in autocommit mode "
                "outside a transaction, so each job would commit at once; enqueue inside "
                "`with conn.transaction():`"
            )


class _Connection(_Adapter):
    what = "a SQLAlchemy Connection"

    def __init__(self, connection: Any) -> None:
        self.connection = connection

    def sqlalchemy_connection(self) -> Any:
        return self.connection

    def dbapi_connection(self) -> Any | None:
        if not _direct(self.connection.dialect):
            return None
        if not self.connection.in_transaction():
            # Begun by SQLAlchemy, so the Connection's commit() commits the jobs too.
            self.connection.begin()
        return self.connection.connection.dbapi_connection


class _Session(_Adapter):
    what = "a SQLAlchemy Session"

    def __init__(self, session: Any) -> None:
        self.session = session

    def sqlalchemy_connection(self) -> Any:
        return self.session.connection()

    def dbapi_connection(self) -> Any | None:
        if not _direct(self.session.get_bind().dialect):
            return None
        return self.session.connection().connection.dbapi_connection

    tells_commit = True

    def at_commit(self, action: Callable[[], None]) -> None:
        _SessionHold.of(self.session).add(self.session, action)


def _direct(dialect: Any) -> bool:
    return dialect.name == "postgresql" and dialect.driver in DIRECT_DRIVERS


def _adapt(given: object) -> _Adapter:
    """Wrap what the app handed in, or raise ``TypeError`` naming what is accepted."""
    if _psycopg(given) is not None:
        return _Psycopg(_psycopg(given))  # type: ignore[arg-type]
    if "sqlalchemy" in sys.modules:
        from sqlalchemy.engine import Connection
        from sqlalchemy.orm import Session, scoped_session

        if isinstance(given, scoped_session):
            given = given()  # Flask-SQLAlchemy's db.session: this context's session
        if isinstance(given, Session):
            return _Session(given)
        if isinstance(given, Connection):
            return _Connection(given)
    raise TypeError(f"errands.transaction() takes {ACCEPTED}, not {given!r}")


# -- after the commit: a Session's events --------------------------------------------


@dataclasses.dataclass
class _Held:
    """What to do for jobs delayed under one (sub)transaction once the outermost commits."""

    transaction: object  # the innermost SessionTransaction at .delay() time, or None
    action: Callable[[], None]


class _SessionHold:
    """The jobs held on one Session (or their handles), and the listeners that release them.

    Each batch is kept under the innermost transaction open when it was
    delayed: a savepoint that rolls back drops its batches, one released
    hands them to its parent, and the outermost transaction enqueues them
    all once it has committed, or drops them when it ends otherwise
    (rollback, close). The listeners stay for the session's life: SQLAlchemy
    cannot remove a listener while it runs.
    """

    _holds: weakref.WeakKeyDictionary[Any, _SessionHold] = weakref.WeakKeyDictionary()
    _lock = threading.Lock()  # sessions are per thread; the registry is shared

    @classmethod
    def of(cls, session: Any) -> _SessionHold:
        with cls._lock:
            hold = cls._holds.get(session)
            if hold is None:
                hold = cls._holds[session] = cls(session)
            return hold

    def __init__(self, session: Any) -> None:
        from sqlalchemy import event

        self.held: list[_Held] = []
        self.committed: list[object] = []
        event.listen(session, "after_commit", self._after_commit)
        event.listen(session, "after_transaction_end", self._after_transaction_end)

    def add(self, session: Any, action: Callable[[], None]) -> None:
        innermost = session.get_nested_transaction() or session.get_transaction()
        self.held.append(_Held(innermost, action))

    def _after_commit(self, session: Any) -> None:
        # Fires for the outermost transaction and for each released savepoint.
        self.committed.append(session.get_nested_transaction() or session.get_transaction())

    def _after_transaction_end(self, session: Any, transaction: Any) -> None:
        committed = any(t is transaction for t in self.committed)
        self.committed = [t for t in self.committed if t is not transaction]
        if transaction.parent is not None:  # a savepoint: its jobs go to its parent, or away
            for held in [h for h in self.held if h.transaction is transaction]:
                if committed:
                    held.transaction = transaction.parent
                else:
                    self.held.remove(held)
            return
        batches, self.held = self.held, []
        if committed:
            _release_all(batches)


def _release_all(held: list[_Held]) -> None:
    """Enqueue each batch; one that fails does not keep the others from the store."""
    failed: EnqueueError | None = None
    for batch in held:
        try:
            batch.action()
        except EnqueueError as exc:
            failed = failed or exc
    if failed is not None:
        raise failed
