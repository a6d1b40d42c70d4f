"""Configuration as users set it, in code or through environment variables: read one way."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from flask import Flask

from flask_errands import ConfigurationError, Errands
from flask_errands.durations import parse_duration

BOOLEAN_KEYS = ("ERRANDS_EMBEDDED_WORKER", "ERRANDS_EAGER", "ERRANDS_SCHEDULER")
TRUE = [True, 1, "true", "True", "TRUE", "1", "yes", "Yes", "on", "ON", " on "]
FALSE = [False, 0, "false", "False", "FALSE", "0", "no", "NO", "off", "Off"]


def settings(tmp_path: object, **config: Any) -> Any:
    app = Flask("config_test", instance_path=str(tmp_path))
    app.config.update(ERRANDS_URL="memory://", **config)
    errands = Errands(app)
    with app.app_context():
        return errands.settings


@pytest.mark.parametrize("key", BOOLEAN_KEYS)
@pytest.mark.parametrize(
    ("value", "expected"), [(v, True) for v in TRUE] + [(v, False) for v in FALSE]
)
def test_boolean_keys_take_booleans_and_the_usual_words(
    tmp_path: object, key: str, value: Any, expected: bool
) -> None:
    read = settings(tmp_path, **{key: value})
    attribute = {"ERRANDS_EMBEDDED_WORKER": "embedded_worker"}.get(key, key[8:].lower())
    assert getattr(read, attribute) is expected


@pytest.mark.parametrize("key", BOOLEAN_KEYS)
@pytest.mark.parametrize("value", ["nope", "", "2", 2, "enabled", [], 0.5])
def test_any_other_boolean_value_raises_naming_the_key(
    tmp_path: object, key: str, value: Any
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        settings(tmp_path, **{key: value})
    assert str(caught.value).startswith(f"{key} must be True or False")
    assert "'on/off'" in str(caught.value)


def test_embedded_worker_false_as_text_keeps_the_worker_off(tmp_path: object) -> None:
    app = Flask("config_test", instance_path=str(tmp_path))
    app.config.update(ERRANDS_URL="memory://", ERRANDS_EMBEDDED_WORKER="false")
    errands = Errands(app)

    @app.get("/")
    def index() -> str:
        return "ok"

    assert app.test_client().get("/").text == "ok"
    with app.app_context():
        assert errands.settings.embedded_worker is False
        assert errands.runtime.worker is None
        errands.backend.close()


@pytest.mark.parametrize(
    ("config", "read"),
    [
        ({"ERRANDS_CONCURRENCY": "8"}, {"concurrency": 8}),
        ({"ERRANDS_MAX_PAYLOAD": " 2048 "}, {"max_payload": 2048}),
        ({"ERRANDS_LEASE_SECONDS": "45"}, {"lease_seconds": 45.0}),
        ({"ERRANDS_LEASE_SECONDS": "2m"}, {"lease_seconds": 120.0}),
        ({"ERRANDS_RESULT_TTL": "7d"}, {"result_ttl": 604800.0}),
        ({"ERRANDS_RESULT_TTL": dt.timedelta(hours=1)}, {"result_ttl": 3600.0}),
    ],
)
def test_number_keys_take_digit_strings_and_durations(
    tmp_path: object, config: dict[str, Any], read: dict[str, Any]
) -> None:
    found = settings(tmp_path, **config)
    assert {name: getattr(found, name) for name in read} == read


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (
            "ERRANDS_CONCURRENCY",
            "four",
            "ERRANDS_CONCURRENCY must be a whole number of at least 1",
        ),
        ("ERRANDS_CONCURRENCY", "0", "ERRANDS_CONCURRENCY must be a whole number of at least 1"),
        ("ERRANDS_MAX_PAYLOAD", "1.5", "ERRANDS_MAX_PAYLOAD must be a whole number"),
        (
            "ERRANDS_LEASE_SECONDS",
            float("inf"),
            "ERRANDS_LEASE_SECONDS must be a positive, finite",
        ),
        (
            "ERRANDS_LEASE_SECONDS",
            float("nan"),
            "ERRANDS_LEASE_SECONDS must be a positive, finite",
        ),
        ("ERRANDS_LEASE_SECONDS", "soon", "ERRANDS_LEASE_SECONDS must be a positive, finite"),
        ("ERRANDS_RESULT_TTL", "-1d", "ERRANDS_RESULT_TTL must be a positive, finite"),
    ],
)
def test_bad_numbers_raise_naming_the_key(
    tmp_path: object, key: str, value: Any, message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        settings(tmp_path, **{key: value})


def _with_query(url: str, query: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}{query}"


def test_an_unknown_url_parameter_raises_listing_the_known_ones(
    backend_url: str, tmp_path: object
) -> None:
    app = Flask("config_test", instance_path=str(tmp_path))
    app.config.update(ERRANDS_URL=_with_query(backend_url, "prefx=jobs:"))
    with pytest.raises(ConfigurationError) as caught:
        Errands(app)
    message = str(caught.value)
    assert message.startswith("ERRANDS_URL has unknown query parameter(s) 'prefx'; ")
    scheme = backend_url.split(":", 1)[0]
    expected = {
        "memory": "takes no query parameters",
        "sqlite": "takes no query parameters",
        "redis": "accepts client_name, db, ",
        "postgresql": "accepts application_name, ",
    }[scheme]
    assert expected in message
    if scheme == "redis":
        assert all(name in message for name in ("prefix", "socket_timeout", "timeout"))
    if scheme == "postgresql":
        assert all(name in message for name in ("pool_max_size", "pool_timeout", "sslmode"))


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30", 30), ("45s", 45), ("1.5m", 90), ("12h", 43200), ("7d", 604800), ("2w", 1209600)],
)
def test_durations_read_as_the_cli_reads_them(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "s", "5y", "-5s", "1e3", "five"])
def test_a_bad_duration_raises_value_error(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration like 30s, 15m, 12h or 7d"):
        parse_duration(text)
