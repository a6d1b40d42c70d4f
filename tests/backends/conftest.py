"""The store's own suite runs on every backend, the Redis Cluster included."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import BACKENDS, _url_fixture


@pytest.fixture(params=list(BACKENDS))
def backend_url(request: pytest.FixtureRequest, tmp_path: object) -> Iterator[str]:
    """A fresh, empty store of each backend, as an ERRANDS_URL."""
    yield from _url_fixture(request, tmp_path)


@pytest.fixture(params=[name for name in BACKENDS if name != "memory"])
def shared_backend_url(request: pytest.FixtureRequest, tmp_path: object) -> Iterator[str]:
    """A fresh store that several processes can share (not memory://)."""
    yield from _url_fixture(request, tmp_path)
