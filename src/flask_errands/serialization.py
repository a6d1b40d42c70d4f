"""JSON encoding of task arguments and results.

Everything crosses a process boundary, so values are JSON; datetime, date,
UUID, Decimal, bytes, tuples and dicts with non-string keys are tagged so they
come back as the same type. Pickle is never used.

What cannot travel raises ``TypeError`` here, before anything is stored: a
type outside that list, a value nested more than :data:`MAX_DEPTH` levels deep
(a list that contains itself is one), and a string holding a lone surrogate
(``"\\ud800"``), which no store can keep as UTF-8.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import uuid
from decimal import Decimal
from typing import Any

TAG = "__errands__"

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=True).encode
_loads = json.JSONDecoder(object_hook=lambda obj: _untag(obj) if TAG in obj else obj).decode

_PLAIN = (str, int, float, bool, type(None))
#: A call's payload when it has no arguments at all.
NO_ARGUMENTS = '{"args":[],"kwargs":{}}'

#: How deeply lists, dicts and tuples may nest in one value (a recursive value never ends).
MAX_DEPTH = 100


def to_json_value(value: Any, depth: int = 0) -> Any:
    """Return ``value`` as plain JSON data, tagging the extra types; raise TypeError otherwise."""
    kind = type(value)
    if kind in _PLAIN:
        return value
    if kind is list or kind is dict or kind is tuple:
        if depth >= MAX_DEPTH:
            raise TypeError(
                f"value nested more than {MAX_DEPTH} levels deep (or containing itself) "
                "cannot be encoded as JSON"
            )
        depth += 1
    if kind is list:
        if all(type(item) in _PLAIN for item in value):
            return value  # flat: the encoder takes it as it is
        return [to_json_value(item, depth) for item in value]
    if kind is dict:
        if all(type(key) is str for key in value) and TAG not in value:
            if all(type(item) in _PLAIN for item in value.values()):
                return value
            return {key: to_json_value(item, depth) for key, item in value.items()}
        pairs = [[to_json_value(k, depth), to_json_value(v, depth)] for k, v in value.items()]
        return {TAG: "dict", "v": pairs}
    if kind is tuple:
        return {TAG: "tuple", "v": [to_json_value(item, depth) for item in value]}
    if isinstance(value, dt.datetime):
        return {TAG: "datetime", "v": value.isoformat()}
    if isinstance(value, dt.date):
        return {TAG: "date", "v": value.isoformat()}
    if isinstance(value, uuid.UUID):
        return {TAG: "uuid", "v": str(value)}
    if isinstance(value, Decimal):
        return {TAG: "decimal", "v": str(value)}
    if isinstance(value, bytes | bytearray):
        return {TAG: "bytes", "v": base64.b64encode(value).decode("ascii")}
    if isinstance(value, str):  # subclasses such as enum.StrEnum travel as their value
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    raise TypeError(f"object of type {kind.__name__} is not JSON serializable")


def _untag(obj: dict[str, Any]) -> Any:
    kind, raw = obj[TAG], obj["v"]
    if kind == "tuple":
        return tuple(raw)
    if kind == "dict":
        return {_hashable(k): v for k, v in raw}
    if kind == "datetime":
        return dt.datetime.fromisoformat(raw)
    if kind == "date":
        return dt.date.fromisoformat(raw)
    if kind == "uuid":
        return uuid.UUID(raw)
    if kind == "decimal":
        return Decimal(raw)
    if kind == "bytes":
        return base64.b64decode(raw)
    raise ValueError(f"unknown tagged type {kind!r} in job data")


def _hashable(key: Any) -> Any:
    return tuple(key) if type(key) is list else key


def to_plain(value: Any) -> Any:
    """Return ``value`` as untagged JSON data for people to read (ISO dates, base64 bytes)."""
    if isinstance(value, list | tuple):
        return [to_plain(item) for item in value]
    if isinstance(value, dict):
        return {k if isinstance(k, str) else dumps(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, uuid.UUID | Decimal):
        return str(value)
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(value).decode("ascii")
    return value


def dumps(value: Any) -> str:
    """Encode ``value`` to a JSON string; raise TypeError naming the first thing that cannot go."""
    if value is None:  # most tasks return nothing
        return "null"
    text: str = _dumps(to_json_value(value))
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError as exc:
            raise TypeError(
                f"a string holding the lone surrogate {text[exc.start]!r} cannot be stored "
                "as UTF-8; decode bytes with errors='replace' or pass them as bytes"
            ) from None
    return text


def storable_text(text: str) -> str:
    """``text`` as every store can keep it: NUL and lone surrogates written as escapes.

    For text that is not JSON, such as an error message or a traceback.
    """
    if text.isascii() and "\x00" not in text:
        return text
    return text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode()


def loads(text: str) -> Any:
    """Decode a string written by :func:`dumps`."""
    if text == NO_ARGUMENTS:  # a fresh dict each time: callers may change what they get
        return {"args": [], "kwargs": {}}
    return _loads(text)
