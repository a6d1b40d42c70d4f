"""The scheduler: each tick fires once, whatever the number of schedulers and processes.

Schedule logic is driven with an injected clock (``Scheduler.tick(now)``);
the acceptance test runs three real worker processes on one store.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import subprocess
import threading
import time
import zoneinfo
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

import flask_errands
from flask_errands import Errands, Job
from flask_errands.admin import Admin
from flask_errands.runtime import Runtime
from flask_errands.scheduler import Scheduler
from tests.helpers import app_command, wait_until

UTC = dt.timezone.utc
PARIS = zoneinfo.ZoneInfo("Europe/Paris")
T0 = dt.datetime(2026, 5, 4, 12, 0, tzinfo=UTC).timestamp()

MakeApp = Callable[..., tuple[Flask, Errands]]


def at(moment: dt.datetime) -> float:
    return moment.timestamp()


def state_of(app: Flask) -> Runtime:
    state = app.extensions["errands"]
    assert isinstance(state, Runtime)
    return state


def jobs_of(app: Flask, task: Any) -> list[Job]:
    """The jobs of ``task`` in the app's backend, in fire-time order."""
    backend = state_of(app).backend
    records = [r for r in backend.list_jobs(limit=1000) if r.task == task.name]
    return [Job(r, backend) for r in sorted(records, key=lambda r: r.eta)]


def fire_times(app: Flask, task: Any) -> list[dt.datetime]:
    return [job.scheduled_for for job in jobs_of(app, task)]


@pytest.fixture
def app_errands(make_app: MakeApp, backend_url: str) -> tuple[Flask, Errands]:
    return make_app(ERRANDS_URL=backend_url, ERRANDS_EMBEDDED_WORKER=False)


# -- when ticks fire -------------------------------------------------------------


def test_a_new_schedule_first_fires_at_its_next_tick_not_a_past_one(
    app_errands: tuple[Flask, Errands],
) -> None:
    app, errands = app_errands

    @errands.periodic(every=60)
    def refresh() -> None: ...

    scheduler = Scheduler(state_of(app))
    assert scheduler.tick(T0 + 30) == []
    assert scheduler.tick(T0 + 59.9) == []
    [fired] = scheduler.tick(T0 + 60.2)
    assert fired.fire_time.timestamp() == T0 + 60
    assert scheduler.tick(T0 + 61) == []
    [job] = jobs_of(app, refresh)
    assert job.id == fired.job_id
    assert job.scheduled_for.timestamp() == T0 + 60
    assert job.status == "queued"


def test_each_tick_fires_once_however_many_schedulers_run(
    app_errands: tuple[Flask, Errands],
) -> None:
    app, errands = app_errands

    @errands.periodic(every=60)
    def refresh() -> None: ...

    schedulers = [Scheduler(state_of(app)) for _ in range(3)]
    won = []
    for step in range(1, 5 * 60 + 8, 7):
        for n, scheduler in enumerate(schedulers):
            won += scheduler.tick(T0 + step + n * 0.5)
    expected = [dt.datetime.fromtimestamp(T0 + 60 * m, UTC) for m in range(1, 6)]
    assert fire_times(app, refresh) == expected
    assert sorted(f.fire_time for f in won) == expected
    assert sum(s.ticks_fired for s in schedulers) == 5


