"""``errands.transaction()``: jobs that belong to the app's own database transaction.

Apps here use Flask-SQLAlchemy (or a bare psycopg / SQLAlchemy connection) on a
real database, and real ``flask errands worker`` processes run the jobs of
``tests/apps/worker_app.py``, whose ``record`` task writes each run to a file.
On PostgreSQL in the same database the jobs are written in the app's
transaction; on SQLite, Redis or another database they are enqueued right
after the commit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from flask_errands import ConfigurationError, EnqueueError, ErrandsError, Job, JobStatus
from flask_errands.status import STATUSES
from tests.apps import worker_app
from tests.conftest import BACKENDS, POSTGRES_URL
from tests.helpers import APPS, create_database, free_port, require, wait_until
from tests.processes import Served, lines

psycopg = require("psycopg")
sqlalchemy = require("sqlalchemy")
flask_sqlalchemy = require("flask_sqlalchemy")

from sqlalchemy import text  # noqa: E402

#: The app's own database when it is not the store's: another database on the same server.
OTHER_DATABASE_URL = POSTGRES_URL.rsplit("/", 1)[0] + "/errands_test_app"


def sqlalchemy_url(url: str) -> str:
    """A libpq URL as SQLAlchemy names it with the psycopg 3 driver."""
    return url.replace("postgresql://", "postgresql+psycopg://", 1).split("?")[0]


def status_of(job: Job) -> JobStatus:
    """The job's status now (a call, so a type checker does not keep an earlier one)."""
    return job.status


@pytest.fixture
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh store of the backend named by the test's parameter, as an ERRANDS_URL."""
    yield from BACKENDS[request.param](str(tmp_path))


@pytest.fixture
def app_schema() -> Iterator[str]:
    """A schema of the test database for the app's own tables, apart from the store's."""
    name = f"errands_app_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {name}")
        yield name
        admin.execute(f"DROP SCHEMA {name} CASCADE")


class Shop:
    """An app with Flask-SQLAlchemy and flask-errands: signs people up and sends them mail."""

    def __init__(self, tmp_path: Path, store_url: str, database_uri: str, **config: Any) -> None:
        self.runs = tmp_path / f"runs-{uuid.uuid4().hex[:6]}.txt"
        self.app = Flask("txn_shop", instance_path=str(tmp_path))
        self.app.config.update(
            ERRANDS_URL=store_url,
            ERRANDS_EMBEDDED_WORKER=False,
            SQLALCHEMY_DATABASE_URI=database_uri,
            **config,
        )
        worker_app.errands.init_app(self.app)
        self.errands = worker_app.errands
        self.db = flask_sqlalchemy.SQLAlchemy(self.app)
        with self.app.app_context():
            self.db.session.execute(text("CREATE TABLE IF NOT EXISTS signups (email text)"))
            self.db.session.commit()

    def sign_up_row(self, email: str) -> None:
        """The app's own write, through its session."""
        self.db.session.execute(text("INSERT INTO signups VALUES (:email)"), {"email": email})

    def sign_up(self, email: str) -> Job:
        """The app's own write and its job, as a sign-up view would do them."""
        self.sign_up_row(email)
        return self.send(email)

    def send(self, label: str) -> Job:
        return worker_app.record.delay(str(self.runs), 0.0, label)

    def signups(self) -> list[str]:
        with self.app.app_context():
            rows = self.db.session.execute(text("SELECT email FROM signups ORDER BY email"))
            emails = [row[0] for row in rows]
            self.db.session.rollback()
            return emails

    def outboxed(self) -> int:
        """How many jobs wait in the outbox table of the app's database."""
        with self.app.app_context():
            count = self.db.session.execute(text("SELECT count(*) FROM errands_outbox")).scalar()
            self.db.session.rollback()
            return int(count or 0)

    def ran(self) -> list[str]:
        """The label of each run that finished, in order."""
        return [line[1] for line in lines(self.runs) if line[0] == "end"]

    def wait_ran(self, label: str) -> None:
        wait_until(lambda: label in self.ran(), f"job {label!r} to run")

    def job(self, job_id: str) -> Job | None:
        with self.app.app_context():
            return self.errands.job(job_id)

    def close(self) -> None:
        with self.app.app_context():
            self.db.session.remove()
            for engine in self.db.engines.values():
                engine.dispose()
            self.app.extensions["errands"].backend.close()


@pytest.fixture
def shops(tmp_path: Path) -> Iterator[Callable[..., Shop]]:
    made: list[Shop] = []

    def make(store_url: str, database_uri: str, **config: Any) -> Shop:
        made.append(Shop(tmp_path, store_url, database_uri, **config))
        return made[-1]

    yield make
    for shop in made:
        shop.close()


