"""Query parameters and names from URLs, checked: a bad value is a 400, never a 500."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from werkzeug.exceptions import BadRequest

from ..status import STATUSES

DEFAULT_LIMIT = 50
MAX_LIMIT = 200
#: Longest filter or name accepted; queue names are up to 200, unique keys up to 500.
MAX_TEXT = 500
MAX_QUERY = 4096


def is_name(value: str, longest: int = MAX_TEXT) -> bool:
    """Whether ``value`` can be a job id, queue, task or schedule name: no store refuses it."""
    return 0 < len(value) <= longest and value.isprintable()


def text(args: Mapping[str, str], key: str) -> str | None:
    value = args.get(key)
    if value is None or value == "":
        return None
    if not is_name(value):
        raise BadRequest(f"{key} must be printable text of at most {MAX_TEXT} characters")
    return value


@dataclasses.dataclass(frozen=True)
class JobFilters:
    """What a jobs listing asks for: state, queue, task, a page size and a keyset cursor."""

    status: str | None = None
    queue: str | None = None
    task: str | None = None
    limit: int = DEFAULT_LIMIT
    cursor: str | None = None

    @classmethod
    def parse(cls, args: Mapping[str, str], query_length: int = 0) -> JobFilters:
        if query_length > MAX_QUERY:
            raise BadRequest(f"the query string is over {MAX_QUERY} bytes")
        status = text(args, "state")
        if status is not None and status not in STATUSES:
            raise BadRequest(f"state must be one of {', '.join(STATUSES)}")
        raw_limit = args.get("limit") or str(DEFAULT_LIMIT)
        if not raw_limit.isascii() or not raw_limit.isdigit() or len(raw_limit) > 4:
            raise BadRequest(f"limit must be a whole number from 1 to {MAX_LIMIT}")
        limit = int(raw_limit)
        if not 1 <= limit <= MAX_LIMIT:
            raise BadRequest(f"limit must be a whole number from 1 to {MAX_LIMIT}")
        return cls(status, text(args, "queue"), text(args, "task"), limit, text(args, "cursor"))

    def query(self, **changes: str | None) -> dict[str, str]:
        """These filters as query arguments for a link, with ``changes`` applied."""
        values = {
            "state": self.status,
            "queue": self.queue,
            "task": self.task,
            "limit": None if self.limit == DEFAULT_LIMIT else str(self.limit),
            **changes,
        }
        return {key: value for key, value in values.items() if value}
