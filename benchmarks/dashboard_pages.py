"""How fast the dashboard's pages answer with 1,000,000 finished and 10,000 queued jobs.

    python benchmarks/dashboard_pages.py [--stores sqlite,redis,postgres]
        [--finished 1000000] [--queued 10000] [--repeat 7]

The stores are filled as ``dashboard_store.py`` fills them; then each page and
API route is requested through Flask's test client (rendering, JSON and the
admin API included, no network): the overview, the jobs list (first page, a
page half way down by cursor, a filtered page), a job's detail, the failed
list, and the JSON behind the live parts. Median milliseconds; the target is
under 100 ms each.
"""

from __future__ import annotations

import sys
from pathlib import Path

from flask import current_app

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dashboard_store

from flask_errands import Admin
from flask_errands.admin import encode_cursor
from flask_errands.dashboard import mount


def measure_pages(admin: Admin, finished: int, queued: int, repeat: int) -> dict[str, float]:
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    app.secret_key = "benchmark"
    mount(app, lambda: admin, url_prefix="/errands", authorize=lambda: "viewer")
    client = app.test_client()
    middle = encode_cursor((finished + queued) // 2)
    some = admin.job_page(limit=1, cursor=middle).jobs[0].id
    task = dashboard_store.TASKS[3]

    def get(path: str) -> None:
        response = client.get(path)
        assert response.status_code == 200, (path, response.status_code)

    paths = {
        "overview page": "/errands/",
        "jobs page, first": "/errands/jobs",
        "jobs page, half way down": f"/errands/jobs?cursor={middle}",
        "jobs page, failed + task": f"/errands/jobs?state=failed&task={task}",
        "job detail page": f"/errands/jobs/{some}",
        "failed page": "/errands/failed",
        "queues page": "/errands/queues",
        "api/jobs, half way down": f"/errands/api/jobs?cursor={middle}",
        "api/jobs/<id>": f"/errands/api/jobs/{some}",
        "api/stats": "/errands/api/stats",
        "api/queues": "/errands/api/queues",
    }
    return {
        name: dashboard_store.median_ms(lambda path=path: get(path), repeat)  # type: ignore[misc]
        for name, path in paths.items()
    }


if __name__ == "__main__":
    dashboard_store.measure = measure_pages
    dashboard_store.main()
