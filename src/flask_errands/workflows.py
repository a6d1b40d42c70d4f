"""Workflows: ``chain``, ``group`` and ``chord`` of task signatures (``task.s(...)``).

A workflow is enqueued whole, in one atomic store call: every step is stored
when ``.delay()`` returns, those waiting for upstream steps as ``blocked``.
Each step's record carries its links (:class:`~flask_errands.backends.base.Flow`):
the steps it feeds, and how many inputs it takes. The store moves the
workflow on as each step finishes, in the same atomic step as the outcome
(see ``Backend.finish``), so nothing here runs after ``.delay()``: any worker
can die at any point and the workflow still goes on, exactly once.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from typing import Any

from .backends.base import BLOCKED, Flow, JobRecord
from .jobs import Job
from .status import FINISHED, JobStatus
from .tasks import Enqueuer, Signature

__all__ = [
    "Chain",
    "Chord",
    "Group",
    "GroupResult",
    "WorkflowJob",
    "chain",
    "chord",
    "group",
]

#: The ids a placed part of a workflow ends with, and whether they form a list (a group).
_Output = tuple[list[str], bool]


@dataclasses.dataclass
class _Plan:
    """The records of a workflow being built, and the links between them."""

    now: float
    records: list[JobRecord] = dataclasses.field(default_factory=list)
    links: dict[str, list[tuple[str, int]]] = dataclasses.field(default_factory=dict)
    inputs: dict[str, tuple[int, bool]] = dataclasses.field(default_factory=dict)
    owner: Enqueuer | None = None

    def step(self, signature: Signature, upstream: _Output | None) -> _Output:
        """Add one step after ``upstream`` (the ids it takes results from, and as a list?)."""
        owner = signature.task.errands
        if self.owner is not None and owner is not self.owner:
            raise ValueError("every step of a workflow must be a task of the same Errands")
        self.owner = owner
        record = signature.build(self.now, takes_input=upstream is not None)
        if upstream is not None:
            ids, gather = upstream
            self.inputs[record.id] = (len(ids), gather)
            for position, upstream_id in enumerate(ids):
                self.links.setdefault(upstream_id, []).append((record.id, position))
            if ids:
                record.status, record.blocked_by = BLOCKED, len(ids)
        self.records.append(record)
        return [record.id], False

    def finish(self) -> list[JobRecord]:
        """The records with their links written in, ready for one enqueue."""
        for record in self.records:
            links = self.links.get(record.id, [])
            inputs, gather = self.inputs.get(record.id, (0, False))
            if links or inputs or gather:
                record.flow = Flow(tuple(links), inputs, gather).dumps()
        return self.records


class _Node:
    """A part of a workflow: places its steps in a plan, and can be enqueued alone."""

    def _place(self, plan: _Plan, upstream: _Output | None) -> _Output:
        raise NotImplementedError

    def _enqueue(self) -> tuple[_Output, dict[str, Job], list[Job]]:
        plan = _Plan(time.time())
        output = self._place(plan, None)
        records = plan.finish()
        if plan.owner is None:
            raise ValueError("an empty workflow has nothing to enqueue")
        jobs = plan.owner.enqueue(records)
        return output, {job.id: job for job in jobs}, jobs

    def delay(self) -> WorkflowJob | GroupResult:
        """Store every step at once; return the handle of the last step (or steps).

        A :class:`WorkflowJob`, or a :class:`GroupResult` when the last step is a
        group; both have ``status``, ``steps``, ``result()``, ``refresh()`` and ``cancel()``.
        """
        (ids, many), by_id, steps = self._enqueue()
        if many:
            return GroupResult([by_id[i] for i in ids], steps)
        return WorkflowJob(by_id[ids[0]], steps)


def _place(node: Signature | _Node, plan: _Plan, upstream: _Output | None) -> _Output:
    if isinstance(node, Signature):
        return plan.step(node, upstream)
    return node._place(plan, upstream)


Step = Signature | _Node


class Chain(_Node):
    """Steps one after the other; each receives the previous one's result first."""

    def __init__(self, steps: Iterable[Step]) -> None:
        self.steps = list(steps)
        if not self.steps:
            raise ValueError("a chain needs at least one step")

    def _place(self, plan: _Plan, upstream: _Output | None) -> _Output:
        output = upstream
        for step in self.steps:
            output = _place(step, plan, output)
        assert output is not None
        return output


