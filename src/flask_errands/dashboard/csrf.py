"""CSRF tokens tied to the session: every POST and PATCH must carry the session's token."""

from __future__ import annotations

import hmac
import secrets

from flask import request, session

SESSION_KEY = "_errands_csrf"
HEADER = "X-CSRFToken"
FIELD = "csrf_token"


def token() -> str:
    """This session's token, made on first use; pages put it in a meta tag and forms."""
    value = session.get(SESSION_KEY)
    if not isinstance(value, str) or len(value) < 32:
        value = secrets.token_urlsafe(32)
        session[SESSION_KEY] = value
    return value


def is_valid() -> bool:
    """Whether the request carries the session's token (header or form field)."""
    expected = session.get(SESSION_KEY)
    sent = request.headers.get(HEADER) or request.form.get(FIELD)
    if not isinstance(expected, str) or not expected or not sent:
        return False
    return hmac.compare_digest(sent.encode(), expected.encode())
