"""``BasicAuth``: HTTP Basic sign-in against werkzeug password hashes."""

from __future__ import annotations

import pytest
from flask import Flask
from werkzeug.security import generate_password_hash

from flask_errands import BasicAuth
from tests.dashboard.conftest import METHOD, basic


@pytest.fixture
def auth() -> BasicAuth:
    return BasicAuth(
        admins={"ada": generate_password_hash("a-pass", method=METHOD)},
        viewers={"vic": generate_password_hash("v-pass", method=METHOD)},
        realm="ops",
    )


@pytest.mark.parametrize(
    ("header", "role"),
    [
        (basic("ada", "a-pass"), "admin"),
        (basic("vic", "v-pass"), "viewer"),
        (basic("ada", "v-pass"), None),
        (basic("vic", ""), None),
        (basic("eve", "a-pass"), None),
        ("Bearer a-pass", None),
        ("Basic !!!not-base64", None),
        (None, None),
    ],
)
def test_basic_auth_answers_a_role_or_none(auth: BasicAuth, header: str | None, role: str) -> None:
    headers = {} if header is None else {"Authorization": header}
    with Flask(__name__).test_request_context(headers=headers):
        assert auth() == role
    assert auth.challenge == 'Basic realm="ops", charset="UTF-8"'


def test_an_unknown_name_costs_the_same_hash_as_a_known_one(auth: BasicAuth) -> None:
    assert auth._dummy.startswith(METHOD + "$")


def test_bad_set_ups_are_refused() -> None:
    hashed = generate_password_hash("x", method=METHOD)
    with pytest.raises(ValueError, match="both admin and viewer"):
        BasicAuth(admins={"ada": hashed}, viewers={"ada": hashed})
    with pytest.raises(ValueError, match="realm"):
        BasicAuth(admins={"ada": hashed}, realm='a"b')