class Group(_Node):
    """Steps side by side; a step after the group receives the list of their results."""

    def __init__(self, steps: Iterable[Step]) -> None:
        self.steps = list(steps)

    def _place(self, plan: _Plan, upstream: _Output | None) -> _Output:
        if not self.steps and upstream is not None:
            raise ValueError("an empty group cannot follow another step")
        ids: list[str] = []
        for step in self.steps:
            ids += _place(step, plan, upstream)[0]
        return ids, True

    def delay(self) -> GroupResult:
        """Store every step; return a handle on the group's results."""
        (ids, _), by_id, steps = self._enqueue()
        return GroupResult([by_id[i] for i in ids], steps)


class Chord(_Node):
    """A group, then a callback that runs once with the list of the group's results."""

    def __init__(self, header: Iterable[Step], callback: Step) -> None:
        self.header = Group(header)
        self.callback = callback

    def _place(self, plan: _Plan, upstream: _Output | None) -> _Output:
        if not self.header.steps:
            return _place(self.callback, plan, ([], True))  # runs at once, with []
        return _place(self.callback, plan, self.header._place(plan, upstream))

    def delay(self) -> WorkflowJob:
        """Store every step; return the callback's job."""
        (ids, _), by_id, steps = self._enqueue()
        return WorkflowJob(by_id[ids[0]], steps)


def chain(*steps: Step) -> Chain:
    """Run ``steps`` one after the other, each receiving the previous result first.

    ``.delay()`` returns the last step's job, whose ``result()`` is the chain's.
    """
    return Chain(steps)


def group(*steps: Step | Iterable[Step]) -> Group:
    """Run steps side by side: ``group(a.s(), b.s())`` or ``group(s for s in ...)``.

    ``.delay()`` returns a :class:`GroupResult`.
    """
    if len(steps) == 1 and not isinstance(steps[0], Signature | _Node):
        return Group(steps[0])
    return Group(step for step in steps if isinstance(step, Signature | _Node))


def chord(header: Iterable[Step], callback: Step) -> Chord:
    """Run ``header`` side by side, then ``callback`` once with the list of their results.

    ``.delay()`` returns the callback's job.
    """
    return Chord(header, callback)


class WorkflowJob(Job):
    """The job of a workflow's last step, which also knows every step of the workflow."""

    def __init__(self, job: Job, steps: list[Job]) -> None:
        super().__init__(job._record, job._backend)
        #: Every step of the workflow, in the order they were placed.
        self.steps = steps

    def cancel(self) -> WorkflowJob:
        """Cancel every step not finished yet: the workflow stops where it is."""
        _cancel_all(self.steps)
        super().cancel()
        return self


class GroupResult:
    """The jobs of a group, in order, and what they came to."""

    def __init__(self, jobs: list[Job], steps: list[Job]) -> None:
        self.jobs = jobs
        #: Every step of the workflow, in the order they were placed.
        self.steps = steps

    @property
    def status(self) -> JobStatus:
        """``failed`` or ``cancelled`` if any job is, ``succeeded`` if all are; else how far."""
        statuses = {job.refresh().status for job in self.jobs}
        for status in (JobStatus.FAILED, JobStatus.CANCELLED):
            if status in statuses:
                return status
        if statuses <= {JobStatus.SUCCEEDED}:
            return JobStatus.SUCCEEDED
        if statuses & {JobStatus.RUNNING, JobStatus.SUCCEEDED}:
            return JobStatus.RUNNING
        return JobStatus.BLOCKED if statuses == {BLOCKED} else JobStatus.QUEUED

    def results(self, timeout: float | None = None) -> list[Any]:
        """Wait for every job and return their results in order.

        Raises ``JobFailed`` (or ``JobCancelled``) for the first job, in order,
        that did not succeed, and ``TimeoutError`` after ``timeout`` seconds in all.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        values = []
        for job in self.jobs:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            values.append(job.result(timeout=left))
        return values

    def result(self, timeout: float | None = None) -> list[Any]:
        """The group's result, the list of its jobs' results: as :meth:`results`."""
        return self.results(timeout)

    def refresh(self) -> GroupResult:
        """Read every job's current state from the backend; returns the group itself."""
        for job in self.jobs:
            job.refresh()
        return self

    def cancel(self) -> GroupResult:
        """Cancel every step not finished yet."""
        _cancel_all(self.steps)
        return self

    def __len__(self) -> int:
        return len(self.jobs)

    def __repr__(self) -> str:
        return f"<GroupResult of {len(self.jobs)} jobs>"


def _cancel_all(steps: list[Job]) -> None:
    """Cancel the last steps first, so each ends cancelled by the user, not by its upstream."""
    for job in reversed(steps):
        if job.refresh().status not in FINISHED:
            job.cancel()
