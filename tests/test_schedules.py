"""Schedule definitions: what ``every``, cron and time zones fire at, and what is refused."""

from __future__ import annotations

import datetime as dt
import zoneinfo
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask

from flask_errands import ConfigurationError, Errands
from flask_errands.schedules import Schedule

UTC = dt.timezone.utc
PARIS = zoneinfo.ZoneInfo("Europe/Paris")

MakeApp = Callable[..., tuple[Flask, Errands]]


def cleanup(days: int = 30) -> int:
    """A plain function that ERRANDS_SCHEDULE entries of these tests name by import path."""
    return days


not_a_function = 42


def chain(schedule: Schedule, start: dt.datetime, end: dt.datetime) -> list[dt.datetime]:
    """Every fire time of ``schedule`` after ``start`` and up to ``end``."""
    times = []
    moment = schedule.next_run(start)
    while moment <= end:
        times.append(moment)
        moment = schedule.next_run(moment)
    return times


# -- every -----------------------------------------------------------------------


def test_every_fires_on_whole_multiples_of_its_interval() -> None:
    schedule = Schedule("refresh", "t", every=60)
    after = dt.datetime(2026, 5, 4, 12, 0, 30, tzinfo=UTC)
    assert schedule.next_run(after) == dt.datetime(2026, 5, 4, 12, 1, tzinfo=UTC)
    assert schedule.next_run(dt.datetime(2026, 5, 4, 12, 1, tzinfo=UTC)) == dt.datetime(
        2026, 5, 4, 12, 2, tzinfo=UTC
    )
    assert schedule.latest_run(after) == dt.datetime(2026, 5, 4, 12, 0, tzinfo=UTC)
    assert schedule.latest_run(dt.datetime(2026, 5, 4, 12, 1, tzinfo=UTC)) == dt.datetime(
        2026, 5, 4, 12, 1, tzinfo=UTC
    )
    assert schedule.description == "every 60s"


def test_every_accepts_a_timedelta_and_any_zone_for_after() -> None:
    # every= is typed float; __post_init__ also takes a timedelta (periodic(), config).
    schedule = Schedule("hourly", "t", every=dt.timedelta(hours=1))  # type: ignore[arg-type]
    assert schedule.every == 3600.0
    after = dt.datetime(2026, 1, 10, 9, 15, tzinfo=PARIS)  # 08:15 UTC
    assert schedule.next_run(after) == dt.datetime(2026, 1, 10, 9, 0, tzinfo=UTC)


# -- cron ------------------------------------------------------------------------


def test_cron_every_minute_fires_at_the_top_of_each_minute() -> None:
    schedule = Schedule("tick", "t", cron="*/1 * * * *")
    start = dt.datetime(2026, 5, 4, 12, 0, 30, tzinfo=UTC)
    times = chain(schedule, start, start + dt.timedelta(minutes=5))
    assert times == [dt.datetime(2026, 5, 4, 12, m, tzinfo=UTC) for m in range(1, 6)]
    assert schedule.description == "cron */1 * * * * (UTC)"


def test_cron_fires_at_wall_clock_time_in_its_zone() -> None:
    schedule = Schedule("nightly", "t", cron="0 3 * * *", timezone="Europe/Paris")
    winter = schedule.next_run(dt.datetime(2026, 1, 10, 12, tzinfo=UTC))
    summer = schedule.next_run(dt.datetime(2026, 7, 10, 12, tzinfo=UTC))
    assert winter == dt.datetime(2026, 1, 11, 3, tzinfo=PARIS)
    assert winter.astimezone(UTC) == dt.datetime(2026, 1, 11, 2, tzinfo=UTC)
    assert summer.astimezone(UTC) == dt.datetime(2026, 7, 11, 1, tzinfo=UTC)
    assert schedule.description == "cron 0 3 * * * (Europe/Paris)"


def test_cron_names_ranges_and_steps() -> None:
    schedule = Schedule("weekdays", "t", cron="15 9-17/4 * jan-feb MON-FRI")
    start = dt.datetime(2026, 2, 27, 0, 0, tzinfo=UTC)  # a Friday
    times = chain(schedule, start, dt.datetime(2026, 3, 3, tzinfo=UTC))
    assert times == [dt.datetime(2026, 2, 27, h, 15, tzinfo=UTC) for h in (9, 13, 17)]


