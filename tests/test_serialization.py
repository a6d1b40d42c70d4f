"""Arguments and results cross a process boundary as JSON and come back as the same values.

Each round trip goes through ``.delay()``, the backend and a real run of the
task, so what is checked is what a task receives and what ``result()`` gives.

Tests ask for ``backend_url`` before ``make_app``: fixtures are torn down in
reverse, so each store outlives the worker threads using it.
"""

from __future__ import annotations

import datetime as dt
import enum
import threading
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
from flask import Flask

from flask_errands import Errands, PayloadTooLarge, serialization

AppFactory = Callable[..., tuple[Flask, Errands]]


class Colour(enum.Enum):
    RED = "red"


class Size(int, enum.Enum):
    LARGE = 3


class Mood(str, enum.Enum):
    HAPPY = "happy"


VALUES: dict[str, Any] = {
    "aware datetime": dt.datetime(2024, 3, 1, 12, 30, 5, 123456, tzinfo=dt.timezone.utc),
    "aware datetime, other offset": dt.datetime(
        2024, 3, 1, 12, 30, tzinfo=dt.timezone(dt.timedelta(hours=-5, minutes=-30))
    ),
    "naive datetime": dt.datetime(2024, 3, 1, 12, 30, 5),
    "date": dt.date(1999, 12, 31),
    "uuid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
    "decimal": Decimal("12345678901234567890.000000000001"),
    "bytes": b"\x00\xff binary \x80",
    "empty bytes": b"",
    "tuple": (1, "two", 3.0),
    "nested tuples": ((1, (2, (3,))), [(), (None,)]),
    "dict with int keys": {1: "one", 2: "two"},
    "dict with tuple keys": {(1, 2): "a", ("x", (3, 4)): "b"},
    "dict holding the tag key": {"__errands__": "tuple", "v": [1, 2]},
    "nested dict holding the tag key": {"outer": {"__errands__": "bytes", "v": "AA=="}},
    "plain json": {"s": "é", "i": -7, "f": 1.5, "b": True, "n": None, "l": [1, [2]]},
    "mixed": [dt.date(2020, 1, 1), {"id": uuid.UUID(int=7), "amounts": (Decimal("1.10"),)}],
}