@pytest.fixture
def same_database_shop(shops: Callable[..., Shop], store_url: str, app_schema: str) -> Shop:
    """The app on the store's PostgreSQL database, with its tables in a schema of its own."""
    return shops(
        store_url,
        sqlalchemy_url(POSTGRES_URL),
        SQLALCHEMY_ENGINE_OPTIONS={"connect_args": {"options": f"-csearch_path={app_schema}"}},
    )


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Callable[[Shop], Served]]:
    started: list[Served] = []

    def start(shop: Shop) -> Served:
        """A real worker process on the shop's store (and outbox), once it has run a job."""
        outbox = shop.app.config.get("ERRANDS_OUTBOX_URL")
        config = {"ERRANDS_OUTBOX_URL": outbox} if outbox else {}
        process = Served(tmp_path, shop.app.config["ERRANDS_URL"], **config)
        process.flask("tests.apps.worker_app", "errands", "worker", "-c", "2")
        started.append(process)
        with shop.app.app_context():
            shop.send("warm-up")
        shop.wait_ran("warm-up")
        return process

    yield start
    for process in started:
        process.signal_group(signal.SIGTERM)
        assert process.proc is not None
        process.proc.wait(timeout=60)
        process.close()


ON_POSTGRES = pytest.mark.parametrize("store_url", ["postgres"], indirect=True)
AFTER_COMMIT_STORES = pytest.mark.parametrize("store_url", ["sqlite", "redis"], indirect=True)
OUTBOX_OR_NOT = pytest.mark.parametrize("outbox", [False, True], ids=["after-commit", "outbox"])


# -- PostgreSQL in the same database: the jobs are written in the transaction ------------


def rollback_none_commit_one(
    shop: Shop,
    handle: Any,
    write: Callable[[str], None] | None = None,
) -> Job:
    """Sign up twice through ``handle`` (a session or connection) with a worker running.

    The rolled-back sign-up leaves no job that ever runs; the committed one
    runs exactly once, and never while its transaction is open, although the
    worker runs a job enqueued meanwhile. ``write`` does the app's own write.
    """
    write = write or shop.sign_up_row
    with shop.app.app_context():
        with shop.errands.transaction(handle):
            write("rolled-back@example.com")
            dropped = shop.send("rolled-back@example.com")
            assert dropped.status == JobStatus.PENDING
        handle.rollback()
        assert shop.errands.job(dropped.id) is None

        with shop.errands.transaction(handle):
            write("ada@example.com")
            kept = shop.send("ada@example.com")
        shop.send("while-open")
        shop.wait_ran("while-open")
        assert "ada@example.com" not in shop.ran()
        assert shop.errands.job(kept.id) is None
        assert kept.refresh().status == JobStatus.PENDING
        handle.commit()
        shop.wait_ran("ada@example.com")
        shop.send("last")
    shop.wait_ran("last")
    assert shop.ran().count("ada@example.com") == 1
    assert "rolled-back@example.com" not in shop.ran()
    assert shop.signups() == ["ada@example.com"]
    job = shop.job(kept.id)
    assert job is not None and job.status == JobStatus.SUCCEEDED
    return kept


@ON_POSTGRES
def test_rollback_leaves_no_job_and_commit_makes_exactly_one_that_no_worker_sees_before(
    same_database_shop: Shop, served: Callable[[Shop], Served]
) -> None:
    served(same_database_shop)
    kept = rollback_none_commit_one(same_database_shop, same_database_shop.db.session)
    assert kept.status == "queued"  # the session said it committed: the handle knows


@ON_POSTGRES
def test_a_bare_psycopg_connection_carries_the_jobs_of_its_transaction(
    same_database_shop: Shop, served: Callable[[Shop], Served], app_schema: str
) -> None:
    shop = same_database_shop
    served(shop)
    with psycopg.connect(POSTGRES_URL, options=f"-csearch_path={app_schema}") as conn:

        def write(email: str) -> None:
            conn.execute("INSERT INTO signups VALUES (%s)", (email,))

        kept = rollback_none_commit_one(shop, conn, write)
        assert kept.status == "pending"  # psycopg says nothing at its commit
        assert kept.refresh().status == "succeeded"
        with shop.app.app_context():
            with shop.errands.transaction(conn):
                kept = shop.send("kept")
                with conn.transaction():  # a savepoint inside the open transaction
                    in_savepoint = shop.send("in-savepoint")
                    raise psycopg.Rollback()
            conn.commit()
            assert shop.errands.job(in_savepoint.id) is None
            assert shop.errands.job(kept.id) is not None


