"""The dashboard blueprint: authorization, CSRF and security headers around every route."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import Blueprint, Response, render_template, request
from werkzeug.exceptions import HTTPException

from ..admin import Admin
from . import api, csrf, pages
from .auth import Authorize, ask, refusal

NAME = "errands_dashboard"
#: Where a request keeps the role authorize gave it (``g`` may outlive the request).
ROLE_KEY = "flask_errands.role"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

#: No inline script or style, nothing from another origin, never framed.
CSP = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "object-src 'none'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
        "form-action 'self'",
    ]
)
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}


def wants_json() -> bool:
    """Whether the request is for the JSON API (errors answer in JSON there)."""
    return (request.endpoint or "").startswith(f"{NAME}.api_") or "/api/" in request.path


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Any:
    if wants_json():
        return {"error": message}, status, headers or {}
    html = render_template("errands_dashboard/error.html", status=status, message=message)
    return html, status, headers or {}


def make_blueprint(admin: Callable[[], Admin], authorize: Authorize) -> Blueprint:
    """A new blueprint (one per app) that asks ``authorize`` before every request."""
    bp = Blueprint(
        NAME,
        __name__,
        template_folder="templates",
        static_folder="static",
        static_url_path="/static",
    )

    @bp.before_request
    def gate() -> Any:
        role = ask(authorize)
        if role is None:
            return error_response(*refusal(authorize, "this dashboard"))
        request.environ[ROLE_KEY] = role
        if request.method not in SAFE_METHODS:
            if role != "admin":
                return error_response(403, "viewers may look but not act")
            if not csrf.is_valid():
                return error_response(403, "missing or wrong CSRF token; reload the page")
        return None

    @bp.after_request
    def secure(response: Response) -> Response:
        response.headers.update(HEADERS)
        if request.endpoint != f"{NAME}.static":
            response.headers["Cache-Control"] = "no-store"
        response.vary.add("Cookie")
        response.vary.add("Authorization")
        return response

    @bp.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Any:
        return error_response(error.code or 500, error.description or error.name)

    @bp.errorhandler(LookupError)
    def not_found(error: LookupError) -> Any:
        return error_response(404, str(error.args[0]) if error.args else "not found")

    @bp.context_processor
    def context() -> dict[str, Any]:
        return {
            "csrf_token": csrf.token,
            "role": request.environ.get(ROLE_KEY),
            "pretty": pages.pretty,
            "page_url": pages.page_url,
            "when": pages.when,
        }

    pages.register(bp, admin)
    api.register(bp, admin)
    return bp
