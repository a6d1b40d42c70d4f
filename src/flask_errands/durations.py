"""Durations written as text (``30``, ``45s``, ``15m``, ``12h``, ``7d``, ``2w``), read one way.

The CLI's ``--delay``/``--older-than`` and a task's ``delay=`` accept the same
strings, so one parser lives here, below everything that reads them.
"""

from __future__ import annotations

import re

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}

#: What :func:`parse_duration` accepts, for error messages.
FORMS = "a number of seconds or a duration such as '30', '45s', '15m', '12h', '7d' or '2w'"


def parse_duration(text: str) -> float:
    """Seconds in ``30``, ``45s``, ``15m``, ``12h``, ``7d`` or ``2w``; ValueError otherwise."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration like 30s, 15m, 12h or 7d")
    return float(match.group(1)) * _UNITS[match.group(2)]