@ON_POSTGRES
def test_a_sqlalchemy_connection_carries_the_jobs_of_its_transaction(
    same_database_shop: Shop,
) -> None:
    shop = same_database_shop
    engine = sqlalchemy.create_engine(sqlalchemy_url(POSTGRES_URL))
    try:
        with shop.app.app_context():
            with engine.connect() as conn:
                with shop.errands.transaction(conn):
                    dropped = shop.send("core-rolled-back")
                conn.rollback()
            with engine.connect() as conn:
                with shop.errands.transaction(conn):
                    kept = shop.send("core-committed")
                assert shop.errands.job(kept.id) is None
                conn.commit()
            assert shop.errands.job(dropped.id) is None
            assert shop.errands.job(kept.id).status == "queued"  # type: ignore[union-attr]
    finally:
        engine.dispose()


@ON_POSTGRES
def test_unique_keys_delays_and_priorities_hold_inside_the_transaction(
    same_database_shop: Shop,
) -> None:
    shop = same_database_shop
    record = worker_app.record
    with shop.app.app_context():
        with shop.errands.transaction(shop.db.session):
            first = record.options(unique_key="mail:ada").delay(str(shop.runs), 0.0, "a")
            again = record.options(unique_key="mail:ada").delay(str(shop.runs), 0.0, "a")
            later = record.options(delay=3600, priority=7).delay(str(shop.runs), 0.0, "later")
        assert again.id == first.id
        assert later.priority == 7 and later.status == JobStatus.PENDING
        shop.db.session.commit()
        stored = shop.errands.job(later.id)
        assert stored is not None and stored.status == JobStatus.SCHEDULED
        assert stored.priority == 7
        assert stored.scheduled_for == later.scheduled_for
        # Outside the transaction, the live job keeps its key as ever.
        assert record.options(unique_key="mail:ada").delay(str(shop.runs), 0.0, "a") == first


@ON_POSTGRES
def test_a_pending_job_says_it_is_not_stored_yet(same_database_shop: Shop) -> None:
    shop = same_database_shop
    with shop.app.app_context():
        with shop.errands.transaction(shop.db.session):
            job = shop.send("pending")
        assert job.status == "pending" and JobStatus.PENDING not in STATUSES
        assert job.to_dict()["status"] == "pending"
        with pytest.raises(ErrandsError, match="has not committed, or was rolled back"):
            job.result(timeout=5)
        shop.db.session.rollback()


# -- elsewhere: enqueued right after the commit, or relayed from the outbox -----------------


@AFTER_COMMIT_STORES
@OUTBOX_OR_NOT
def test_on_another_store_rollback_none_and_commit_one(
    shops: Callable[..., Shop],
    store_url: str,
    outbox: bool,
    tmp_path: Path,
    served: Callable[[Shop], Served],
) -> None:
    app_db = f"sqlite:///{tmp_path}/app.db"
    shop = shops(store_url, app_db, **({"ERRANDS_OUTBOX_URL": app_db} if outbox else {}))
    served(shop)
    kept = rollback_none_commit_one(shop, shop.db.session)
    assert kept.refresh().status == "succeeded"  # the pending handle reads the stored job
    if outbox:  # the table exists, and the relay empties it
        wait_until(lambda: shop.outboxed() == 0, "the relay to empty the outbox")


@pytest.mark.parametrize(
    ("store_url", "same_database"),
    [("postgres", True), ("postgres", False), ("sqlite", False)],
    ids=["postgres-same-database", "postgres-other-database", "sqlite"],
    indirect=["store_url"],
)
def test_a_savepoint_rolled_back_drops_the_jobs_delayed_after_it(
    shops: Callable[..., Shop],
    store_url: str,
    same_database: bool,
    app_schema: str,
    served: Callable[[Shop], Served],
) -> None:
    """In the transaction or after the commit, a savepoint's jobs share its fate."""
    if same_database:
        options = {"connect_args": {"options": f"-csearch_path={app_schema}"}}
        shop = shops(store_url, sqlalchemy_url(POSTGRES_URL), SQLALCHEMY_ENGINE_OPTIONS=options)
    else:
        create_database(OTHER_DATABASE_URL)
        shop = shops(store_url, sqlalchemy_url(OTHER_DATABASE_URL))
    served(shop)
    session = shop.db.session
    with shop.app.app_context():
        with shop.errands.transaction(session):
            kept = [shop.send("before")]
            savepoint = session.begin_nested()
            dropped = [shop.send("inside")]
            with session.begin_nested():
                dropped.append(shop.send("deeper"))
            savepoint.rollback()
            with session.begin_nested():
                kept.append(shop.send("released"))
            kept.append(shop.send("after"))
        assert shop.errands.job(kept[0].id) is None
        session.commit()
        for label in ("before", "released", "after"):
            shop.wait_ran(label)
        shop.send("last")
    shop.wait_ran("last")
    assert sorted(shop.ran()) == ["after", "before", "last", "released", "warm-up"]
    assert [shop.job(job.id) for job in dropped] == [None, None]
    assert [job.status for job in dropped] == ["pending", "pending"]


