"""How a SQL store moves a workflow on, inside the transaction that records a step's outcome.

SQLite and PostgreSQL run the same steps with their own named queries, given
as ``run(query_name, params) -> rows``, in the caller's transaction: the
outcome, the inputs it feeds and the counters it lowers commit together.
Each query needs: ``add_input`` (insert or do nothing, returning the row if
inserted), ``unblock`` (returning the step's status afterwards),
``cancel_blocked`` and ``revive_cancelled`` (each returning the step's ``flow``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from .base import CANCELLED, FAILED, SUCCEEDED, UPSTREAM_FAILED_PREFIX, WAITING, Flow
from .base import upstream_failed as upstream_failed_error

Run = Callable[[str, Mapping[str, Any]], Sequence[Mapping[str, Any]]]


def advance(
    run: Run,
    job_id: str,
    task: str,
    status: str,
    flow: str | None,
    result: str | None,
    now: float,
) -> bool:
    """Move the workflow on after a step ended ``status``; True if a step fell due.

    See ``Backend.finish``: a success feeds each next step once per input and
    unblocks the steps it completes; a failure or cancellation cancels every
    blocked step downstream.
    """
    if flow is None:
        return False
    links = Flow.loads(flow).next
    if status == SUCCEEDED:
        due = False
        for step_id, position in links:
            params = {"id": step_id, "position": position, "result": result or "null"}
            if run("add_input", params):
                rows = run("unblock", {"id": step_id, "now": now})
                due = due or any(row["status"] in WAITING for row in rows)
        return due
    if status in (FAILED, CANCELLED):
        error = upstream_failed_error(job_id, task, status)
        _walk(run, "cancel_blocked", links, {"error": error, "now": now})
    return False


def revive(run: Run, flow: str | None) -> None:
    """Block again the steps downstream of a re-run step that its failure cancelled."""
    if flow is not None:
        pattern = {"pattern": UPSTREAM_FAILED_PREFIX + "%"}
        _walk(run, "revive_cancelled", Flow.loads(flow).next, pattern)


def _walk(
    run: Run, query: str, links: Iterable[tuple[str, int]], params: Mapping[str, Any]
) -> None:
    """Run ``query`` on each step reachable through ``links`` while it changes a step."""
    pending = [step_id for step_id, _ in links]
    seen: set[str] = set()
    while pending:
        step_id = pending.pop()
        if step_id in seen:
            continue
        seen.add(step_id)
        for row in run(query, {**params, "id": step_id}):
            if row["flow"] is not None:
                pending.extend(next_id for next_id, _ in Flow.loads(row["flow"]).next)
