"""Attacks on the dashboard: no sign-in, a viewer acting, forged requests, odd input, XSS."""

from __future__ import annotations

import html.parser
from collections.abc import Callable, Iterator

import pytest
from flask import Flask
from werkzeug.routing import Rule
from werkzeug.wrappers import Response

from flask_errands import JobStatus
from tests.dashboard.conftest import PREFIX, Dashboard, basic
from tests.helpers import MakeApp

SAFE = {"GET", "HEAD", "OPTIONS"}
URL_ATTRIBUTES = {"href", "src", "action", "formaction", "xlink:href", "srcset", "poster"}
HEADERS = {
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
}
CSP_PARTS = [
    "default-src 'self'",
    "script-src 'self'",
    "object-src 'none'",
    "frame-ancestors 'none'",
    "base-uri 'none'",
    "form-action 'self'",
]


def dashboard_rules(app: Flask) -> list[Rule]:
    rules = [r for r in app.url_map.iter_rules() if r.endpoint.startswith("errands_dashboard.")]
    assert len(rules) > 30
    return rules


def routes(app: Flask, values: dict[str, str]) -> Iterator[tuple[str, str]]:
    """Every (method, URL) of the dashboard, its path parameters filled from ``values``."""
    with app.test_request_context():
        adapter = app.url_map.bind("localhost")
        for rule in dashboard_rules(app):
            url = adapter.build(rule.endpoint, {name: values[name] for name in rule.arguments})
            for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
                yield method, url


def fill(job_id: str = "nosuchjob") -> dict[str, str]:
    return {
        "job_id": job_id,
        "name": "nightly",
        "queue": "default",
        "schedule": "nightly",
        "filename": "errands.css",
    }


def test_nothing_is_mounted_unless_the_app_asks(make_app: MakeApp) -> None:
    app, _ = make_app(SECRET_KEY="s")
    assert not [r for r in app.url_map.iter_rules() if r.rule.startswith(PREFIX)]
    assert app.test_client().get(f"{PREFIX}/").status_code == 404


def test_mounting_needs_authorize_and_a_secret_key(make_app: MakeApp) -> None:
    app, errands = make_app(SECRET_KEY="s")
    with pytest.raises(ValueError, match="authorize"):
        errands.init_dashboard(app)
    bare, errands = make_app()
    with pytest.raises(ValueError, match="secret_key"):
        errands.init_dashboard(bare, authorize=lambda: "admin")
    app.config["SECRET_KEY"] = "s"
    errands_app, other = make_app(SECRET_KEY="s")
    other.init_dashboard(errands_app, url_prefix="/ops/jobs", authorize=lambda: "viewer")
    assert errands_app.test_client().get("/ops/jobs/").status_code == 200


def test_every_route_asks_for_sign_in(dashboard: Dashboard) -> None:
    anonymous = dashboard.client(user=None)
    for method, url in routes(dashboard.app, fill()):
        for headers in (
            {},
            {"Authorization": basic("ada", "wrong")},
            {"Authorization": basic("eve", "x")},
        ):
            response = anonymous.open(url, method=method, headers=headers)
            assert response.status_code == 401, (method, url, headers)
            assert response.headers["WWW-Authenticate"].startswith('Basic realm="flask-errands"')
            assert "Access-Control-Allow-Origin" not in response.headers


def test_an_app_callback_that_refuses_gets_403_without_a_challenge(
    make_dashboard: Callable[..., Dashboard],
) -> None:
    made = make_dashboard(authorize=lambda: None)
    client = made.client(user=None)
    for method, url in routes(made.app, fill()):
        response = client.open(url, method=method)
        assert response.status_code == 403, (method, url)
        assert "WWW-Authenticate" not in response.headers


def failed_job(dashboard: Dashboard) -> str:
    job = dashboard.errands.admin.enqueue("boom")
    dashboard.errands.drain(backoff=False)
    assert job.refresh().status is JobStatus.FAILED
    return job.id


def snapshot(dashboard: Dashboard, job_id: str) -> object:
    """What an action could change: the job, the queues, the schedules."""
    admin = dashboard.errands.admin
    job = admin.job(job_id)
    return (
        job.status,
        job.attempts,
        admin.counts(),
        [(q.name, q.paused) for q in admin.queues()],
        [(s.name, s.paused, s.description) for s in admin.schedules()],
    )


def test_a_viewer_may_look_but_every_action_is_refused(dashboard: Dashboard) -> None:
    job_id = failed_job(dashboard)
    before = snapshot(dashboard, job_id)
    viewer = dashboard.client("vic")
    token = dashboard.csrf(viewer)
    for method, url in routes(dashboard.app, fill(job_id)):
        if method in SAFE:
            with viewer.get(url) as response:
                assert response.status_code in (200, 404), url
            continue
        response = viewer.open(
            url,
            method=method,
            headers={"X-CSRFToken": token},
            data={"csrf_token": token, "kind": "every", "value": "5"},
        )
        assert response.status_code == 403, (method, url)
    assert snapshot(dashboard, job_id) == before


