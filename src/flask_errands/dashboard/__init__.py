"""The web dashboard: a blueprint of pages and a JSON API over the admin API.

Nothing is mounted unless the app calls ``errands.init_dashboard(app, ...)``,
and then every request is authorized, every action needs a CSRF token, and
every page is served under a Content-Security-Policy without inline script.
"""

from __future__ import annotations

from collections.abc import Callable

from flask import Blueprint, Flask

from ..admin import Admin
from .auth import Authorize, BasicAuth, Role
from .blueprint import make_blueprint

__all__ = ["Authorize", "BasicAuth", "Role", "mount"]


def mount(
    app: Flask, admin: Callable[[], Admin], *, url_prefix: str, authorize: Authorize | None
) -> Blueprint:
    """Register the dashboard on ``app`` at ``url_prefix``; ``authorize`` is required."""
    if authorize is None or not callable(authorize):
        raise ValueError(
            "the dashboard needs authorize=: a function returning 'admin', 'viewer' or None "
            "for the current request (flask_errands.BasicAuth is one)"
        )
    if not app.secret_key:
        raise ValueError("the dashboard needs app.secret_key: its CSRF tokens live in the session")
    if not url_prefix.startswith("/") or (url_prefix.endswith("/") and url_prefix != "/"):
        raise ValueError(f"url_prefix starts with / and does not end with one: {url_prefix!r}")
    blueprint = make_blueprint(admin, authorize)
    app.register_blueprint(blueprint, url_prefix=None if url_prefix == "/" else url_prefix)
    return blueprint
