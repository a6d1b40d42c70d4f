"""Who may see the dashboard: the app's ``authorize`` callback, and a ready HTTP Basic one."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal

from flask import request
from werkzeug.security import check_password_hash, generate_password_hash

#: What ``authorize`` answers: ``"admin"`` may act, ``"viewer"`` may look, None is refused.
Role = Literal["admin", "viewer"]
Authorize = Callable[[], "Role | None"]
ROLES = ("admin", "viewer")


class BasicAuth:
    """An ``authorize`` callback for HTTP Basic sign-in against werkzeug password hashes.

    ``admins`` and ``viewers`` map user names to hashes made by
    ``werkzeug.security.generate_password_hash``. An unknown user's password is
    still checked against a dummy hash, so the answer takes as long as for a
    known one and does not tell which names exist.
    """

    def __init__(
        self,
        admins: Mapping[str, str] | None = None,
        viewers: Mapping[str, str] | None = None,
        *,
        realm: str = "flask-errands",
    ) -> None:
        if not realm.isprintable() or '"' in realm or "\\" in realm:
            raise ValueError(f"a realm is printable text without quotes, not {realm!r}")
        admins, viewers = dict(admins or {}), dict(viewers or {})
        if both := sorted(set(admins) & set(viewers)):
            raise ValueError(f"users both admin and viewer: {', '.join(both)}")
        self._users: dict[str, tuple[str, Role]] = {
            **{name: (hashed, "viewer") for name, hashed in viewers.items()},
            **{name: (hashed, "admin") for name, hashed in admins.items()},
        }
        # Made with the users' own method, so an unknown name costs what a known one does.
        method = next((h.split("$", 1)[0] for h, _ in self._users.values()), "scrypt")
        self._dummy = generate_password_hash("no user has this password", method=method)
        #: The ``WWW-Authenticate`` header the dashboard sends with a 401.
        self.challenge = f'Basic realm="{realm}", charset="UTF-8"'

    def __call__(self) -> Role | None:
        auth = request.authorization
        if auth is None or auth.type != "basic" or auth.username is None:
            return None
        known = self._users.get(auth.username)
        hashed, role = known if known is not None else (self._dummy, None)
        if check_password_hash(hashed, auth.password or "") and known is not None:
            return role
        return None


def ask(authorize: Authorize) -> Role | None:
    """The role ``authorize`` gives the current request; ``TypeError`` for anything else."""
    role = authorize()
    if role is not None and role not in ROLES:
        raise TypeError(f"authorize() must return 'admin', 'viewer' or None, not {role!r}")
    return role


def refusal(authorize: Authorize, what: str) -> tuple[int, str, dict[str, str]]:
    """The status, message and headers refusing a request ``authorize`` gave no role.

    401 with a challenge when HTTP Basic is in use, so a browser or scraper signs
    in; 403 otherwise.
    """
    challenge = challenge_for(authorize)
    if challenge is not None:
        return 401, "sign in", {"WWW-Authenticate": challenge}
    return 403, f"you may not see {what}", {}


def challenge_for(authorize: Authorize) -> str | None:
    """The ``WWW-Authenticate`` value for a refusal, when HTTP Basic is in use; else None."""
    challenge = getattr(authorize, "challenge", None)
    if isinstance(challenge, str):
        return challenge
    auth = request.authorization
    if auth is not None and auth.type == "basic":
        return 'Basic realm="flask-errands", charset="UTF-8"'
    return None