@pytest.mark.parametrize("token", [None, "", "wrong", "x" * 43])
def test_an_action_without_the_session_token_changes_nothing(
    dashboard: Dashboard, token: str | None
) -> None:
    job_id = failed_job(dashboard)
    before = snapshot(dashboard, job_id)
    admin = dashboard.client("ada")
    dashboard.csrf(admin)  # the session has a token; the requests below do not send it
    for method, url in routes(dashboard.app, fill(job_id)):
        if method in SAFE:
            continue
        headers = {} if token is None else {"X-CSRFToken": token}
        form = {} if token is None else {"csrf_token": token}
        response = admin.open(url, method=method, headers=headers, data=form)
        assert response.status_code == 403, (method, url)
    assert snapshot(dashboard, job_id) == before


def test_a_token_from_another_session_is_refused(dashboard: Dashboard) -> None:
    job_id = failed_job(dashboard)
    stolen = dashboard.csrf(dashboard.client("ada"))
    victim = dashboard.client("ada")
    dashboard.csrf(victim)
    url = f"{PREFIX}/api/jobs/{job_id}/retry"
    assert victim.post(url, headers={"X-CSRFToken": stolen}).status_code == 403
    assert dashboard.errands.admin.job(job_id).status is JobStatus.FAILED
    response = victim.post(url, headers={"X-CSRFToken": dashboard.csrf(victim)})
    assert response.status_code == 200
    assert dashboard.errands.admin.job(job_id).status is JobStatus.QUEUED


def test_every_page_carries_the_token_and_the_security_headers(dashboard: Dashboard) -> None:
    job_id = failed_job(dashboard)
    admin = dashboard.client("ada")
    token = dashboard.csrf(admin)
    for method, url in routes(dashboard.app, fill(job_id)):
        if method != "GET":
            continue
        with admin.get(url) as response:
            check_page(response, url, token)


def check_page(response: Response, url: str, token: str) -> None:
    """The security headers are there; a page has the token and no inline script."""
    assert response.status_code == 200, url
    for name, value in HEADERS.items():
        assert response.headers[name] == value, (url, name)
    csp = response.headers["Content-Security-Policy"]
    assert all(part in csp for part in CSP_PARTS), csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert "Access-Control-Allow-Origin" not in response.headers
    if response.mimetype == "text/html":
        assert f'<meta name="csrf-token" content="{token}">' in response.get_data(as_text=True), (
            url
        )
        assert scripts_and_handlers(response.get_data(as_text=True)) == "", url


def scripts_and_handlers(page: str) -> str:
    """Inline script and event-handler attributes in ``page``, as one string (empty: none)."""
    found: list[str] = []

    class Finder(html.parser.HTMLParser):
        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            for name, value in attrs:
                url = name in URL_ATTRIBUTES and (value or "").strip().lower()
                if name.startswith("on") or (url and url.startswith(("javascript:", "data:"))):
                    found.append(f" {name}={value}")
            if tag == "script" and not dict(attrs).get("src"):
                found.append(" inline <script>")

    Finder().feed(page)
    return "".join(found)


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=201",
        "limit=-1",
        "limit=abc",
        "limit=1e3",
        "limit=99999999999999999999",
        "limit=%EF%BC%91",
        "state=bogus",
        "state=RUNNING",
        "cursor=not-a-cursor",
        "cursor=" + "A" * 600,
        "queue=" + "q" * 5000,
        "task=%00",
        "queue=a%0Ab",
        "x=" + "y" * 5000,
    ],
)
def test_a_bad_query_is_a_400_never_a_500(dashboard: Dashboard, query: str) -> None:
    admin = dashboard.client("ada")
    for path in ("/api/jobs", "/jobs", "/failed"):
        response = admin.get(f"{PREFIX}{path}?{query}")
        assert response.status_code == 400, (path, query, response.get_data(as_text=True)[:300])
        if path.startswith("/api/"):
            assert "error" in response.json  # type: ignore[operator]


@pytest.mark.parametrize("job_id", ["nosuchjob", "%00", "a" * 5000, "%F0%9F%92%A9", "%C3%28"])
def test_an_unknown_or_odd_job_id_is_a_404(dashboard: Dashboard, job_id: str) -> None:
    admin = dashboard.client("ada")
    token = dashboard.csrf(admin)
    assert admin.get(f"{PREFIX}/api/jobs/{job_id}").status_code == 404
    assert admin.get(f"{PREFIX}/jobs/{job_id}").status_code == 404
    response = admin.post(f"{PREFIX}/api/jobs/{job_id}/retry", headers={"X-CSRFToken": token})
    assert response.status_code == 404


def test_no_get_changes_anything(dashboard: Dashboard) -> None:
    job_id = failed_job(dashboard)
    before = snapshot(dashboard, job_id)
    admin = dashboard.client("ada")
    for _, url in routes(dashboard.app, fill(job_id)):
        admin.get(url).close()  # actions answer 405 to GET; pages only look
    assert snapshot(dashboard, job_id) == before
