"""Workflows through the public API: chain, group, chord, nesting, failure and re-runs."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from flask import Flask

from flask_errands import (
    Errands,
    GroupResult,
    JobCancelled,
    JobFailed,
    JobStatus,
    WorkflowJob,
    chain,
    chord,
    current_job,
    group,
)
from tests.apps import worker_app
from tests.helpers import wait_until
from tests.processes import client_of
from tests.test_cli import WorkerProcess

MakeApp = Callable[..., tuple[Flask, Errands]]


class Steps:
    """Tasks for workflows, registered on one app, that write down what ran."""

    def __init__(self, errands: Errands) -> None:
        self.ran: list[str] = []
        self.fail_once: set[str] = set()
        ran, fail_once = self.ran, self.fail_once

        @errands.task
        def add(x: int, y: int) -> int:
            ran.append(f"add {x} {y}")
            return x + y

        @errands.task
        def total(values: list[int], extra: int = 0) -> int:
            ran.append(f"total {values}")
            return sum(values) + extra

        @errands.task
        def flaky(x: int) -> int:
            ran.append(f"flaky {x}")
            if "flaky" in fail_once:
                fail_once.discard("flaky")
                raise ValueError("not this time")
            return x * 10

        self.add, self.total, self.flaky = add, total, flaky


def on_store(make_app: MakeApp, url: str) -> tuple[Flask, Errands, Steps]:
    """An app on store ``url`` whose jobs run only when the test drains them, with its steps."""
    app, errands = make_app(ERRANDS_URL=url, ERRANDS_EMBEDDED_WORKER=False)
    return app, errands, Steps(errands)


def test_chain_group_chord_and_nesting_pass_results_through(
    backend_url: str, make_app: MakeApp
) -> None:
    app, errands, s = on_store(make_app, backend_url)
    with app.app_context():
        chained = chain(s.add.s(1, 2), s.add.s(10), s.add.s(100)).delay()
        grouped = group(s.add.s(1, 1), chain(s.add.s(2, 2), s.add.s(1))).delay()
        chorded = chord((s.add.s(i, i) for i in range(5)), s.total.s(extra=1000)).delay()
        nested = chain(
            s.add.s(1, 1),
            group(s.add.s(1), chord([s.add.s(2), s.add.s(3)], s.total.s())),
            s.total.s(),
        ).delay()
        empty = chord([], s.total.s()).delay()
        chain_in_group = chain(
            s.add.s(1, 1), group(chain(s.add.s(1), s.add.s(10)), s.add.s(2)), s.total.s()
        ).delay()
        chains_side_by_side = group(
            chain(s.add.s(1, 1), s.add.s(1)), chord([s.add.s(1, 2), s.add.s(3, 4)], s.total.s())
        ).delay()
        errands.drain()
        assert chained.result(timeout=5) == 113
        assert isinstance(grouped, GroupResult)
        assert grouped.results(timeout=5) == [2, 5]
        assert grouped.status == JobStatus.SUCCEEDED
        assert chorded.result(timeout=5) == 1020
        assert nested.result(timeout=5) == 3 + (4 + 5)
        assert empty.result(timeout=5) == 0
        assert chain_in_group.result(timeout=5) == (2 + 1 + 10) + (2 + 2)
        assert chains_side_by_side.results(timeout=5) == [3, 3 + 7]


def test_every_step_is_stored_and_visible_when_delay_returns(
    backend_url: str, make_app: MakeApp
) -> None:
    app, errands, s = on_store(make_app, backend_url)
    with app.app_context():
        flow = chain(s.add.s(1, 2), group(s.add.s(1), s.add.s(2)), s.total.s()).delay()
        assert isinstance(flow, WorkflowJob)
        assert [step.status for step in flow.steps] == ["queued", "blocked", "blocked", "blocked"]
        assert errands.admin.counts()["default"][JobStatus.BLOCKED] == 3
        assert s.ran == []
        assert flow.refresh().status == JobStatus.BLOCKED


def test_workflows_run_on_the_worker(backend_url: str, make_app: MakeApp) -> None:
    app, errands, s = on_store(make_app, backend_url)
    with app.app_context():
        errands.start_worker()
        flow = chord([chain(s.add.s(i, 0), s.add.s(1)) for i in range(20)], s.total.s()).delay()
        assert flow.result(timeout=30) == sum(range(20)) + 20


def test_a_failing_middle_step_cancels_what_follows_and_a_re_run_resumes(
    backend_url: str, make_app: MakeApp
) -> None:
    app, errands, s = on_store(make_app, backend_url)
    s.fail_once.add("flaky")
    with app.app_context():
        flow = chain(s.add.s(1, 1), s.flaky.s(), s.add.s(5), s.add.s(6)).delay()
        errands.drain()
        first, middle, *after = flow.steps
        assert [step.refresh().status for step in flow.steps] == [
            "succeeded",
            "failed",
            "cancelled",
            "cancelled",
        ]
        for step in after:
            assert step.error == (
                f"UpstreamFailed: upstream step {middle.id} ({s.flaky.name}) failed; "
                "this step never ran"
            )
        with pytest.raises(JobCancelled):
            flow.result(timeout=5)
        assert s.ran == ["add 1 1", "flaky 2"]
        errands.admin.retry(middle.id)
        assert [step.refresh().status for step in after] == ["blocked", "blocked"]
        errands.drain()
        assert flow.refresh().result(timeout=5) == 20 + 5 + 6
        assert s.ran == ["add 1 1", "flaky 2", "flaky 2", "add 20 5", "add 25 6"]
        assert first.refresh().attempts == 1


def test_group_results_raise_for_the_first_failed_job(make_app: MakeApp) -> None:
    app, errands = make_app(ERRANDS_EMBEDDED_WORKER=False)
    s = Steps(errands)
    s.fail_once.add("flaky")

    @errands.task
    def refuse(why: str) -> None:
        raise ValueError(why)

    with app.app_context():
        grouped = group(s.add.s(1, 1), s.flaky.s(3), s.add.s(2, 2)).delay()
        errands.drain()
        with pytest.raises(JobFailed) as failed:
            grouped.results(timeout=5)
        assert failed.value.exc_type == "ValueError"
        assert grouped.status == JobStatus.FAILED
        # The first in order, not in time: the second job failed before the first did.
        late = refuse.options(queue="later")
        grouped = group(s.add.s(1, 1), late.s("first"), refuse.s("second")).delay()
        assert errands.drain(queues=["default"]) == 2
        with pytest.raises(TimeoutError):
            grouped.results(timeout=0.05)
        assert errands.drain(queues=["later"]) == 1
        with pytest.raises(JobFailed, match="first"):
            grouped.results(timeout=5)


def test_cancelling_the_handle_cancels_every_unfinished_step(
    backend_url: str, make_app: MakeApp
) -> None:
    app, errands, s = on_store(make_app, backend_url)
    with app.app_context():
        flow = chain(s.add.s(1, 1), group(s.add.s(1), s.add.s(2)), s.total.s()).delay()
        errands.drain(queues=["nothing"])
        flow.cancel()
        assert {step.refresh().status for step in flow.steps} == {JobStatus.CANCELLED}
        assert errands.drain() == 0
        assert s.ran == []


def test_cancelling_a_group_cancels_its_unfinished_steps_and_stops_a_running_one(
    make_app: MakeApp,
) -> None:
    app, errands = make_app(ERRANDS_QUEUES="default", ERRANDS_EMBEDDED_WORKER=False)
    s = Steps(errands)
    started = threading.Event()

    @errands.task
    def slow() -> int:
        started.set()
        while not current_job.cancel_requested:
            time.sleep(0.01)
        return 0

    with app.app_context():
        grouped = group(slow.s(), chain(s.add.s(1, 1).options(queue="later"), s.add.s(1))).delay()
        errands.start_worker()
        assert started.wait(10)
        grouped.cancel()
        with pytest.raises(JobCancelled):
            grouped.results(timeout=10)
        assert [step.refresh().status for step in grouped.steps] == ["cancelled"] * 3
        assert grouped.status == JobStatus.CANCELLED
        assert s.ran == []


def test_eager_mode_runs_workflows_to_completion(make_app: MakeApp) -> None:
    app, errands = make_app(ERRANDS_EAGER=True)
    s = Steps(errands)
    s.fail_once.add("flaky")
    with app.app_context():
        flow = chain(s.add.s(1, 2), chord([s.add.s(1), s.add.s(2)], s.total.s())).delay()
        assert flow.result(timeout=0) == 4 + 5
        failing = chain(s.add.s(1, 1), s.flaky.s(), s.add.s(1)).delay()
        with pytest.raises(JobCancelled):
            failing.result(timeout=0)
        assert [step.refresh().status for step in failing.steps] == [
            "succeeded",
            "failed",
            "cancelled",
        ]


@pytest.mark.parametrize("mode", ["eager", "drain", "worker"])
def test_async_steps_run_inside_workflows(mode: str, make_app: MakeApp) -> None:
    app, errands = make_app(ERRANDS_EAGER=mode == "eager", ERRANDS_EMBEDDED_WORKER=False)
    s = Steps(errands)

    @errands.task
    async def double(x: int) -> int:
        await asyncio.sleep(0.01)
        return 2 * x

    with app.app_context():
        if mode == "worker":
            errands.start_worker()
        flow = chain(s.add.s(1, 2), double.s(), group(double.s(), s.add.s(1)), s.total.s())
        handle = flow.delay()
        if mode == "drain":
            assert errands.drain() == 5
        assert handle.result(timeout=30) == 12 + 7


def test_steps_keep_their_options_and_check_their_arguments(make_app: MakeApp) -> None:
    app, errands = make_app(ERRANDS_EMBEDDED_WORKER=False)
    s = Steps(errands)
    with app.app_context():
        flow = chain(
            s.add.s(1, 1).options(timeout=5),
            s.add.options(queue="later").s(1),
            s.add.s(1).options(queue="later", priority=5),
        ).delay()
        assert isinstance(flow, WorkflowJob)
        first, second, _ = flow.steps
        assert first.refresh()._record.timeout == 5
        assert second.queue == "later"
        assert (flow.queue, flow.priority) == ("later", 5)
        assert errands.drain(queues=["default"]) == 1
        assert errands.drain(queues=["later"]) == 2
        assert flow.result(timeout=5) == 4
        with pytest.raises(TypeError, match=r"add\.delay"):
            chain(s.add.s(1, 1), s.add.s(1, 2)).delay()
        with pytest.raises(ValueError, match="unique_key"):
            chain(s.add.s(1, 1).options(unique_key="k")).delay()
        other = Errands(Flask("other"))
        with pytest.raises(ValueError, match="same Errands"):
            chain(s.add.s(1, 1), Steps(other).add.s(1)).delay()


# -- real worker processes, some killed ------------------------------------------


def _children(pid: int) -> list[int]:
    """The worker processes a ``--processes`` supervisor forked (from any of its threads)."""
    found = []
    for thread in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (thread / "children").read_text().split()]
    return found


def test_a_chord_callback_runs_once_with_every_result_while_workers_are_killed(
    shared_backend_url: str, tmp_path: Path
) -> None:
    runs = tmp_path / "callback.jsonl"
    worker = WorkerProcess(shared_backend_url, tmp_path, ERRANDS_MAX_LOST_LEASES=1000)
    proc = worker.start("--processes", "4", "-c", "2")
    killed = 0
    try:
        with (
            client_of(worker_app.errands, shared_backend_url, tmp_path) as client,
            client.app_context(),
        ):
            wait_until(lambda: len(_children(proc.pid)) == 4, "the worker processes")
            header = [worker_app.echo.s(i, 0.2) for i in range(200)]
            flow = chord(header, worker_app.gather.s(str(runs))).delay()
            deadline = time.monotonic() + 60
            while flow.refresh().status != "succeeded" and time.monotonic() < deadline:
                children = _children(proc.pid)
                if children:
                    os.kill(random.choice(children), signal.SIGKILL)
                    killed += 1
                time.sleep(1.0)
            assert flow.result(timeout=0) == 200
            steps = [step.refresh() for step in flow.steps]
            assert all(step.status == "succeeded" for step in steps)
        lines = [json.loads(line) for line in runs.read_text().splitlines()]
        assert [line["values"] for line in lines] == [list(range(200))]
        assert killed >= 2
        assert sum(step.attempts > 1 for step in steps) > 0  # kills did hit running steps
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
