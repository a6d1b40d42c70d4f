"""The example app, driven as its README describes: POST, get 202, poll the status route."""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from examples.app import create_app, errands
from flask.testing import FlaskClient


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FlaskClient]:
    """The example on its embedded default, pointed into tmp_path through FLASK_* variables."""
    monkeypatch.setenv("FLASK_ERRANDS_URL", f"sqlite:///{tmp_path}/errands.db")
    monkeypatch.setenv("FLASK_UPLOAD_FOLDER", str(tmp_path / "uploads"))
    monkeypatch.setenv("FLASK_SLOW_SECONDS", "0.3")
    app = create_app()
    yield app.test_client()
    with app.app_context():
        errands.stop_worker()
        errands.backend.close()


def poll(
    client: FlaskClient, url: str, until: Callable[[dict[str, Any]], bool], what: str
) -> dict[str, Any]:
    """GET ``url`` until ``until(json)`` holds, as a client would; fail after 30 s."""
    deadline = time.monotonic() + 30
    while True:
        response = client.get(url)
        assert response.status_code == 200, response.text
        data = response.json
        assert isinstance(data, dict), response.text
        if until(data):
            return data
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}; last seen: {data}")
        time.sleep(0.01)


def start(client: FlaskClient, path: str, **kwargs: Any) -> str:
    """POST to a task route, check it answers 202 at once, and return the status URL."""
    response = client.post(path, **kwargs)
    assert response.status_code == 202, response.text
    body = response.json
    assert isinstance(body, dict), response.text
    assert response.headers["Location"] == body["status_url"] == f"/jobs/{body['job_id']}"
    return str(body["status_url"])


def finished(data: dict[str, Any]) -> bool:
    return data["status"] in ("succeeded", "failed", "cancelled")


def test_signup_answers_202_and_sends_the_welcome_email(
    client: FlaskClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    url = start(client, "/signup", data={"email": "ada@example.com"})
    data = poll(client, url, finished, "the e-mail job")
    assert data["status"] == "succeeded"
    assert data["result"] == "welcome e-mail sent to ada@example.com"
    assert data["queue"] == "emails"
    assert any("To: ada@example.com" in r.getMessage() for r in caplog.records)


def test_signup_twice_while_the_first_is_pending_sends_one_email(client: FlaskClient) -> None:
    first = start(client, "/signup", data={"email": "bob@example.com"})
    assert start(client, "/signup", data={"email": "bob@example.com"}) == first


def test_signup_without_an_email_is_a_400(client: FlaskClient) -> None:
    response = client.post("/signup", data={})
    assert response.status_code == 400
    assert response.json is not None and "email" in response.json["error"]


def test_an_uploaded_file_is_counted_in_the_background(
    client: FlaskClient, tmp_path: Path
) -> None:
    text = b"one two three\nfour five\n\nsix\n"
    url = start(client, "/upload", data={"file": (io.BytesIO(text), "notes.txt")}, buffered=True)
    data = poll(client, url, finished, "the word count")
    assert data["status"] == "succeeded", data
    assert data["result"]["lines"] == 4
    assert data["result"]["words"] == 6
    assert data["result"]["file"].endswith("-notes.txt")
    assert [p.read_bytes() for p in (tmp_path / "uploads").iterdir()] == [text]


def test_a_report_shows_progress_while_running_then_its_result(client: FlaskClient) -> None:
    url = start(client, "/reports", data={"days": "30"})
    running = poll(
        client,
        url,
        lambda d: finished(d) or (d["status"] == "running" and (d["progress"] or 0) > 0),
        "the report to report progress",
    )
    assert running["status"] == "running", "the report finished before a poll saw it run"
    assert 0 < running["progress"] < 1
    assert running["progress_message"].startswith("counting ")
    assert running["started_at"] is not None and running["finished_at"] is None
    done = poll(client, url, finished, "the report to finish")
    assert done["status"] == "succeeded"
    assert done["progress"] == 1.0
    assert done["result"] == {
        "days": 30,
        "sign-ups": 510,
        "orders": 1020,
        "refunds": 1530,
        "page views": 2040,
    }


def test_the_flaky_service_succeeds_on_its_third_attempt(client: FlaskClient) -> None:
    url = start(client, "/rates/EUR")
    retrying = poll(
        client, url, lambda d: finished(d) or d["error"] is not None, "a failed attempt"
    )
    assert retrying["error"] == "ConnectionError: rates.example.com timed out (attempt 1)"
    data = poll(client, url, finished, "the rate")
    assert data["status"] == "succeeded", data
    assert data["result"] == {"currency": "EUR", "rate": 0.92}
    assert data["attempts"] == 3
    assert data["error"] is None


def test_a_failing_task_shows_failed_with_its_traceback_after_its_retries(
    client: FlaskClient,
) -> None:
    url = start(client, "/invoices/42/sync")
    data = poll(client, url, finished, "the invoice sync to give up")
    assert data["status"] == "failed"
    assert data["attempts"] == data["max_attempts"] == 3
    message = "ValueError: invoice 42: the accounting system rejected its VAT number"
    assert data["error"] == message
    assert data["traceback"].startswith("Traceback (most recent call last):")
    assert "in sync_invoice" in data["traceback"]
    assert data["traceback"].rstrip().endswith(message)
    assert "result" not in data


def test_an_unknown_job_is_a_404(client: FlaskClient) -> None:
    response = client.get("/jobs/no-such-job")
    assert response.status_code == 404
    assert response.json == {"error": "no job no-such-job"}


def test_the_example_keeps_its_jobs_where_errands_url_points(
    client: FlaskClient, tmp_path: Path
) -> None:
    start(client, "/signup", data={"email": "cy@example.com"})
    assert (tmp_path / "errands.db").is_file()
