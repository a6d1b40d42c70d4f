"""An app with the dashboard mounted, on SQLite, Redis and PostgreSQL, and clients for it.

``backend_url`` is narrowed here to the stores people run the dashboard on;
the memory store has no other process to look at.
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Callable, Iterator

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.security import generate_password_hash

from flask_errands import BasicAuth, Errands, current_job
from flask_errands.dashboard import Authorize
from tests.conftest import BACKENDS
from tests.helpers import MakeApp

#: Fast hashes: the tests sign in on every request.
METHOD = "pbkdf2:sha256:1000"
USERS = {"ada": "admin-secret", "vic": "viewer-secret"}
PREFIX = "/errands"


@pytest.fixture(params=["sqlite", "redis", "postgres"])
def backend_url(request: pytest.FixtureRequest, tmp_path: object) -> Iterator[str]:
    """A fresh store of each backend the dashboard is tested on."""
    yield from BACKENDS[request.param](str(tmp_path))


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@dataclasses.dataclass
class Dashboard:
    """The app under test, its extension, and a way to get signed-in clients."""

    app: Flask
    errands: Errands

    def client(self, user: str | None = "ada", password: str | None = None) -> FlaskClient:
        client = self.app.test_client()
        if user is not None:
            client.environ_base["HTTP_AUTHORIZATION"] = basic(user, password or USERS[user])
        return client

    def csrf(self, client: FlaskClient) -> str:
        response = client.get(f"{PREFIX}/api/csrf")
        assert response.status_code == 200
        token: str = response.json["csrf_token"]  # type: ignore[index]
        return token


def register_tasks(errands: Errands) -> None:
    """The tasks every dashboard test can enqueue, by these names."""

    @errands.task(name="ok")
    def ok(value: object = None) -> object:
        return value

    @errands.task(name="boom")
    def boom(message: str = "nope") -> None:
        raise ValueError(message)

    @errands.task(name="progress")
    def progress(message: str = "halfway") -> str:
        current_job.set_progress(0.5, message)
        return "done"

    @errands.periodic(cron="0 3 * * *", timezone="Europe/Paris", name="nightly")
    def nightly() -> None:
        pass

    @errands.periodic(every=3600, name="hourly")
    def hourly() -> None:
        pass


@pytest.fixture
def make_dashboard(backend_url: str, make_app: MakeApp) -> Callable[..., Dashboard]:
    """Build an app on ``backend_url`` with the dashboard mounted (HTTP Basic sign-in)."""

    def make(
        authorize: Authorize | None = None,
        setup: Callable[[Errands], None] | None = None,
        **config: object,
    ) -> Dashboard:
        config.setdefault("ERRANDS_EMBEDDED_WORKER", False)
        app, errands = make_app(ERRANDS_URL=backend_url, SECRET_KEY="test secret", **config)
        register_tasks(errands)
        if setup is not None:
            setup(errands)
        auth = authorize or BasicAuth(
            admins={"ada": generate_password_hash(USERS["ada"], method=METHOD)},
            viewers={"vic": generate_password_hash(USERS["vic"], method=METHOD)},
        )
        errands.init_dashboard(app, authorize=auth)
        return Dashboard(app, errands)

    return make


@pytest.fixture
def dashboard(make_dashboard: Callable[..., Dashboard]) -> Iterator[Dashboard]:
    made = make_dashboard()
    with made.app.app_context():
        yield made
