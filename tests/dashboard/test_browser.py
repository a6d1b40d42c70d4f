"""The dashboard in a real Chromium: sign in, watch jobs live, act, and try to inject script.

Playwright drives Debian's Chromium (``apt-get install chromium``; another
binary through ``ERRANDS_CHROMIUM``). Every test saves a screenshot of each
page it visits to ``tests/screenshots/`` for people to look at, and fails if
a dialog opens, a script errors, or the CSP refuses anything.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from werkzeug.serving import make_server

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

from flask_errands import Errands, JobStatus, current_job
from tests.dashboard.conftest import PREFIX, USERS, Dashboard
from tests.dashboard.test_pages import PAYLOADS, hostile
from tests.helpers import require, unavailable, wait_until

CHROMIUM = os.environ.get("ERRANDS_CHROMIUM", "/usr/bin/chromium")
SCREENSHOTS = Path(__file__).resolve().parent.parent / "screenshots"

playwright_api = require("playwright.sync_api")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """One headless Chromium for the tests of this module.

    Not for the session: Playwright's sync API keeps an event loop running on
    the main thread while it is open, which tests of async tasks must not see.
    """
    if not Path(CHROMIUM).exists():
        unavailable(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    with playwright_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


#: A crawl reads one page per release: the test turns the pages, so the job is
#: still running while the test looks at it, however slow the machine is.
CRAWL_PAGES = threading.Semaphore(0)


def browser_tasks(errands: Errands) -> None:
    """A task that reports progress page by page, and one that fails once then succeeds."""
    calls: list[int] = []

    @errands.task(name="crawl")
    def crawl(pages: int = 12) -> int:
        for page in range(1, pages + 1):
            CRAWL_PAGES.acquire()
            current_job.set_progress(page / pages, f"page {page} of {pages}")
        return pages

    @errands.task(name="flaky")
    def flaky() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise ConnectionError("the mail server hung up")
        return "delivered"


def buffered(app: WSGIApplication) -> WSGIApplication:
    """``app`` with each body read whole and its iterable closed before the server sends it.

    Werkzeug's development server skips closing a response (a static file's
    handle) when the browser drops the connection early, as it does for a
    favicon when a test moves on: the open file would then warn at some later test.
    """

    def serve(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        body = app(environ, start_response)
        try:
            return [b"".join(body)]
        finally:
            close = getattr(body, "close", None)
            if close is not None:
                close()

    return serve


class Live:
    """A dashboard served over HTTP with worker threads, and a signed-in browser page."""

    def __init__(self, dashboard: Dashboard, base: str, page: Any, name: str) -> None:
        self.dashboard = dashboard
        self.base = base
        self.page = page
        self.name = name
        self.problems: list[str] = []
        page.on("dialog", self._dialog)
        page.on("pageerror", lambda error: self.problems.append(f"page error: {error}"))
        page.on("console", self._console)

    def _console(self, message: Any) -> None:
        if message.type == "error":  # a CSP refusal or a failed request shows up here
            self.problems.append(f"console: {message.text}")

    def _dialog(self, dialog: Any) -> None:
        self.problems.append(f"a {dialog.type} dialog opened: {dialog.message}")
        dialog.dismiss()

    @property
    def admin(self) -> Any:
        return self.dashboard.errands.admin

    def open(self, path: str) -> Any:
        response = self.page.goto(f"{self.base}{PREFIX}{path}")
        assert response is not None and response.status == 200, path
        return response

    def shot(self, label: str) -> None:
        SCREENSHOTS.mkdir(exist_ok=True)
        self.page.screenshot(path=str(SCREENSHOTS / f"{self.name}-{label}.png"), full_page=True)

    def status_text(self) -> str:
        text: str = self.page.locator('h1 [data-field="status"]').inner_text()
        return text


@pytest.fixture
def live(
    browser: Any,
    make_dashboard: Callable[..., Dashboard],
    request: pytest.FixtureRequest,
) -> Iterator[Live]:
    setup: Callable[[Errands], None] = getattr(request, "param", browser_tasks)
    dashboard = make_dashboard(setup=setup, ERRANDS_CONCURRENCY=2)
    server = make_server("127.0.0.1", 0, buffered(dashboard.app), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    context = browser.new_context(
        http_credentials={"username": "ada", "password": USERS["ada"]},
        viewport={"width": 1280, "height": 900},
    )
    page = context.new_page()
    name = re.sub(r"[^\w-]+", "-", request.node.name.removeprefix("test_")).strip("-")
    with dashboard.app.app_context():
        dashboard.errands.start_worker()
        live = Live(dashboard, f"http://127.0.0.1:{server.server_port}", page, name)
        yield live
        context.close()
        server.shutdown()
        thread.join()
        assert live.problems == []


def test_a_running_jobs_progress_bar_moves_without_reloading(live: Live) -> None:
    while CRAWL_PAGES.acquire(blocking=False):
        pass  # pages an earlier, failed run left unread
    try:
        job = live.admin.enqueue("crawl")
        live.open(f"/jobs/{job.id}")
        live.page.evaluate("window.notReloaded = true")
        bar = live.page.locator('progress[data-field="progress"]')
        for page in range(1, 4):
            CRAWL_PAGES.release()
            wait_until(
                lambda: bar.evaluate("el => el.hidden ? null : el.value") == page / 12,  # noqa: B023
                f"the bar to show page {page}",
            )
        message = live.page.locator('.progress-box [data-field="progress_message"]')
        assert message.inner_text() == "page 3 of 12"
        live.shot("job-running")
        live.open("/jobs?state=running")
        live.page.locator('tr[data-live-job] [data-field="progress_text"]').first.wait_for()
        live.shot("jobs-running")
        live.open("/")
        live.page.locator('[data-chart="throughput"] svg').wait_for()
        queued = live.page.locator('[data-chart="depth"] svg .series-queued')
        queued.first.wait_for(state="attached")
        live.shot("overview")
        live.open("/workers")
        live.shot("workers")
        live.open(f"/jobs/{job.id}")
        live.page.evaluate("window.notReloaded = true")
    finally:
        CRAWL_PAGES.release(9)  # the rest of the crawl, even after a failure
    live.page.locator('h1 [data-field="status"]', has_text="succeeded").wait_for(timeout=20000)
    assert live.page.evaluate("window.notReloaded") is True
    assert live.page.locator('[data-field="result"]').inner_text() == "12"
    assert live.page.locator('.progress-box [data-field="progress_text"]').inner_text() == "100%"
    live.shot("job-succeeded")


def test_a_failed_job_is_rerun_from_the_failed_page_and_succeeds(live: Live) -> None:
    job = live.admin.enqueue("flaky")
    wait_until(lambda: job.refresh().status is JobStatus.FAILED, "the first attempt to fail")
    live.open("/failed")
    row = live.page.locator("tr", has_text="ConnectionError: the mail server hung up")
    assert row.count() == 1
    live.shot("failed")
    row.locator("a.mono").click()
    live.page.wait_for_url(f"**/jobs/{job.id}")
    assert "Traceback (most recent call last)" in live.page.locator(".traceback").inner_text()
    live.shot("job-failed")
    live.page.get_by_role("button", name="Re-run").click()
    live.page.locator('h1 [data-field="status"]', has_text="succeeded").wait_for(timeout=20000)
    assert live.page.locator('[data-field="result"]').inner_text() == '"delivered"'
    assert live.page.locator('[data-show-when="error"]').is_hidden()
    live.shot("job-rerun")


def test_a_paused_queue_takes_jobs_but_no_worker_claims_them(live: Live) -> None:
    first = live.admin.enqueue("flaky", queue="mail")
    wait_until(lambda: first.refresh().status.finished, "a job on the mail queue to run")
    live.open("/queues")
    row = live.page.locator('tr[data-queue="mail"]')
    row.get_by_role("button", name="Pause").click()
    row.locator(".status-paused").wait_for()
    live.shot("queues-paused")
    job = live.admin.enqueue("flaky", queue="mail")
    time.sleep(1.5)
    assert job.refresh().status is JobStatus.QUEUED
    live.open(f"/jobs/{job.id}")
    assert live.status_text() == "queued"
    live.open("/queues")
    live.page.locator('tr[data-queue="mail"]').get_by_role("button", name="Resume").click()
    live.page.locator('tr[data-queue="mail"] .status-active').wait_for()
    live.shot("queues-resumed")
    live.open(f"/jobs/{job.id}")
    live.page.locator('h1 [data-field="status"]', has_text="succeeded").wait_for(timeout=20000)


def limited_tasks(errands: Errands) -> None:
    """The browser tasks, and two limited ones: one export at a time, ten sends a minute."""
    browser_tasks(errands)

    @errands.task(name="export", concurrency=1)
    def export(seconds: float) -> None:
        time.sleep(seconds)

    @errands.task(name="send", queue="emails", rate_limit="10/m")
    def send() -> None:
        """Sends nothing: its starts count against the rate."""


@pytest.mark.parametrize("live", [limited_tasks], ids=["limited"], indirect=True)
def test_the_queues_page_shows_each_limit_in_use(live: Live) -> None:
    exports = [live.admin.enqueue("export", args=[3.0]) for _ in range(2)]
    sends = [live.admin.enqueue("send", queue="emails") for _ in range(3)]
    wait_until(lambda: all(job.refresh().status.finished for job in sends), "the sends to run")
    wait_until(lambda: exports[0].refresh().status is JobStatus.RUNNING, "an export to start")
    live.open("/queues")
    export = live.page.locator('tr[data-limit="task:export"] td')
    send = live.page.locator('tr[data-limit="task:send"] td')
    none = "\N{EN DASH}"
    assert export.all_inner_texts() == ["task export", "1", "1", none, none]
    assert send.all_inner_texts() == ["task send", none, "0", "10/m", "3"]
    assert exports[1].refresh().status is JobStatus.QUEUED
    live.shot("queues-limits")


def test_editing_a_schedules_cron_moves_its_next_run(live: Live) -> None:
    live.open("/schedules")
    row = live.page.locator('tr[data-schedule="nightly"]')
    before = row.locator(".next-utc").inner_text()
    assert before.endswith(("01:00:00 UTC", "02:00:00 UTC"))
    live.shot("schedules")
    row.locator('select[name="kind"]').select_option("cron")
    row.locator('input[name="value"]').fill("17 5 * * *")
    row.get_by_role("button", name="Save").click()
    live.page.locator(".flash", has_text="nightly now runs on cron 17 5 * * *").wait_for()
    row = live.page.locator('tr[data-schedule="nightly"]')
    assert row.locator(".next-local").inner_text().split()[1] == "05:17:00"
    assert row.locator(".next-utc").inner_text() != before
    row.locator('input[name="value"]').fill("not a cron")
    row.get_by_role("button", name="Save").click()
    live.page.locator(".flash-error", has_text="nightly unchanged").wait_for()
    live.shot("schedules-edited")


def hostile_browser_tasks(errands: Errands) -> None:
    browser_tasks(errands)
    hostile(errands)


@pytest.mark.parametrize("live", [hostile_browser_tasks], ids=["hostile"], indirect=True)
def test_attack_strings_never_open_a_dialog(live: Live) -> None:
    admin = live.admin
    jobs = []
    for payload in PAYLOADS:
        jobs.append(admin.enqueue(payload, [payload], {"k": payload}))
        jobs.append(admin.enqueue("boom", [payload], queue=payload))
    for job in jobs:
        wait_until(lambda: job.refresh().status.finished, "the hostile jobs to finish")  # noqa: B023
    for path in ["/", "/jobs", "/failed", "/queues", "/schedules", "/workers"]:
        live.open(path)
        live.shot(f"page{path.replace('/', '-')}")
    for index, job in enumerate(jobs):
        live.open(f"/jobs/{job.id}")
        if index < 2:
            live.shot(f"job-{index}")
    text = live.page.locator("main").inner_text()
    assert PAYLOADS[-1] in text
    live.open("/jobs?queue=" + PAYLOADS[1])
    live.page.wait_for_timeout(1500)  # the live polling writes values too
    assert live.problems == []
