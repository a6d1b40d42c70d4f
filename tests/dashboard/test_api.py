"""The JSON API matches its OpenAPI file, and no request the file allows makes it fail."""

from __future__ import annotations

import copy
import json
import re
from importlib.resources import files
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flask_errands.status import STATUSES
from tests.dashboard.conftest import PREFIX, Dashboard, basic
from tests.helpers import require

OPENAPI: dict[str, Any] = json.loads(
    files("flask_errands.dashboard").joinpath("openapi.json").read_text()
)


def test_the_openapi_file_describes_exactly_the_api_routes(dashboard: Dashboard) -> None:
    routes = set()
    for rule in dashboard.app.url_map.iter_rules():
        if rule.endpoint.startswith("errands_dashboard.api_"):
            path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule.removeprefix(PREFIX))
            routes |= {(m.lower(), path) for m in (rule.methods or set()) - {"HEAD", "OPTIONS"}}
    documented = {(method, path) for path, item in OPENAPI["paths"].items() for method in item}
    assert documented == routes
    states = OPENAPI["paths"]["/api/jobs"]["get"]["parameters"][0]["schema"]["enum"]
    assert states == [status.value for status in STATUSES]
    assert OPENAPI["components"]["schemas"]["Job"]["properties"]["status"]["enum"] == states
    for path, item in OPENAPI["paths"].items():
        names = set(re.findall(r"{(\w+)}", path))
        for method, operation in item.items():
            declared = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
            assert declared == names, (method, path)
            assert "200" in operation["responses"] or "202" in operation["responses"]
            assert ("security" in operation) == (method != "get"), (method, path)


def test_fuzzing_the_api_from_its_openapi_file_never_gets_a_500(dashboard: Dashboard) -> None:
    schemathesis = require("schemathesis")
    admin = dashboard.errands.admin
    admin.enqueue("boom")
    admin.enqueue("ok", [1], queue="mail")
    dashboard.errands.drain()
    client = dashboard.client("ada")
    token = dashboard.csrf(client)
    cookie = client.get_cookie("session")
    assert cookie is not None
    raw = copy.deepcopy(OPENAPI)
    raw["servers"] = [{"url": PREFIX}]
    schema = schemathesis.openapi.from_dict(raw)
    schema.app = dashboard.app
    headers = {"Authorization": basic("ada", "admin-secret"), "X-CSRFToken": token}
    checks = [schemathesis.checks.not_a_server_error]
    statuses: list[int] = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(
            max_examples=25,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(), with_token=st.booleans())
        def fuzz(case: Any, with_token: bool) -> None:
            sent = headers if with_token else {"Authorization": headers["Authorization"]}
            response = case.call(headers=sent, cookies={"session": cookie.value})
            statuses.append(response.status_code)
            case.validate_response(response, checks=checks)

        fuzz()
    assert 500 not in statuses and {200, 400, 403, 404} <= set(statuses)
