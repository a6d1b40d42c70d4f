"""Prometheus metrics of the whole deployment, read from the store at each scrape.

Nothing is counted in the process that serves them: every figure is one the
store keeps as jobs are stored, claimed and end (the same the dashboard
charts), so any process of the app, a gunicorn worker or a worker host,
shows the same numbers, and a restart loses none. ``prometheus_client`` is an
extra: ``pip install 'flask-errands[prometheus]'``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from flask import Blueprint, Flask, Response

from .admin import Admin, Totals
from .backends.base import TIMING_BOUNDS
from .dashboard.auth import Authorize, ask, refusal
from .exceptions import ConfigurationError
from .status import JobStatus

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

#: The states ``errands_queue_jobs`` is given for, per queue.
GAUGED = (JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.RUNNING)
#: The help of each timing's histogram.
TIMING_HELP = {
    "duration": "Seconds from the start to the end of each attempt.",
    "wait": "Seconds from when a job was due to when an attempt of it started.",
}


def _prometheus() -> Any:
    try:
        import prometheus_client
        import prometheus_client.core
        import prometheus_client.utils
    except ImportError as exc:
        raise ConfigurationError(
            "errands.init_metrics needs prometheus_client; pip install 'flask-errands[prometheus]'"
        ) from exc
    return prometheus_client


class StoreCollector:
    """A ``prometheus_client`` collector of :meth:`Admin.totals`, asked at each scrape."""

    def __init__(self, admin: Callable[[], Admin]) -> None:
        self._admin = admin

    def collect(self) -> Iterator[Any]:
        return iter(families(self._admin().totals()))


def families(totals: Totals) -> list[Any]:
    """The metric families of ``totals``; label values are queue, task and status names only."""
    prometheus = _prometheus()
    core = prometheus.core
    enqueued = core.CounterMetricFamily(
        "errands_jobs_enqueued", "Jobs stored, since the store began.", labels=["task", "queue"]
    )
    for (queue, task), n in sorted(totals.enqueued.items()):
        enqueued.add_metric([task, queue], n)
    finished = core.CounterMetricFamily(
        "errands_jobs_finished",
        "Attempts that ended, by outcome (retried: failed, to run again), since the store began.",
        labels=["task", "queue", "status"],
    )
    for (queue, task, outcome), n in sorted(totals.finished.items()):
        finished.add_metric([task, queue, outcome], n)
    histograms = []
    for timing, help_text in TIMING_HELP.items():
        family = core.HistogramMetricFamily(
            f"errands_job_{timing}_seconds", help_text, labels=["task", "queue"]
        )
        for (name, queue, task), found in sorted(totals.timings.items()):
            if name != timing:
                continue
            buckets, running = [], 0
            for bound, n in zip((*TIMING_BOUNDS, float("inf")), found.buckets, strict=True):
                running += n
                buckets.append((prometheus.utils.floatToGoString(bound), running))
            family.add_metric([task, queue], buckets, found.total)
        histograms.append(family)
    depth = core.GaugeMetricFamily(
        "errands_queue_jobs", "Jobs in each queue by state, now.", labels=["queue", "status"]
    )
    for queue, counts in totals.counts.items():
        for status in GAUGED:
            depth.add_metric([queue, status.value], counts.get(status, 0))
    workers = core.GaugeMetricFamily("errands_workers", "Live workers, now.")
    workers.add_metric([], totals.workers)
    return [enqueued, finished, *histograms, depth, workers]


def mount(
    app: Flask, admin: Callable[[], Admin], *, path: str, authorize: Authorize | None
) -> CollectorRegistry:
    """Serve the metrics at ``path`` on ``app`` to requests ``authorize`` gives a role.

    Returns the registry they are served from, which holds only :class:`StoreCollector`.
    """
    prometheus = _prometheus()
    if authorize is None or not callable(authorize):
        raise ValueError(
            "the metrics need authorize=: a function returning 'admin', 'viewer' or None for "
            "the current request (flask_errands.BasicAuth is one; lambda: 'viewer' lets "
            "anyone who reaches the app scrape them)"
        )
    if not path.startswith("/") or path == "/":
        raise ValueError(f"the metrics path starts with / and names a page: {path!r}")
    registry: CollectorRegistry = prometheus.CollectorRegistry(auto_describe=False)
    registry.register(StoreCollector(admin))
    bp = Blueprint("errands_metrics", __name__)

    @bp.route(path)
    def metrics() -> Response:
        if ask(authorize) is None:
            status, message, headers = refusal(authorize, "these metrics")
            return Response(message + "\n", status, headers, mimetype="text/plain")
        response = Response(prometheus.generate_latest(registry), 200)
        response.headers["Content-Type"] = prometheus.CONTENT_TYPE_LATEST
        response.headers["Cache-Control"] = "no-store"
        response.vary.add("Authorization")
        return response

    app.register_blueprint(bp)
    return registry
