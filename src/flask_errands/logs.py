"""Log records that say which job wrote them."""

from __future__ import annotations

import logging

from .context import _current


class JobLogFilter(logging.Filter):
    """Adds ``job_id`` and ``task`` to every record (None outside a job).

    Attach it to a handler to use ``%(job_id)s`` in its format, for the
    records your own tasks log as well as those flask-errands writes.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        job = _current.get(None)
        if not hasattr(record, "job_id"):
            record.job_id = job.id if job is not None else None
        if not hasattr(record, "task"):
            record.task = job.task if job is not None else None
        return True
