"""Renders each overlay in deploy/overlays once per session."""

from __future__ import annotations

import pytest

from .kube import OVERLAYS, OVERLAYS_DIR, Manifests, render


@pytest.fixture(scope="session", params=OVERLAYS)
def manifests(request: pytest.FixtureRequest) -> Manifests:
    overlay: str = request.param
    return Manifests(overlay, render(OVERLAYS_DIR / overlay))