def test_schedulers_racing_for_the_same_tick_enqueue_one_job(
    app_errands: tuple[Flask, Errands],
) -> None:
    app, errands = app_errands

    @errands.periodic(every=60)
    def refresh() -> None: ...

    schedulers = [Scheduler(state_of(app)) for _ in range(3)]
    for scheduler in schedulers:
        scheduler.tick(T0 - 1)
    barrier = threading.Barrier(len(schedulers))
    rounds = 20

    def race(scheduler: Scheduler) -> None:
        for n in range(rounds):
            barrier.wait()
            scheduler.tick(T0 + 60 * n)

    threads = [threading.Thread(target=race, args=(s,)) for s in schedulers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    expected = [dt.datetime.fromtimestamp(T0 + 60 * n, UTC) for n in range(rounds)]
    assert fire_times(app, refresh) == expected
    assert sum(s.ticks_fired for s in schedulers) == rounds


def test_missed_ticks_fire_once_on_restart(app_errands: tuple[Flask, Errands]) -> None:
    app, errands = app_errands

    @errands.periodic(every=60)
    def refresh() -> None: ...

    before = Scheduler(state_of(app))
    before.tick(T0)
    before.tick(T0 + 60)
    # Nothing ran for an hour; a scheduler starting now fires one tick, the latest.
    after = Scheduler(state_of(app))
    [fired] = after.tick(T0 + 3630)
    assert fired.fire_time.timestamp() == T0 + 3600
    assert after.tick(T0 + 3640) == []
    assert [t.timestamp() for t in fire_times(app, refresh)] == [T0, T0 + 60, T0 + 3600]


def test_catch_up_false_skips_missed_ticks(app_errands: tuple[Flask, Errands]) -> None:
    app, errands = app_errands

    @errands.periodic(every=60, catch_up=False)
    def refresh() -> None: ...

    before = Scheduler(state_of(app))
    before.tick(T0)
    after = Scheduler(state_of(app))
    assert after.tick(T0 + 3630) == []
    [fired] = after.tick(T0 + 3660)
    assert fired.fire_time.timestamp() == T0 + 3660
    assert [t.timestamp() for t in fire_times(app, refresh)] == [T0, T0 + 3660]


def test_max_running_skips_a_tick_while_the_previous_run_is_live(
    app_errands: tuple[Flask, Errands], caplog: pytest.LogCaptureFixture
) -> None:
    app, errands = app_errands

    @errands.periodic(every=60, name="slow-sync", max_running=1)
    def sync() -> None: ...

    @errands.periodic(every=60, name="quick-sync")
    def unlimited() -> None: ...

    scheduler = Scheduler(state_of(app))
    scheduler.tick(T0)
    with caplog.at_level(logging.INFO, logger="flask_errands"):
        fired = {f.schedule: f for f in scheduler.tick(T0 + 60)}
    assert fired["slow-sync"].job_id is None
    assert len(jobs_of(app, sync)) == 1
    assert len(jobs_of(app, unlimited)) == 2  # no limit: the second run is queued behind
    skipped = [r for r in caplog.records if "slow-sync" in r.getMessage()]
    assert len(skipped) == 1 and skipped[0].levelno == logging.WARNING
    assert "skipped" in skipped[0].getMessage() and "max_running" in skipped[0].getMessage()

    with app.app_context():
        assert errands.drain() == 3
    [fired_again] = [f for f in scheduler.tick(T0 + 120) if f.schedule == "slow-sync"]
    assert fired_again.job_id is not None
    assert [j.status for j in jobs_of(app, sync)] == ["succeeded", "queued"]


def test_cron_every_minute_fires_at_the_top_of_each_minute(
    app_errands: tuple[Flask, Errands],
) -> None:
    app, errands = app_errands

    @errands.periodic(cron="*/1 * * * *")
    def minutely() -> None: ...

    scheduler = Scheduler(state_of(app))
    for step in range(5, 5 * 60 + 6, 10):
        scheduler.tick(T0 + step)
    assert fire_times(app, minutely) == [
        dt.datetime.fromtimestamp(T0 + 60 * m, UTC) for m in range(1, 6)
    ]


@pytest.mark.parametrize(
    ("day", "expected_utc"),
    [
        # Spring forward: 02:30 does not exist; it fires once, at 03:00 (01:00 UTC).
        (dt.date(2026, 3, 29), dt.datetime(2026, 3, 29, 1, 0, tzinfo=UTC)),
        # Fall back: 02:30 happens twice; it fires once, at the first (00:30 UTC).
        (dt.date(2026, 10, 25), dt.datetime(2026, 10, 25, 0, 30, tzinfo=UTC)),
    ],
)
def test_a_daily_cron_fires_exactly_once_on_dst_change_days(
    make_app: MakeApp, day: dt.date, expected_utc: dt.datetime
) -> None:
    app, errands = make_app(ERRANDS_EMBEDDED_WORKER=False)

    @errands.periodic(cron="30 2 * * *", timezone="Europe/Paris")
    def nightly() -> None: ...

    scheduler = Scheduler(state_of(app))
    start = dt.datetime.combine(day - dt.timedelta(days=1), dt.time(12), PARIS)
    moment = at(start)
    while moment <= at(start + dt.timedelta(days=2)):
        scheduler.tick(moment)
        moment += 300
    times = fire_times(app, nightly)
    on_the_day = [t for t in times if t.astimezone(PARIS).date() == day]
    assert on_the_day == [expected_utc]
    assert len(times) == 2  # the day itself and the next one, nothing more


def test_a_config_schedule_enqueues_its_args_queue_and_priority(
    make_app: MakeApp, backend_url: str
) -> None:
    app, errands = make_app(
        ERRANDS_URL=backend_url,
        ERRANDS_EMBEDDED_WORKER=False,
        ERRANDS_SCHEDULE=[
            {
                "name": "cleanup",
                "task": "tests.test_schedules:cleanup",
                "every": 3600,
                "args": [14],
                "queue": "maintenance",
                "priority": 4,
            }
        ],
    )
    scheduler = Scheduler(state_of(app))
    scheduler.tick(T0)
    task = errands.tasks["tests.test_schedules.cleanup"]
    [job] = jobs_of(app, task)
    assert (job.args, job.queue, job.priority) == ((14,), "maintenance", 4)
    with app.app_context():
        assert errands.drain("maintenance") == 1
    assert job.result(timeout=5) == 14


# -- what `flask errands schedules` shows ---------------------------------------


def test_admin_schedules_show_next_run_and_last_outcome(
    app_errands: tuple[Flask, Errands],
) -> None:
    app, errands = app_errands

    @errands.periodic(every=60, name="refresh")
    def refresh() -> None: ...

    @errands.periodic(cron="0 3 * * *", timezone="Europe/Paris", name="nightly")
    def nightly() -> None:
        raise RuntimeError("disk full")

    state = state_of(app)
    before = {info.name: info for info in Admin(state).schedules(T0 + 1)}
    assert list(before) == ["nightly", "refresh"]
    assert before["refresh"].description == "every 60s"
    assert before["refresh"].next_run_utc == dt.datetime.fromtimestamp(T0 + 60, UTC)
    assert before["nightly"].description == "cron 0 3 * * * (Europe/Paris)"
    assert before["nightly"].next_run == dt.datetime(2026, 5, 5, 3, 0, tzinfo=PARIS)
    assert before["nightly"].next_run.utcoffset() == dt.timedelta(hours=2)
    assert before["nightly"].next_run_utc == dt.datetime(2026, 5, 5, 1, 0, tzinfo=UTC)
    assert before["nightly"].last_run is None and before["nightly"].last_status is None

    scheduler = Scheduler(state)
    scheduler.tick(T0)
    scheduler.tick(at(dt.datetime(2026, 5, 5, 3, 0, 1, tzinfo=PARIS)))
    with app.app_context():
        errands.drain()
    after = {info.name: info for info in Admin(state).schedules(T0 + 86400)}
    assert after["nightly"].last_run == dt.datetime(2026, 5, 5, 3, 0, tzinfo=PARIS)
    assert after["nightly"].last_status == "failed"
    assert after["refresh"].last_status == "succeeded"
    listed = after["nightly"].to_dict()
    assert listed["last_status"] == "failed"
    assert listed["next_run"] == "2026-05-06T03:00:00+02:00"
    assert listed["next_run_utc"] == "2026-05-06T01:00:00+00:00"


# -- in a real worker ------------------------------------------------------------


def test_the_worker_fires_periodic_jobs_and_stops_with_them(
    make_app: MakeApp, tmp_path: Path
) -> None:
    app, errands = make_app(ERRANDS_URL=f"sqlite:///{tmp_path}/jobs.db")

    @errands.periodic(every=1)
    def heartbeat() -> str:
        return "alive"

    with app.app_context():
        errands.start_worker()
        wait_until(
            lambda: sum(j.status == "succeeded" for j in jobs_of(app, heartbeat)) >= 2,
            "two heartbeats to succeed",
        )
        errands.stop_worker(grace=5)
    assert state_of(app).scheduler is None
    assert all(
        j.result(timeout=0) == "alive" for j in jobs_of(app, heartbeat) if j.status.finished
    )


def test_errands_scheduler_false_keeps_the_worker_from_firing_ticks(
    make_app: MakeApp, tmp_path: Path
) -> None:
    app, errands = make_app(ERRANDS_URL=f"sqlite:///{tmp_path}/jobs.db", ERRANDS_SCHEDULER=False)

    @errands.periodic(every=1)
    def heartbeat() -> None: ...

    @errands.task
    def ping() -> str:
        return "pong"

    started = time.time()
    with app.app_context():
        errands.start_worker()
        assert ping.delay().result(timeout=20) == "pong"
        # Let at least two whole-second ticks pass with the worker running.
        time.sleep(max(0.0, started + 2.2 - time.time()))
        errands.stop_worker(grace=5)
    assert jobs_of(app, heartbeat) == []
    assert state_of(app).backend.last_ticks() == {}


def test_three_worker_processes_fire_each_tick_once(
    shared_backend_url: str, tmp_path: Path
) -> None:
    package_root = str(Path(flask_errands.__file__).resolve().parent.parent)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")]),
    }
    children = [
        subprocess.Popen(
            app_command("ticker", shared_backend_url, str(tmp_path)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(3)
    ]
    try:
        for child in children:
            assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        begin = time.time() + 0.5
        end = begin + 5
        for child in children:  # all three start together: communicate() waits for each
            assert child.stdin is not None
            child.stdin.write(f"{begin} {end}\n")
            child.stdin.flush()
        outputs = [child.communicate(timeout=60)[0] for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    assert [child.returncode for child in children] == [0, 0, 0]
    reports = [json.loads(out.strip().splitlines()[-1]) for out in outputs]
    assert all(report["running"] for report in reports)  # three schedulers ran to the end
    won = [report["won"] for report in reports]

    from flask_errands.backends import backend_from_url

    backend = backend_from_url(shared_backend_url, instance_path=str(tmp_path))
    try:
        jobs = [r for r in backend.list_jobs(limit=1000) if r.task == "__main__.tick"]
        ticks = backend.last_ticks()
    finally:
        backend.close()
    fired_at = sorted(r.eta for r in jobs)
    assert len(set(fired_at)) == len(fired_at), "two jobs for the same tick"
    assert 4 <= len(jobs) <= 6
    assert all(begin <= t <= end and t == int(t) for t in fired_at)
    assert sum(won) == len(jobs)  # every tick was won by exactly one of the three schedulers
    assert ticks["ticker"][0] == fired_at[-1]
    assert sum(r.status == "succeeded" for r in jobs) >= 4


# -- changed at run time, seen everywhere -------------------------------------------


def test_a_paused_or_changed_schedule_is_seen_by_another_process_scheduler(
    make_app: MakeApp, shared_backend_url: str
) -> None:
    """The admin of one app and the scheduler of another share only the store."""

    def app_with_schedule() -> tuple[Flask, Errands, Any]:
        app, errands = make_app(ERRANDS_URL=shared_backend_url, ERRANDS_EMBEDDED_WORKER=False)

        @errands.periodic(every=60, name="refresh")
        def refresh() -> None: ...

        return app, errands, refresh

    web, _, _ = app_with_schedule()
    worker, _, refresh = app_with_schedule()
    admin = Admin(state_of(web), clock=lambda: now)
    scheduler = Scheduler(state_of(worker))
    now = T0
    scheduler.tick(T0 - 1)

    admin.pause_schedule("refresh")
    assert scheduler.tick(T0 + 60) == [] and scheduler.tick(T0 + 185) == []
    now = T0 + 190
    admin.resume_schedule("refresh")
    assert scheduler.tick(T0 + 191) == []  # the ticks missed while paused never fire
    [fired] = scheduler.tick(T0 + 240)
    assert fired.fire_time == dt.datetime.fromtimestamp(T0 + 240, UTC)

    now = T0 + 250
    info = admin.change_schedule("refresh", every=300)
    assert info.next_run_utc == dt.datetime.fromtimestamp(T0 + 300, UTC)
    assert scheduler.tick(T0 + 260) == []
    assert [f.fire_time.timestamp() for f in scheduler.tick(T0 + 301)] == [T0 + 300]
    assert scheduler.tick(T0 + 360) == [] and scheduler.seconds_to_next_tick(T0 + 360) == 30.0

    # A scheduler started afterwards (a restart) keeps the change: it is in the store.
    restarted, _, _ = app_with_schedule()
    later = Scheduler(state_of(restarted))
    later.tick(T0 + 550)
    assert [f.fire_time.timestamp() for f in later.tick(T0 + 600)] == [T0 + 600]
    assert scheduler.tick(T0 + 601) == []  # once per tick, whichever scheduler
    assert [j.scheduled_for.timestamp() for j in jobs_of(worker, refresh)] == [
        T0 + 240,
        T0 + 300,
        T0 + 600,
    ]


def test_run_now_enqueues_once_through_the_tick_path_and_keeps_the_next_tick(
    app_errands: tuple[Flask, Errands],
) -> None:
    app, errands = app_errands

    @errands.periodic(every=60, name="refresh", max_running=1)
    def refresh() -> None: ...

    now = T0 + 10
    admin = Admin(state_of(app), clock=lambda: now)
    scheduler = Scheduler(state_of(app))
    scheduler.tick(T0 - 1)
    job = admin.run_schedule("refresh")
    assert job.scheduled_for.timestamp() == T0 + 10 and job.status == "queued"
    assert admin.schedule("refresh").last_run == dt.datetime.fromtimestamp(T0 + 10, UTC)
    now = T0 + 11
    with pytest.raises(ValueError, match="max_running=1"):
        admin.run_schedule("refresh")
    with app.app_context():
        assert errands.drain() == 1
    assert [f.fire_time.timestamp() for f in scheduler.tick(T0 + 60)] == [T0 + 60]
