"""flask-errands example: the slow work people hand to threads, done durably.

Each route answers 202 at once with the job's id; the client polls the
status route until the job has succeeded or failed. Jobs live in
``instance/errands.db`` and run on worker threads inside the web process::

    flask --app examples.app run

From another terminal::

    curl -X POST localhost:5000/signup -d email=ada@example.com    # a welcome e-mail
    curl localhost:5000/jobs/<job_id>                               # poll any job
    curl -X POST localhost:5000/upload -F file=@README.md           # count lines and words
    curl -X POST localhost:5000/reports -d days=30                  # slow, with progress
    curl -X POST localhost:5000/rates/EUR                           # flaky service, retried
    curl -X POST localhost:5000/invoices/42/sync                    # fails: read its traceback

Production runs the same jobs in worker processes (``flask --app examples.app
errands worker``), with ``FLASK_ERRANDS_URL=redis://localhost:6379/0`` and
``FLASK_ERRANDS_EMBEDDED_WORKER=false`` for the web process;
``flask --app examples.app errands schedules`` lists the periodic jobs.

Settings come from ``FLASK_*`` environment variables too, for instance
``FLASK_ERRANDS_URL=sqlite:////tmp/jobs.db`` or ``FLASK_SLOW_SECONDS=0.1``.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

from flask import Blueprint, Flask, current_app, request, url_for
from werkzeug.utils import secure_filename

from flask_errands import Errands, Job, current_job

errands = Errands()
bp = Blueprint("example", __name__)

RATES = {"EUR": 0.92, "GBP": 0.79, "JPY": 151.4}


def create_app() -> Flask:
    app = Flask(__name__)
    app.config.update(
        SLOW_SECONDS=1.0,  # how long each simulated slow call takes
        UPLOAD_FOLDER=os.path.join(app.instance_path, "uploads"),
        # Schedules can live in config too, naming any plain function by import path.
        ERRANDS_SCHEDULE=[
            {"name": "disk-usage", "task": "examples.app:log_disk_usage", "every": 300},
        ],
    )
    app.config.from_prefixed_env()
    app.logger.setLevel("INFO")  # show the "sent" e-mails
    errands.init_app(app)
    app.register_blueprint(bp)
    return app


def pause() -> None:
    """Stand in for a slow call: SMTP, a big query, a third-party API."""
    time.sleep(current_app.config["SLOW_SECONDS"])


# -- tasks ---------------------------------------------------------------------


@errands.task(queue="emails", retries=3, unique_key=lambda email: f"welcome:{email}")
def send_welcome_email(email: str) -> str:
    """Log the welcome e-mail instead of sending it; a real app calls its mail server."""
    pause()
    current_app.logger.info("To: %s\nSubject: Welcome!\n\nGlad to have you aboard.", email)
    return f"welcome e-mail sent to {email}"


@errands.task
def count_words(path: str) -> dict[str, Any]:
    """Count the lines and words of an uploaded file."""
    with open(path, encoding="utf-8", errors="replace") as file:
        text = file.read()
    return {
        "file": os.path.basename(path),
        "lines": len(text.splitlines()),
        "words": len(text.split()),
    }


@errands.task(queue="reports", timeout=600)
def build_report(days: int) -> dict[str, Any]:
    """A slow report that tells its poller how far it has come."""
    sections = ("sign-ups", "orders", "refunds", "page views")
    report: dict[str, Any] = {"days": days}
    for done, section in enumerate(sections):
        current_job.set_progress(done / len(sections), f"counting {section}")
        pause()
        report[section] = days * 17 * (done + 1)
    current_job.set_progress(1.0, "done")
    return report


def flaky_rates_service(currency: str) -> float:
    """A slow third-party API that times out on the first two tries of every job."""
    pause()
    if current_job.attempt <= 2:
        raise ConnectionError(f"rates.example.com timed out (attempt {current_job.attempt})")
    return RATES[currency]


@errands.task(retries=3, retry_delay=0.5)
def fetch_exchange_rate(currency: str) -> dict[str, Any]:
    """Call the flaky service; each failure is retried after an exponential back-off."""
    return {"currency": currency, "rate": flaky_rates_service(currency)}


@errands.task(retries=2, retry_delay=0.2)
def sync_invoice(invoice_id: int) -> None:
    """Push an invoice to an accounting system that always says no."""
    raise ValueError(f"invoice {invoice_id}: the accounting system rejected its VAT number")


# -- periodic jobs: once per tick, however many processes run a scheduler -------


@errands.periodic(cron="0 3 * * *", timezone="Europe/Paris")
def nightly_cleanup() -> int:
    """Every night at 3:00 Paris time, delete uploads older than a week."""
    folder = current_app.config["UPLOAD_FOLDER"]
    cutoff = time.time() - 7 * 86400
    removed = 0
    for entry in os.scandir(folder) if os.path.isdir(folder) else ():
        if entry.is_file() and entry.stat().st_mtime < cutoff:
            os.remove(entry.path)
            removed += 1
    return removed


def log_disk_usage() -> int:
    """Log how much the uploads take (scheduled from ERRANDS_SCHEDULE in create_app)."""
    folder = current_app.config["UPLOAD_FOLDER"]
    used = sum(e.stat().st_size for e in os.scandir(folder)) if os.path.isdir(folder) else 0
    current_app.logger.info("uploads use %d bytes", used)
    return used


# -- routes --------------------------------------------------------------------


def accepted(job: Job) -> tuple[dict[str, Any], int, dict[str, str]]:
    """202 Accepted, with where to poll."""
    status_url = url_for("example.job_status", job_id=job.id)
    return {"job_id": job.id, "status_url": status_url}, 202, {"Location": status_url}


@bp.post("/signup")
def signup() -> Any:
    email = request.form.get("email", "")
    if "@" not in email:
        return {"error": "give an e-mail address: -d email=ada@example.com"}, 400
    return accepted(send_welcome_email.delay(email))


@bp.post("/upload")
def upload() -> Any:
    file = request.files.get("file")
    if file is None or not file.filename:
        return {"error": "send a file: -F file=@notes.txt"}, 400
    folder = current_app.config["UPLOAD_FOLDER"]
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{uuid.uuid4().hex}-{secure_filename(file.filename)}")
    file.save(path)
    return accepted(count_words.delay(path))  # a path, not the bytes: jobs stay small


@bp.post("/reports")
def reports() -> Any:
    days = request.form.get("days", 7, type=int)
    return accepted(build_report.delay(days))


@bp.post("/rates/<currency>")
def rates(currency: str) -> Any:
    if currency not in RATES:
        return {"error": f"known currencies: {', '.join(RATES)}"}, 404
    return accepted(fetch_exchange_rate.delay(currency))


@bp.post("/invoices/<int:invoice_id>/sync")
def invoice_sync(invoice_id: int) -> Any:
    return accepted(sync_invoice.delay(invoice_id))


@bp.get("/jobs/<job_id>")
def job_status(job_id: str) -> Any:
    """What the client polls: status, progress, result, and the traceback of a failure."""
    job = errands.job(job_id)
    if job is None:
        return {"error": f"no job {job_id}"}, 404
    data = job.to_dict()
    if job.status == "failed":
        data["traceback"] = job.traceback
    return data