def test_after_the_commit_a_session_closed_uncommitted_drops_its_jobs(
    shops: Callable[..., Shop], tmp_path: Path
) -> None:
    shop = shops(f"sqlite:///{tmp_path}/store.db", f"sqlite:///{tmp_path}/app.db")
    with shop.app.app_context(), shop.errands.transaction(shop.db.session):
        shop.sign_up("forgotten@example.com")
    # The app context ended: Flask-SQLAlchemy closed the session without a commit.
    with shop.app.app_context():
        shop.db.session.commit()
        assert shop.errands.backend.list_jobs() == []
    assert shop.signups() == []


def test_after_the_commit_unique_keys_resolve_as_outside(
    shops: Callable[..., Shop], tmp_path: Path
) -> None:
    shop = shops(f"sqlite:///{tmp_path}/store.db", f"sqlite:///{tmp_path}/app.db")
    record = worker_app.record.options(unique_key="mail:ada")
    with shop.app.app_context():
        live = record.delay(str(shop.runs), 0.0, "a")
        with shop.errands.transaction(shop.db.session):
            held = record.delay(str(shop.runs), 0.0, "a")
            assert held.id != live.id and held.status == JobStatus.PENDING
        shop.db.session.commit()
        assert held.id == live.id and status_of(held) == "queued"


def test_eager_jobs_run_at_the_commit_and_never_after_a_rollback(
    shops: Callable[..., Shop], tmp_path: Path
) -> None:
    shop = shops(
        f"sqlite:///{tmp_path}/store.db", f"sqlite:///{tmp_path}/app.db", ERRANDS_EAGER=True
    )
    with shop.app.app_context():
        with shop.errands.transaction(shop.db.session):
            dropped = shop.sign_up("rolled-back@example.com")
        shop.db.session.rollback()
        with shop.errands.transaction(shop.db.session):
            kept = shop.sign_up("ada@example.com")
            assert shop.ran() == [] and kept.status == JobStatus.PENDING
        shop.db.session.commit()
        assert status_of(kept) == "succeeded" and kept.result() == 1
        assert dropped.status == JobStatus.PENDING
    assert shop.ran() == ["ada@example.com"]


# -- what is refused, and what is not in the block -----------------------------------------


def test_anything_but_a_session_or_connection_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"takes a SQLAlchemy Session .* psycopg 3 Connection"):
        worker_app.errands.transaction(object())


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_a_connection_without_a_commit_hook_is_refused_on_another_store(
    shops: Callable[..., Shop], store_url: str, tmp_path: Path
) -> None:
    shop = shops(store_url, f"sqlite:///{tmp_path}/app.db")
    with shop.app.app_context(), psycopg.connect(POSTGRES_URL) as conn:
        with (
            pytest.raises(ConfigurationError, match="Only a SQLAlchemy Session tells when"),
            shop.errands.transaction(conn),
        ):
            shop.send("refused")
        assert shop.errands.backend.list_jobs() == []


@ON_POSTGRES
def test_an_autocommit_psycopg_connection_outside_a_transaction_is_refused(
    same_database_shop: Shop,
) -> None:
    shop = same_database_shop
    with shop.app.app_context(), psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        with pytest.raises(ErrandsError, match="autocommit"), shop.errands.transaction(conn):
            shop.send("refused")
        with shop.errands.transaction(conn), conn.transaction():
            job = shop.send("fine")
        assert shop.errands.job(job.id) is not None


@ON_POSTGRES
def test_another_thread_is_not_in_the_block(same_database_shop: Shop) -> None:
    shop = same_database_shop
    outside: list[Job] = []

    def elsewhere() -> None:
        with shop.app.app_context():
            outside.append(shop.send("other-thread"))

    with shop.app.app_context():
        with shop.errands.transaction(shop.db.session):
            inside = shop.send("inside")
            thread = threading.Thread(target=elsewhere)
            thread.start()
            thread.join()
        shop.db.session.rollback()
        assert shop.errands.job(inside.id) is None
        assert shop.errands.job(outside[0].id) is not None


# -- the window after the commit ---------------------------------------------------------