@pytest.mark.parametrize(
    ("macro", "after", "expected"),
    [
        ("@hourly", dt.datetime(2026, 5, 4, 12, 30), dt.datetime(2026, 5, 4, 13, 0)),
        ("@daily", dt.datetime(2026, 5, 4, 12, 30), dt.datetime(2026, 5, 5, 0, 0)),
        ("@midnight", dt.datetime(2026, 5, 4, 12, 30), dt.datetime(2026, 5, 5, 0, 0)),
        ("@weekly", dt.datetime(2026, 5, 4, 12, 30), dt.datetime(2026, 5, 10, 0, 0)),
        ("@monthly", dt.datetime(2026, 5, 4, 12, 30), dt.datetime(2026, 6, 1, 0, 0)),
        ("@yearly", dt.datetime(2026, 5, 4, 12, 30), dt.datetime(2027, 1, 1, 0, 0)),
        ("@annually", dt.datetime(2026, 5, 4, 12, 30), dt.datetime(2027, 1, 1, 0, 0)),
    ],
)
def test_cron_macros(macro: str, after: dt.datetime, expected: dt.datetime) -> None:
    schedule = Schedule("m", "t", cron=macro)
    assert schedule.next_run(after.replace(tzinfo=UTC)) == expected.replace(tzinfo=UTC)


def test_latest_run_includes_a_fire_time_equal_to_until() -> None:
    schedule = Schedule("tick", "t", cron="*/5 * * * *")
    at = dt.datetime(2026, 5, 4, 12, 5, tzinfo=UTC)
    assert schedule.latest_run(at) == at
    assert schedule.latest_run(at - dt.timedelta(microseconds=1)) == at - dt.timedelta(minutes=5)


def test_fire_times_need_an_aware_datetime() -> None:
    with pytest.raises(ValueError, match="aware"):
        Schedule("tick", "t", every=5).next_run(dt.datetime(2026, 5, 4))


# -- daylight saving time --------------------------------------------------------


def test_a_time_skipped_by_spring_forward_fires_once_at_the_transition() -> None:
    schedule = Schedule("nightly", "t", cron="30 2 * * *", timezone="Europe/Paris")
    times = chain(
        schedule,
        dt.datetime(2026, 3, 28, 12, tzinfo=PARIS),
        dt.datetime(2026, 3, 30, 12, tzinfo=PARIS),
    )
    # 02:30 does not exist on 29 March 2026 in Paris: clocks jump from 02:00 to 03:00.
    assert [t.astimezone(UTC) for t in times] == [
        dt.datetime(2026, 3, 29, 1, 0, tzinfo=UTC),
        dt.datetime(2026, 3, 30, 0, 30, tzinfo=UTC),
    ]


def test_a_time_that_occurs_twice_on_fall_back_fires_once() -> None:
    schedule = Schedule("nightly", "t", cron="30 2 * * *", timezone="Europe/Paris")
    times = chain(
        schedule,
        dt.datetime(2026, 10, 24, 12, tzinfo=PARIS),
        dt.datetime(2026, 10, 26, 12, tzinfo=PARIS),
    )
    # 02:30 happens twice on 25 October 2026 in Paris (at +02:00, then at +01:00).
    assert [t.astimezone(UTC) for t in times] == [
        dt.datetime(2026, 10, 25, 0, 30, tzinfo=UTC),
        dt.datetime(2026, 10, 26, 1, 30, tzinfo=UTC),
    ]
    # Asked from inside the repeated hour, the 02:30 already passed is not offered again.
    second_pass = dt.datetime(2026, 10, 25, 1, 15, tzinfo=UTC)
    assert schedule.next_run(second_pass) == times[1]
    assert schedule.latest_run(second_pass) == times[0]


def test_a_cron_by_the_minute_keeps_firing_through_the_repeated_hour() -> None:
    schedule = Schedule("half-hourly", "t", cron="*/30 * * * *", timezone="Europe/Paris")
    start = dt.datetime(2026, 10, 24, 22, 0, tzinfo=UTC)
    times = chain(schedule, start, start + dt.timedelta(hours=6))
    # Every real half hour fires, including both passes through 02:00-03:00 local time.
    assert [t.astimezone(UTC) for t in times] == [
        start + dt.timedelta(minutes=30 * n) for n in range(1, 13)
    ]


# -- what is refused -------------------------------------------------------------