def _same(a: Any, b: Any) -> bool:
    """Equal and of the same type all the way down (``1 == 1.0 == True`` is not enough)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(
            _same(ka, kb) and _same(a[ka], b[kb]) for ka, kb in zip(a, b, strict=True)
        )
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dt.datetime):
        return bool(a == b and a.utcoffset() == b.utcoffset())
    return bool(a == b)


@pytest.fixture
def app_errands(backend_url: str, make_app: AppFactory) -> tuple[Flask, Errands]:
    return make_app(ERRANDS_URL=backend_url, ERRANDS_EMBEDDED_WORKER=False)


@pytest.mark.parametrize("name", list(VALUES))
def test_values_round_trip_through_delay_and_result(
    app_errands: tuple[Flask, Errands], name: str
) -> None:
    app, errands = app_errands
    received: list[Any] = []

    @errands.task
    def echo(value: Any, *, again: Any) -> Any:
        received.append((value, again))
        return value

    value = VALUES[name]
    with app.app_context():
        job = echo.delay(value, again=value)
        assert _same(job.args[0], value)
        assert errands.drain() == 1
        result = job.result(timeout=30)
    assert _same(received[0][0], value), received
    assert _same(received[0][1], value), received
    assert _same(result, value), result


def test_str_and_int_enums_travel_as_their_value(app_errands: tuple[Flask, Errands]) -> None:
    app, errands = app_errands

    @errands.task
    def echo(value: Any) -> Any:
        return value

    with app.app_context():
        jobs = [echo.delay(Mood.HAPPY), echo.delay(Size.LARGE), echo.delay({Mood.HAPPY: 1})]
        errands.drain()
        results = [job.result(timeout=30) for job in jobs]
    assert results == ["happy", 3, {"happy": 1}]
    assert [type(r) for r in results] == [str, int, dict]


def test_results_are_shown_as_plain_json_by_to_dict(app_errands: tuple[Flask, Errands]) -> None:
    app, errands = app_errands

    @errands.task
    def echo(value: Any) -> Any:
        return value

    with app.app_context():
        job = echo.delay({"when": dt.date(2024, 1, 2), "raw": b"hi", "pair": (1, 2)})
        errands.drain()
        data = job.refresh().to_dict()
    assert data["result"] == {"when": "2024-01-02", "raw": "aGk=", "pair": [1, 2]}


class Unencodable:
    def __repr__(self) -> str:
        return "<Unencodable>"


def self_referencing() -> list[Any]:
    value: list[Any] = []
    value.append(value)
    return value


def nested(depth: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda task: task.delay(1, Unencodable()), "b"),
        (lambda task: task.delay(1, 2, c={"deep": [Colour.RED]}), "c"),
        (lambda task: task.delay(1, 2, c=threading.Lock()), "c"),
        (lambda task: task.delay(1, {1, 2}), "b"),
        (lambda task: task.delay(dt.time(12, 0), 2), "a"),
        (lambda task: task.delay(1, self_referencing()), "b"),
        (lambda task: task.delay(nested(5000), 2), "a"),
        (lambda task: task.delay(1, 2, c={"k": ["ok", "lone \ud800 surrogate"]}), "c"),
        (lambda task: task.delay(1, {"\udcff": 1}), "b"),
    ],
)
def test_an_unencodable_argument_fails_at_delay_naming_task_and_argument(
    app_errands: tuple[Flask, Errands], call: Callable[[Any], Any], argument: str
) -> None:
    app, errands = app_errands

    @errands.task(name="billing.charge")
    def charge(a: Any, b: Any, c: Any = None) -> None:
        pass

    with app.app_context():
        with pytest.raises(TypeError) as caught:
            call(charge)
        assert errands.backend.counts() == {}
    message = str(caught.value)
    assert "billing.charge" in message
    assert repr(argument) in message


def test_an_unencodable_value_in_var_keyword_arguments_names_the_keyword(
    app_errands: tuple[Flask, Errands],
) -> None:
    app, errands = app_errands

    @errands.task(name="notify")
    def notify(*targets: Any, **extra: Any) -> None:
        pass

    with app.app_context():
        with pytest.raises(TypeError, match=r"'when' of task notify"):
            notify.delay("a", "b", when=object())
        with pytest.raises(TypeError, match=r"'targets\[1\]' of task notify"):
            notify.delay("a", object())
        assert errands.backend.counts() == {}


def test_a_batch_with_one_unencodable_call_stores_nothing(
    app_errands: tuple[Flask, Errands],
) -> None:
    app, errands = app_errands

    @errands.task
    def add(a: Any, b: Any) -> Any:
        return a + b

    with app.app_context():
        with pytest.raises(TypeError, match="'b'"):
            add.delay_many([(1, 2), (3, object()), (5, 6)])
        assert errands.backend.counts() == {}
        assert errands.drain() == 0


def test_an_unencodable_result_fails_the_job_with_a_clear_error(
    app_errands: tuple[Flask, Errands],
) -> None:
    app, errands = app_errands

    @errands.task
    def make_lock() -> Any:
        return threading.Lock()

    with app.app_context():
        job = make_lock.delay()
        errands.drain()
        job.refresh()
    assert job.status == "failed"
    assert job.error is not None
    assert job.error.startswith("TypeError:")
    assert "lock" in job.error


def test_arguments_nested_up_to_the_limit_round_trip(app_errands: tuple[Flask, Errands]) -> None:
    app, errands = app_errands

    @errands.task
    def echo(value: Any) -> Any:
        return value

    deep = nested(serialization.MAX_DEPTH - 2)  # inside {"args": [...]}: two levels more
    with app.app_context():
        job = echo.delay(deep)
        errands.drain()
        assert job.result() == deep
        with pytest.raises(TypeError, match="nested more than 100 levels deep"):
            echo.delay(nested(serialization.MAX_DEPTH + 1))


@pytest.mark.parametrize(
    ("returns", "error"),
    [
        (self_referencing, "TypeError: value nested more than 100 levels deep"),
        (lambda: "lone \ud800", "TypeError: a string holding the lone surrogate '\\ud800'"),
        (lambda: nested(500), "TypeError: value nested more than 100 levels deep"),
    ],
)
def test_a_result_that_cannot_be_stored_fails_its_job_and_the_worker_carries_on(
    app_errands: tuple[Flask, Errands], returns: Callable[[], Any], error: str
) -> None:
    app, errands = app_errands

    @errands.task
    def produce() -> Any:
        return returns()

    @errands.task
    def after() -> str:
        return "ran"

    with app.app_context():
        bad, good = produce.delay(), after.delay()
        errands.drain()
        assert bad.refresh().status == "failed"
        assert good.result() == "ran"
    assert bad.error is not None and bad.error.startswith(error)


@pytest.mark.parametrize("message", ["NUL \x00 inside", "lone \ud800 surrogate"])
def test_an_error_message_no_store_can_keep_is_stored_escaped(
    app_errands: tuple[Flask, Errands], message: str
) -> None:
    app, errands = app_errands

    @errands.task
    def explode() -> None:
        raise ValueError(message)

    with app.app_context():
        job = explode.delay()
        errands.drain()
        job.refresh()
    assert job.status == "failed"
    escaped = message.replace("\x00", "\\x00").replace("\ud800", "\\ud800")
    assert job.error == f"ValueError: {escaped}"
    assert job.traceback is not None and escaped in job.traceback


def test_a_payload_over_the_limit_raises_payload_too_large_and_stores_nothing(
    backend_url: str, make_app: AppFactory
) -> None:
    app, errands = make_app(
        ERRANDS_URL=backend_url, ERRANDS_EMBEDDED_WORKER=False, ERRANDS_MAX_PAYLOAD=1000
    )

    @errands.task(name="upload.store")
    def store(data: Any) -> None:
        pass

    with app.app_context():
        store.delay("x" * 900)  # under the limit, even with the JSON around it
        with pytest.raises(PayloadTooLarge) as caught:
            store.delay("x" * 1000)
        with pytest.raises(ValueError):  # PayloadTooLarge is a ValueError too
            store.delay("é" * 600)  # 600 characters, 1,200 bytes in UTF-8
        with pytest.raises(PayloadTooLarge):
            store.delay_many([("small",), ("x" * 2000,)])
        assert errands.backend.counts() == {("default", "queued"): 1}
    assert "upload.store" in str(caught.value)
    assert "ERRANDS_MAX_PAYLOAD" in str(caught.value)


def test_the_default_payload_limit_is_one_mebibyte(make_app: AppFactory) -> None:
    app, errands = make_app(ERRANDS_EMBEDDED_WORKER=False)

    @errands.task
    def store(data: Any) -> None:
        pass

    with app.app_context():
        store.delay("x" * (1024 * 1024 - 100))
        with pytest.raises(PayloadTooLarge):
            store.delay("x" * (1024 * 1024))


@pytest.mark.parametrize(
    "call",
    [
        lambda task: task.delay(),
        lambda task: task.delay(1, 2, 3),
        lambda task: task.delay(1, nope=2),
        lambda task: task.delay(1, a=2),
        lambda task: task.delay_many([(1,), ()]),
        lambda task: task.options(queue="other").delay(b=1),
    ],
)
def test_wrong_arguments_for_the_signature_fail_at_delay(
    app_errands: tuple[Flask, Errands], call: Callable[[Any], Any]
) -> None:
    app, errands = app_errands

    @errands.task(name="shop.ship")
    def ship(a: int, b: int = 0) -> None:
        pass

    with app.app_context():
        with pytest.raises(TypeError, match=r"shop\.ship"):
            call(ship)
        assert errands.backend.counts() == {}


def test_a_call_shape_that_bound_once_does_not_let_other_shapes_through(
    make_app: AppFactory,
) -> None:
    app, errands = make_app(ERRANDS_URL="memory://", ERRANDS_EMBEDDED_WORKER=False)

    @errands.task(name="shop.pack")
    def pack(a: int, b: int = 0, *, gift: bool = False) -> None:
        pass

    with app.app_context():
        for _ in range(2):  # the second round meets shapes already checked
            pack.delay(1)
            pack.delay(1, 2, gift=True)
            for bad in [(), (1, 2, 3)]:
                with pytest.raises(TypeError, match=r"shop\.pack\.delay\(\)"):
                    pack.delay(*bad)
            with pytest.raises(TypeError, match="unexpected keyword argument 'wrap'"):
                pack.delay(1, **{"wrap": True})
        assert [job.args for job in errands.admin.jobs()] == [(1, 2), (1,)] * 2
