"""Signals sent through blinker, as Flask sends its own.

Each is sent with the app as sender and the :class:`~flask_errands.Job` as ``job``;
``job_failed`` and ``job_retrying`` also carry ``error`` (``"Type: message"``).
"""

from __future__ import annotations

from blinker import Namespace

_signals = Namespace()

job_enqueued = _signals.signal("job-enqueued")
job_started = _signals.signal("job-started")
job_succeeded = _signals.signal("job-succeeded")
job_failed = _signals.signal("job-failed")
job_retrying = _signals.signal("job-retrying")