@AFTER_COMMIT_STORES
@OUTBOX_OR_NOT
def test_a_process_killed_right_after_its_commit_loses_the_job_unless_there_is_an_outbox(
    shops: Callable[..., Shop],
    store_url: str,
    outbox: bool,
    tmp_path: Path,
    served: Callable[[Shop], Served],
) -> None:
    """The row is committed either way; the job, only in the outbox."""
    app_db = f"sqlite:///{tmp_path}/app.db"
    config = {"ERRANDS_OUTBOX_URL": app_db} if outbox else {}
    runs = tmp_path / "crash-runs.txt"
    proc = subprocess.run(
        [sys.executable, str(APPS / "txn_crash.py"), store_url, app_db, str(tmp_path), str(runs)],
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join(sys.path),
            **{f"FLASK_{key}": json.dumps(value) for key, value in config.items()},
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    job_id = proc.stdout.split()[-1]
    shop = shops(store_url, app_db, **config)
    assert shop.signups() == ["ada@example.com"]
    assert shop.job(job_id) is None  # not in the store: held in the dead process, or outboxed
    if outbox:
        assert shop.outboxed() == 1
    served(shop)  # a worker (relaying the outbox, if any) runs a job enqueued after the crash
    if outbox:
        wait_until(lambda: runs.exists(), "the outboxed job to run")
        job = wait_until(lambda: (j := shop.job(job_id)) and j.status == "succeeded" and j, "it")
        assert job.attempts == 1
        # The relay deletes the row in its own commit, which may land after the run.
        wait_until(lambda: shop.outboxed() == 0, "the relay to empty the outbox")
        assert [line.split()[1] for line in runs.read_text().splitlines()] == [
            "ada@example.com",
            "ada@example.com",
        ]  # its start and end lines: one run
    else:
        assert not runs.exists() and shop.job(job_id) is None


def test_a_store_down_at_the_commit_raises_after_the_data_is_committed(
    shops: Callable[..., Shop], tmp_path: Path
) -> None:
    """Nothing answers on the store's port: the row is kept, the error names the lost job."""
    port = free_port()
    shop = shops(f"redis://127.0.0.1:{port}/0?socket_timeout=1", f"sqlite:///{tmp_path}/app.db")
    with shop.app.app_context():
        with shop.errands.transaction(shop.db.session):
            job = shop.sign_up("ada@example.com")
        with pytest.raises(EnqueueError, match=f"committed, but its jobs {job.id} were not"):
            shop.db.session.commit()
        assert job.status == JobStatus.PENDING
    assert shop.signups() == ["ada@example.com"]


@ON_POSTGRES
def test_sqlalchemy_on_psycopg2_writes_the_jobs_in_the_transaction_too(
    shops: Callable[..., Shop], store_url: str, app_schema: str
) -> None:
    require("psycopg2")
    shop = shops(
        store_url,
        sqlalchemy_url(POSTGRES_URL).replace("+psycopg:", "+psycopg2:"),
        SQLALCHEMY_ENGINE_OPTIONS={"connect_args": {"options": f"-csearch_path={app_schema}"}},
    )
    session = shop.db.session
    with shop.app.app_context():
        with shop.errands.transaction(session):
            dropped = shop.sign_up("rolled-back@example.com")
        session.rollback()
        with shop.errands.transaction(session):
            kept = shop.sign_up("ada@example.com")
            savepoint = session.begin_nested()
            inside = shop.send("inside")
            savepoint.rollback()
            unique = worker_app.record.options(unique_key="k", priority=3)
            first, again = (unique.delay(str(shop.runs), 0.0, "u") for _ in range(2))
            # Written in the transaction (not held): the store's own connection cannot see it.
            assert shop.errands.job(kept.id) is None and again == first
        session.commit()
        assert [shop.errands.job(j.id) for j in (dropped, inside)] == [None, None]
        assert shop.errands.drain() == 2
    assert sorted(shop.ran()) == ["ada@example.com", "u"]
    assert shop.signups() == ["ada@example.com"]


def test_flask_errands_imports_and_enqueues_without_sqlalchemy(tmp_path: Path) -> None:
    script = (
        "import sys; sys.modules['sqlalchemy'] = None\n"
        "from flask import Flask\n"
        "from flask_errands import Errands\n"
        "app = Flask('x', instance_path=sys.argv[1])\n"
        "app.config.update(ERRANDS_URL='memory://', ERRANDS_EMBEDDED_WORKER=False)\n"
        "errands = Errands(app)\n"
        "task = errands.task(name='t')(lambda: None)\n"
        "with app.app_context():\n"
        "    print(task.delay().status)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)],
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and result.stdout.strip() == "queued", result.stderr
