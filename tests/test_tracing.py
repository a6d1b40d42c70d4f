"""OpenTelemetry traces: the span of each attempt is a child of the span that enqueued its job,
whose context travels in the job record through the store."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask

from flask_errands import Errands, current_job
from tests.helpers import require

trace = require("opentelemetry.trace")
sdk_trace = require("opentelemetry.sdk.trace")
in_memory = require("opentelemetry.sdk.trace.export.in_memory_span_exporter")
export = require("opentelemetry.sdk.trace.export")

MakeApp = Callable[..., tuple[Flask, Errands]]
EXPORTER = in_memory.InMemorySpanExporter()


@pytest.fixture
def spans() -> Iterator[Any]:
    """The spans ended during the test, from the SDK's in-memory exporter."""
    if not isinstance(trace.get_tracer_provider(), sdk_trace.TracerProvider):
        provider = sdk_trace.TracerProvider()
        provider.add_span_processor(export.SimpleSpanProcessor(EXPORTER))
        trace.set_tracer_provider(provider)
    EXPORTER.clear()
    yield EXPORTER
    EXPORTER.clear()


def named(finished: Any, name: str) -> list[Any]:
    return [span for span in finished.get_finished_spans() if span.name == name]


def test_the_attempt_span_is_a_child_of_the_span_that_enqueued_the_job(
    shared_backend_url: str, make_app: MakeApp, spans: Any
) -> None:
    app, errands = make_app(
        ERRANDS_URL=shared_backend_url, ERRANDS_TRACING=True, ERRANDS_EMBEDDED_WORKER=False
    )

    @errands.task(name="traced.add", queue="maths")
    def add(a: int, b: int) -> int:
        trace.get_current_span().add_event("adding")  # the attempt's span is current
        return a + b

    tracer = trace.get_tracer("tests")
    with app.app_context():
        with tracer.start_as_current_span("request") as request_span:
            job = add.delay(2, 3)
        stored = errands.backend.get(job.id)
        assert stored is not None and stored.trace is not None
        assert errands.drain() == 1  # outside the request: the context comes from the store
        assert job.result(timeout=10) == 5

    [enqueued] = named(spans, "enqueue traced.add")
    [attempt] = named(spans, "run traced.add")
    assert enqueued.parent.span_id == request_span.get_span_context().span_id
    assert enqueued.kind is trace.SpanKind.PRODUCER
    assert attempt.kind is trace.SpanKind.CONSUMER
    assert attempt.parent.span_id == enqueued.context.span_id
    assert attempt.context.trace_id == request_span.get_span_context().trace_id
    assert stored.trace.startswith(  # W3C traceparent: version, trace, parent span, flags
        f"00-{enqueued.context.trace_id:032x}-{enqueued.context.span_id:016x}-"
    )
    assert dict(attempt.attributes) == {
        "messaging.system": "flask-errands",
        "messaging.destination.name": "maths",
        "messaging.message.id": job.id,
        "errands.job.id": job.id,
        "errands.task": "traced.add",
        "errands.queue": "maths",
        "errands.attempt": 1,
    }
    assert enqueued.attributes["errands.job.id"] == job.id
    assert [event.name for event in attempt.events] == ["adding"]
    assert attempt.status.status_code is trace.StatusCode.UNSET


def test_a_failed_attempt_records_its_exception_and_each_retry_has_its_own_span(
    shared_backend_url: str, make_app: MakeApp, spans: Any
) -> None:
    app, errands = make_app(
        ERRANDS_URL=shared_backend_url, ERRANDS_TRACING=True, ERRANDS_EMBEDDED_WORKER=False
    )

    @errands.task(name="traced.flaky", retries=1)
    def flaky() -> None:
        raise ValueError(f"attempt {current_job.attempt} broke")

    with app.app_context():
        job = flaky.delay()
        assert errands.drain(backoff=False) == 2

    [enqueued] = named(spans, "enqueue traced.flaky")
    attempts = named(spans, "run traced.flaky")
    assert [span.attributes["errands.attempt"] for span in attempts] == [1, 2]
    for number, span in enumerate(attempts, 1):
        assert span.parent.span_id == enqueued.context.span_id
        assert span.attributes["errands.job.id"] == job.id
        assert span.status.status_code is trace.StatusCode.ERROR
        assert span.status.description == f"ValueError: attempt {number} broke"
        [event] = span.events
        assert event.name == "exception"
        assert event.attributes["exception.type"] == "ValueError"
        assert event.attributes["exception.message"] == f"attempt {number} broke"


def test_the_instrumented_flask_request_is_the_parent_of_the_enqueue(
    sqlite_url: str, make_app: MakeApp, spans: Any
) -> None:
    flask_instrumentation = require("opentelemetry.instrumentation.flask")
    app, errands = make_app(
        ERRANDS_URL=sqlite_url, ERRANDS_TRACING=True, ERRANDS_EMBEDDED_WORKER=False
    )
    flask_instrumentation.FlaskInstrumentor().instrument_app(app)

    @errands.task(name="traced.mail")
    def mail(to: str) -> str:
        return to

    @app.post("/signup")
    def signup() -> dict[str, str]:
        return {"job": mail.delay("ada@example.com").id}

    try:
        job_id = app.test_client().post("/signup").json["job"]  # type: ignore[index]
        with app.app_context():
            assert errands.drain() == 1
    finally:
        flask_instrumentation.FlaskInstrumentor().uninstrument_app(app)
    [server] = [span for span in spans.get_finished_spans() if span.kind is trace.SpanKind.SERVER]
    [enqueued] = named(spans, "enqueue traced.mail")
    [attempt] = named(spans, "run traced.mail")
    assert enqueued.parent.span_id == server.context.span_id
    assert attempt.parent.span_id == enqueued.context.span_id
    assert {span.context.trace_id for span in (server, enqueued, attempt)} == {
        server.context.trace_id
    }
    assert attempt.attributes["errands.job.id"] == job_id


def test_without_errands_tracing_no_span_is_made_and_no_context_is_stored(
    sqlite_url: str, make_app: MakeApp, spans: Any
) -> None:
    app, errands = make_app(ERRANDS_URL=sqlite_url, ERRANDS_EMBEDDED_WORKER=False)

    @errands.task(name="traced.quiet")
    def quiet() -> None:
        pass

    with app.app_context():
        with trace.get_tracer("tests").start_as_current_span("request"):
            job = quiet.delay()
        assert errands.drain() == 1
        assert errands.backend.get(job.id).trace is None  # type: ignore[union-attr]
    assert [span.name for span in spans.get_finished_spans()] == ["request"]