BAD_SCHEDULES: list[tuple[dict[str, Any], str]] = [
    ({"cron": "61 * * * *"}, "minute must be 0-59, got 61"),
    ({"cron": "*/0 * * * *"}, "minute must be 0-59, got */0"),
    ({"cron": "0 25 * * *"}, "hour must be 0-23, got 25"),
    ({"cron": "0 0 32 * *"}, "day-of-month must be 1-31, got 32"),
    ({"cron": "0 0 * 13 *"}, "month must be 1-12 or jan-dec, got 13"),
    ({"cron": "0 0 * * 8"}, "day-of-week must be 0-7 or sun-sat (0 and 7 are Sunday), got 8"),
    ({"cron": "* * *"}, "five"),
    ({"cron": "* * * * * *"}, "five"),
    ({"cron": ""}, "empty"),
    ({"cron": "   "}, "empty"),
    ({"cron": "@fortnightly"}, "unknown cron macro '@fortnightly'"),
    ({"cron": "0 0 30 2 *"}, "can never fire"),
    ({"cron": "0 0 31 4,6 *"}, "can never fire"),
    ({"cron": 5}, "cron must be a string"),
    ({"cron": "0 3 * * *", "timezone": "Mars/Olympus_Mons"}, "unknown time zone"),
    ({"cron": "0 3 * * *", "timezone": "../../etc/passwd"}, "unknown time zone"),
    ({"every": 60, "cron": "* * * * *"}, "exactly one of every"),
    ({}, "exactly one of every"),
    ({"every": 0}, "positive"),
    ({"every": -5}, "positive"),
    ({"every": dt.timedelta(0)}, "positive"),
    ({"every": "60"}, "positive"),
    ({"every": True}, "positive"),
    ({"every": float("inf")}, "finite"),
    ({"every": 60, "timezone": "Europe/Paris"}, "timezone= applies to cron"),
    ({"every": 60, "max_running": 2}, "max_running must be 1"),
    ({"every": 60, "catch_up": "no"}, "catch_up must be True or False"),
    ({"every": 60, "args": "abc"}, "args must be a list or tuple"),
]


@pytest.mark.parametrize(("definition", "reason"), BAD_SCHEDULES)
def test_a_bad_periodic_decorator_raises_value_error_naming_the_schedule(
    make_app: MakeApp, definition: dict[str, Any], reason: str
) -> None:
    _, errands = make_app()
    with pytest.raises(ValueError, match=r"schedule 'nightly'") as info:

        @errands.periodic(name="nightly", **definition)
        def nightly() -> None: ...

    assert reason in str(info.value)
    assert isinstance(info.value, ConfigurationError)
    assert errands.schedules == {}
    assert not any(name.endswith("nightly") for name in errands.tasks)


def test_schedule_args_must_fit_the_function(make_app: MakeApp) -> None:
    _, errands = make_app()
    with pytest.raises(ValueError, match=r"schedule 'report'.*args/kwargs do not fit"):

        @errands.periodic(every=60, name="report", args=(1, 2))
        def report(days: int) -> None: ...

    with pytest.raises(ValueError, match=r"schedule 'report'.*JSON"):

        @errands.periodic(every=60, name="report", args=(object(),))
        def report2(days: object) -> None: ...


def test_unnamed_schedule_is_named_after_its_task_in_errors(make_app: MakeApp) -> None:
    _, errands = make_app()
    with pytest.raises(ValueError, match=r"schedule '.*\.refresh'"):

        @errands.periodic(every=-1)
        def refresh() -> None: ...


# -- the decorator ---------------------------------------------------------------


def test_periodic_registers_a_task_that_can_also_be_delayed(make_app: MakeApp) -> None:
    app, errands = make_app(ERRANDS_EMBEDDED_WORKER=False)

    @errands.periodic(every=60, queue="maintenance", priority=3, args=(7,))
    def prune(days: int) -> int:
        return days * 2

    schedule = errands.schedules[prune.name]
    assert (schedule.name, schedule.task, schedule.args) == (prune.name, prune.name, (7,))
    assert errands.tasks[prune.name] is prune
    with app.app_context():
        job = prune.delay(5)
        assert job.queue == "maintenance" and job.priority == 3
        assert errands.drain() == 1
        assert job.result(timeout=5) == 10


def test_periodic_on_a_declared_task_keeps_its_options(make_app: MakeApp) -> None:
    _, errands = make_app()

    @errands.periodic(cron="@daily", name="daily-report")
    @errands.task(retries=2, name="reports.daily")
    def report() -> None: ...

    assert report.name == "reports.daily"
    assert report.default_options.retries == 2
    assert errands.schedules["daily-report"].task == "reports.daily"


def test_a_schedule_name_cannot_be_taken_twice(make_app: MakeApp) -> None:
    _, errands = make_app()

    @errands.periodic(every=60, name="sync")
    def sync_a() -> None: ...

    with pytest.raises(ValueError, match="schedule 'sync' is already registered"):

        @errands.periodic(every=30, name="sync")
        def sync_b() -> None: ...


# -- ERRANDS_SCHEDULE --------------------------------------------------------------


