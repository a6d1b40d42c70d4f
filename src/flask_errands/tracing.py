"""OpenTelemetry traces of jobs: a span for each enqueue and each attempt, linked by the job.

On with ``ERRANDS_TRACING = True`` (``pip install 'flask-errands[otel]'``), in
the web and worker processes alike. Each new job gets a producer span, a
child of whatever span is current where it is enqueued (an instrumented
Flask request's), whose W3C ``traceparent`` the job record keeps; each
attempt, in whichever process runs it, gets a consumer span whose parent is
that one. The spans go to the tracer provider the app sets up; with none, the
API's no-op one. Off, nothing here is imported or called.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from .backends.base import JobRecord
from .exceptions import ConfigurationError
from .outcomes import Ending

if TYPE_CHECKING:
    from opentelemetry.trace import Span

#: ``messaging.system``, as OpenTelemetry's messaging conventions name the job system.
SYSTEM = "flask-errands"
#: The endings an attempt's span shows as an error.
FAILED_ENDINGS = frozenset({Ending.RAISED, Ending.TIMED_OUT, Ending.REFUSED})


class Ended(Protocol):
    """How an attempt ended, as the runner records it (``runner.Outcome``)."""

    @property
    def ending(self) -> Ending: ...

    @property
    def error(self) -> str | None: ...

    @property
    def exception(self) -> BaseException | None: ...


class Attempt(Protocol):
    """An attempt in progress (``runner.Execution``): its job, and its outcome once known."""

    @property
    def record(self) -> JobRecord: ...

    @property
    def outcome(self) -> Ended | None: ...


class Tracing:
    """Opens the spans of enqueues and attempts; one per app, made when tracing is on."""

    def __init__(self) -> None:
        try:
            from opentelemetry import trace
            from opentelemetry.trace.propagation.tracecontext import (
                TraceContextTextMapPropagator,
            )
        except ImportError as exc:
            raise ConfigurationError(
                "ERRANDS_TRACING needs the OpenTelemetry API; pip install 'flask-errands[otel]'"
            ) from exc
        self._trace = trace
        # A proxy until the app sets its tracer provider, then that provider's tracer.
        self._tracer = trace.get_tracer("flask_errands")
        self._propagator = TraceContextTextMapPropagator()

    @contextlib.contextmanager
    def enqueuing(self, records: Sequence[JobRecord]) -> Iterator[None]:
        """A producer span per new job around storing them; each job keeps its span's context.

        An enqueue that raises ends its spans with the exception recorded.
        """
        trace = self._trace
        spans = []
        for record in records:
            span = self._tracer.start_span(
                f"enqueue {record.task}",
                kind=trace.SpanKind.PRODUCER,
                attributes=_attributes(record),
            )
            carrier: dict[str, str] = {}
            self._propagator.inject(carrier, context=trace.set_span_in_context(span))
            record.trace = carrier.get("traceparent")
            spans.append(span)
        try:
            yield
        except BaseException as exc:
            for span in spans:
                _failed(span, exc, f"{type(exc).__name__}: {exc}")
            raise
        finally:
            for span in spans:
                span.end()

    @contextlib.contextmanager
    def attempt(self, attempt: Attempt) -> Iterator[None]:
        """A consumer span, current while the attempt runs, its parent the job's enqueue span.

        Its status is an error, with the exception recorded, when the attempt
        raised, timed out or found no task to run.
        """
        trace = self._trace
        record = attempt.record
        parent = self._propagator.extract({"traceparent": record.trace}) if record.trace else None
        span = self._tracer.start_span(
            f"run {record.task}",
            context=parent,
            kind=trace.SpanKind.CONSUMER,
            attributes=_attributes(record, record.attempts),
        )
        with trace.use_span(
            span, end_on_exit=True, record_exception=False, set_status_on_exception=False
        ):
            yield
            outcome = attempt.outcome
            if outcome is not None and outcome.ending in FAILED_ENDINGS:
                _failed(span, outcome.exception, outcome.error)


def _attributes(record: JobRecord, attempt: int | None = None) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "messaging.system": SYSTEM,
        "messaging.destination.name": record.queue,
        "messaging.message.id": record.id,
        "errands.job.id": record.id,
        "errands.task": record.task,
        "errands.queue": record.queue,
    }
    if attempt is not None:
        attributes["errands.attempt"] = attempt
    return attributes


def _failed(span: Span, exception: BaseException | None, error: str | None) -> None:
    from opentelemetry.trace import Status, StatusCode

    if exception is not None:
        span.record_exception(exception)
    span.set_status(Status(StatusCode.ERROR, error))
