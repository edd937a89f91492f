"""The services' garbage-collector settings."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from gateway import gctune


@pytest.fixture
def restored() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


def test_tune_sets_the_thresholds_and_freezes_what_exists(restored: None) -> None:
    kept = [{"made": "at start-up"}]
    gctune.tune()
    assert gc.get_threshold() == gctune.THRESHOLDS
    assert gc.get_freeze_count() > 0
    assert kept
