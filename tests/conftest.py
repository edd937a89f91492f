"""Fixtures shared by every suite: the fake hub (the only fake) and the in-process gateway."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.bootstrap_conformance.conftest import pytest_addoption  # noqa: F401  (--bootstrap-address, --bootstrap-impl for runs of all of tests/)
from tests.fakehub import FakeHub
from tests.support import Stack


@pytest.fixture(scope="session")
def _hub_server() -> Iterator[FakeHub]:
    hub = FakeHub().start()
    yield hub
    hub.stop()


@pytest.fixture
def hub(_hub_server: FakeHub) -> Iterator[FakeHub]:
    """The fake hub, with an empty record and script for each test."""
    _hub_server.reset()
    yield _hub_server
    _hub_server.reset()


@pytest.fixture
def stack(hub: FakeHub) -> Iterator[Stack]:
    """The router and an in-memory state service, started for one test."""
    s = Stack(hub.url, router={"default_model": "fake-model"}).start()
    yield s
    s.stop()