def test_config_schedules_are_validated_and_their_functions_registered(
    make_app: MakeApp,
) -> None:
    app, errands = make_app(
        ERRANDS_EMBEDDED_WORKER=False,
        ERRANDS_SCHEDULE=[
            {"name": "cleanup", "task": "tests.test_schedules:cleanup", "every": 60},
            {
                "name": "report",
                "task": "tests.test_schedules:cleanup",
                "cron": "0 3 * * *",
                "timezone": "Europe/Paris",
                "args": [7],
                "queue": "reports",
                "priority": 5,
            },
        ],
    )

    @errands.periodic(every=5)
    def heartbeat() -> None: ...

    state = app.extensions["errands"]
    assert sorted(state.schedules) == sorted(["cleanup", heartbeat.name, "report"])
    report = state.schedules["report"]
    assert report.task == "tests.test_schedules.cleanup"
    assert (report.args, report.options) == ((7,), {"queue": "reports", "priority": 5})
    assert report.description == "cron 0 3 * * * (Europe/Paris)"
    assert errands.tasks["tests.test_schedules.cleanup"].func is cleanup
    with app.app_context():
        job = errands.tasks["tests.test_schedules.cleanup"].delay(3)
        errands.drain()
        assert job.result(timeout=5) == 3


BAD_ENTRIES: list[tuple[Any, str]] = [
    ({"name": "x", "task": "tests.no_such_module:cleanup", "every": 60}, "does not import"),
    ({"name": "x", "task": "tests.test_schedules:missing", "every": 60}, "does not import"),
    ({"name": "x", "task": "cleanup", "every": 60}, "'package.module:function'"),
    ({"name": "x", "task": "tests.test_schedules:not_a_function", "every": 60}, "not a function"),
    ({"name": "x", "every": 60}, "'task' must name a function"),
    (
        {"name": "x", "task": "tests.test_schedules:cleanup", "cron": "61 * * * *"},
        "minute must be 0-59, got 61",
    ),
    ({"name": "x", "task": "tests.test_schedules:cleanup"}, "exactly one of every"),
    ({"name": "x", "task": "tests.test_schedules:cleanup", "every": 0}, "positive"),
    (
        {"name": "x", "task": "tests.test_schedules:cleanup", "cron": "@daily", "timezone": "X/Y"},
        "unknown time zone",
    ),
    ({"name": "x", "task": "tests.test_schedules:cleanup", "every": 6, "crontab": 1}, "'crontab'"),
    ({"name": "x", "task": "tests.test_schedules:cleanup", "every": 6, "args": [1, 2]}, "fit"),
    ({"name": "x", "task": "tests.test_schedules:cleanup", "every": 6, "queue": ""}, "queue"),
]


@pytest.mark.parametrize(("entry", "reason"), BAD_ENTRIES)
def test_a_bad_config_entry_fails_init_app_naming_it(
    tmp_path: object, entry: dict[str, Any], reason: str
) -> None:
    app = Flask("bad_config", instance_path=str(tmp_path))
    app.config.update(ERRANDS_URL="memory://", ERRANDS_SCHEDULE=[entry])
    errands = Errands()
    with pytest.raises(ValueError, match=r"schedule 'x'") as info:
        errands.init_app(app)
    assert reason in str(info.value)
    assert "errands" not in app.extensions


def test_a_config_entry_that_is_not_a_dict_is_reported_by_position(tmp_path: object) -> None:
    app = Flask("bad_config", instance_path=str(tmp_path))
    app.config.update(ERRANDS_URL="memory://", ERRANDS_SCHEDULE=[("cleanup", 60)])
    with pytest.raises(ValueError, match=r"ERRANDS_SCHEDULE\[0\] must be a dict"):
        Errands(app)


def test_two_config_entries_cannot_share_a_name(tmp_path: object) -> None:
    entry = {"name": "dup", "task": "tests.test_schedules:cleanup", "every": 60}
    app = Flask("bad_config", instance_path=str(tmp_path))
    app.config.update(ERRANDS_URL="memory://", ERRANDS_SCHEDULE=[entry, entry])
    with pytest.raises(ValueError, match=r"schedule 'dup'.*another ERRANDS_SCHEDULE entry"):
        Errands(app)


def test_a_config_entry_cannot_reuse_the_name_of_a_code_schedule(tmp_path: object) -> None:
    errands = Errands()

    @errands.periodic(every=60, name="cleanup")
    def cleanup_now() -> None: ...

    app = Flask("bad_config", instance_path=str(tmp_path))
    app.config.update(
        ERRANDS_URL="memory://",
        ERRANDS_SCHEDULE=[{"name": "cleanup", "task": "tests.test_schedules:cleanup", "every": 5}],
    )
    with pytest.raises(ValueError, match="'cleanup' is declared both in code and in ERRANDS"):
        errands.init_app(app)
