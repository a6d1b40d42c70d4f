"""What people see and do on the dashboard's pages and JSON API, on every store."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
from werkzeug.test import TestResponse

from flask_errands import Errands, JobStatus, current_job
from tests.dashboard.conftest import PREFIX, Dashboard
from tests.dashboard.test_security import scripts_and_handlers
from tests.helpers import wait_until

PAYLOADS = [
    "<img src=x onerror=alert(1)>",
    "</script><script>alert(1)</script>",
    "javascript:alert(1)",
    "{{7*7}}",
]


def body(response: TestResponse) -> Any:
    assert response.status_code < 400, (response.status_code, response.text[:500])
    return response.json


def test_a_job_page_shows_arguments_result_progress_and_times(dashboard: Dashboard) -> None:
    admin = dashboard.errands.admin
    job = admin.enqueue("progress", ["rendering pages"])
    dashboard.errands.drain()
    page = dashboard.client("vic").get(f"{PREFIX}/jobs/{job.id}").text
    assert '<pre class="code" data-field="args">[\n  &#34;rendering pages&#34;\n]</pre>' in page
    assert 'value="0.5"' in page and ">50%<" in page and ">rendering pages<" in page
    assert "&#34;done&#34;" in page  # the result
    assert "succeeded" in page and "1/1" in page
    assert re.search(r"started</dt><dd[^>]*>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC<", page)
    data = body(dashboard.client("vic").get(f"{PREFIX}/api/jobs/{job.id}"))
    assert data["args"] == ["rendering pages"] and data["result"] == "done"
    assert (data["progress"], data["progress_message"]) == (0.5, "rendering pages")


def test_a_failed_job_shows_its_error_and_traceback_and_reruns(dashboard: Dashboard) -> None:
    admin = dashboard.errands.admin
    job = admin.enqueue("boom", ["disk full"])
    dashboard.errands.drain()
    client = dashboard.client("ada")
    page = client.get(f"{PREFIX}/jobs/{job.id}").text
    assert "ValueError: disk full" in page and "Traceback (most recent call last)" in page
    assert "<h2>Progress</h2>" not in page  # it reported none and will not now
    token = dashboard.csrf(client)
    response = client.post(f"{PREFIX}/jobs/{job.id}/retry", data={"csrf_token": token})
    assert response.status_code == 302 and response.location.endswith(f"/jobs/{job.id}")
    assert admin.job(job.id).status is JobStatus.QUEUED
    page = client.get(response.location).text
    assert "The job is queued again." in page
    response = client.post(f"{PREFIX}/jobs/{job.id}/retry", data={"csrf_token": token})
    assert "only finished jobs can be re-run" in client.get(response.location).text
    client.post(f"{PREFIX}/jobs/{job.id}/cancel", data={"csrf_token": token})
    assert admin.job(job.id).status is JobStatus.CANCELLED
    api = client.post(f"{PREFIX}/api/jobs/{job.id}/cancel", headers={"X-CSRFToken": token})
    assert api.status_code == 409 and "already cancelled" in api.json["error"]  # type: ignore[index]


def test_the_failed_page_reruns_and_deletes_one_by_one_and_in_bulk(dashboard: Dashboard) -> None:
    admin = dashboard.errands.admin
    jobs = [admin.enqueue("boom", [f"n{i}"]) for i in range(3)]
    other = admin.enqueue("boom", ["elsewhere"], queue="other")
    dashboard.errands.drain()
    client = dashboard.client("ada")
    token = dashboard.csrf(client)
    page = client.get(f"{PREFIX}/failed").text
    assert all(f'value="{job.id}"' in page for job in [*jobs, other])
    client.post(f"{PREFIX}/failed/retry", data={"csrf_token": token, "job_id": [jobs[0].id]})
    assert [admin.job(j.id).status for j in jobs] == ["queued", "failed", "failed"]
    response = client.post(f"{PREFIX}/failed/retry", data={"csrf_token": token, "queue": "other"})
    assert "1 failed job queued again." in client.get(response.location).text
    assert admin.job(other.id).status is JobStatus.QUEUED
    client.post(f"{PREFIX}/failed/purge", data={"csrf_token": token, "job_id": [jobs[1].id]})
    assert admin.counts()["default"][JobStatus.FAILED] == 1
    assert admin.jobs(JobStatus.FAILED) == [admin.job(jobs[2].id)]
    client.post(f"{PREFIX}/failed/purge", data={"csrf_token": token})
    assert admin.counts()["default"][JobStatus.FAILED] == 0
    assert admin.job(jobs[0].id).status is JobStatus.QUEUED


def test_jobs_are_listed_newest_first_one_keyset_page_at_a_time(dashboard: Dashboard) -> None:
    admin = dashboard.errands.admin
    made = [admin.enqueue("ok", [i], queue="a" if i % 2 else "b").id for i in range(7)]
    client = dashboard.client("vic")
    seen: list[str] = []
    cursor: str | None = None
    while True:
        query = {"limit": "3", **({"cursor": cursor} if cursor else {})}
        page = body(client.get(f"{PREFIX}/api/jobs", query_string=query))
        seen += [job["id"] for job in page["jobs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == made[::-1]
    only_a = body(client.get(f"{PREFIX}/api/jobs?queue=a&state=queued&task=ok"))["jobs"]
    assert [job["id"] for job in only_a] == made[1::2][::-1]
    assert body(client.get(f"{PREFIX}/api/jobs?task=nope"))["jobs"] == []
    html = client.get(f"{PREFIX}/jobs?limit=2&queue=a").text
    older = re.search(r'href="([^"]+)" rel="next"', html)
    assert older and "queue=a" in older[1] and "limit=2" in older[1]
    second = client.get(older[1].replace("&amp;", "&")).text
    assert made[1][:12] in second and made[5][:12] not in second


def test_queues_pause_and_resume(dashboard: Dashboard) -> None:
    admin = dashboard.errands.admin
    admin.enqueue("ok", [1], queue="mail")
    client = dashboard.client("ada")
    token = dashboard.csrf(client)
    response = client.post(f"{PREFIX}/api/queues/mail/pause", headers={"X-CSRFToken": token})
    assert body(response) == {"name": "mail", "paused": True}
    queues = {q["name"]: q for q in body(client.get(f"{PREFIX}/api/queues"))["queues"]}
    assert queues["mail"]["paused"] is True and queues["mail"]["counts"]["queued"] == 1
    page = client.get(f"{PREFIX}/queues").text
    assert "paused" in page and f"{PREFIX}/queues/mail/resume" in page
    client.post(f"{PREFIX}/queues/mail/resume", data={"csrf_token": token})
    assert {q.name: q.paused for q in admin.queues()}["mail"] is False


def test_schedules_show_their_next_run_and_change_at_run_time(dashboard: Dashboard) -> None:
    client = dashboard.client("ada")
    token = dashboard.csrf(client)
    page = client.get(f"{PREFIX}/schedules").text
    assert "nightly" in page and re.search(r"03:00:00 CE[S]?T", page)
    assert re.search(r"0[12]:00:00 UTC", page)  # 03:00 in Paris
    before = {s["name"]: s for s in body(client.get(f"{PREFIX}/api/schedules"))["schedules"]}
    assert before["nightly"]["cron"] == "0 3 * * *"
    url = f"{PREFIX}/api/schedules/nightly"
    changed = body(client.patch(url, json={"cron": "30 4 * * *"}, headers={"X-CSRFToken": token}))
    assert changed["cron"] == "30 4 * * *" and "T04:30:00" in changed["next_run"]
    bad_bodies: list[object] = [{"cron": "61 * * * *"}, {"every": -5}, {"every": "5"}, {}, []]
    for bad in [*bad_bodies, {"every": True}, {"every": 1e400}]:
        response = client.patch(url, json=bad, headers={"X-CSRFToken": token})
        assert response.status_code == 400, bad
    response = client.post(
        f"{PREFIX}/schedules/hourly/edit",
        data={"csrf_token": token, "kind": "every", "value": "120"},
    )
    assert "hourly now runs on every 120" in client.get(response.location).text
    missing = client.patch(
        f"{PREFIX}/api/schedules/nope", json={"every": 5}, headers={"X-CSRFToken": token}
    )
    assert missing.status_code == 404
    paused = body(
        client.post(f"{PREFIX}/api/schedules/nightly/pause", headers={"X-CSRFToken": token})
    )
    assert paused["paused"] is True
    run = client.post(f"{PREFIX}/api/schedules/nightly/run", headers={"X-CSRFToken": token})
    assert run.status_code == 202
    assert dashboard.errands.admin.job(run.json["id"]).task.endswith("nightly")  # type: ignore[index]


def test_workers_and_stats_are_listed(dashboard: Dashboard) -> None:
    dashboard.errands.start_worker()
    client = dashboard.client("vic")
    workers = wait_until(
        lambda: body(client.get(f"{PREFIX}/api/workers"))["workers"], "a live worker"
    )
    assert workers[0]["host"] and workers[0]["pid"]
    page = client.get(f"{PREFIX}/workers").text
    assert workers[0]["id"] in page and str(workers[0]["pid"]) in page
    stats = body(client.get(f"{PREFIX}/api/stats"))
    assert len(stats["minutes"]) == 60
    for key in ("succeeded", "failed", "queued", "scheduled", "running"):
        assert len(stats[key]) == 60


def hostile(errands: Errands) -> None:
    """Tasks, queues and a schedule named after attacks, whose jobs carry them everywhere."""
    for index, payload in enumerate(PAYLOADS):

        def run(*args: object, payload: str = payload, **kwargs: object) -> dict[str, str]:
            current_job.set_progress(0.25, payload)
            return {payload: payload}

        errands.task(name=payload, queue=payload)(run)

        def tick() -> None:
            pass

        tick.__qualname__ = f"tick{index}"
        errands.periodic(every=60, name=payload)(tick)


@pytest.fixture
def attacked(make_dashboard: Callable[..., Dashboard]) -> Dashboard:
    made = make_dashboard(setup=hostile)
    with made.app.app_context():
        admin = made.errands.admin
        for payload in PAYLOADS:
            admin.enqueue(payload, [payload], {"k": payload})
            admin.enqueue("boom", [payload], queue=payload)
        made.errands.drain()
    return made


def test_attack_strings_are_shown_as_text_and_never_run(attacked: Dashboard) -> None:
    client = attacked.client("ada")
    with attacked.app.app_context():
        jobs = attacked.errands.admin.jobs(limit=100)
    pages = ["/", "/jobs", "/failed", "/queues", "/schedules", "/workers"]
    pages += [f"/jobs/{job.id}" for job in jobs]
    pages += [f"/jobs?task={p}" for p in PAYLOADS] + [f"/failed?queue={p}" for p in PAYLOADS]
    for path in pages:
        response = client.get(PREFIX + path)
        assert response.status_code == 200, path
        text = response.text
        assert "<img src=x" not in text and "<script>alert" not in text, path
        assert scripts_and_handlers(text) == "", path
    detail = client.get(f"{PREFIX}/jobs/{jobs[-1].id}").text
    assert "&lt;img src=x onerror=alert(1)&gt;" in detail
    schedules = client.get(f"{PREFIX}/schedules").text
    assert "&lt;/script&gt;&lt;script&gt;alert(1)&lt;/script&gt;" in schedules
    assert "{{7*7}}" in schedules and ">javascript:alert(1)<" in schedules
    api = client.get(f"{PREFIX}/api/jobs?limit=100")
    assert api.mimetype == "application/json"
    assert api.headers["X-Content-Type-Options"] == "nosniff"
    tasks = {job["task"] for job in body(api)["jobs"]}
    assert set(PAYLOADS) <= tasks


def test_a_viewer_sees_the_pages_with_every_action_button_disabled(dashboard: Dashboard) -> None:
    admin = dashboard.errands.admin
    job = admin.enqueue("boom")
    dashboard.errands.drain()
    viewer, owner = dashboard.client("vic"), dashboard.client("ada")
    for path in (f"/jobs/{job.id}", "/failed", "/schedules", "/queues"):
        seen = viewer.get(PREFIX + path).text
        actions = [b for b in re.findall(r"<button[^>]*>", seen) if "filter" not in b]
        assert actions and all("disabled" in button for button in actions), path
        assert ">vic<" not in seen and ">viewer<" in seen
        assert any(
            "disabled" not in b
            for b in re.findall(r"<button[^>]*>", owner.get(PREFIX + path).text)
        )
