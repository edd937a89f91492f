"""Where turn.py finds the event plumbing until it imports :mod:`router_svc.events`.

stream.py was split by concept (issue 14): the event plumbing is :mod:`router_svc.events`, each
dialect's stream translator is in its module of :mod:`router_svc.dialects`, the replay of a stored
response :mod:`router_svc.replay`. Nothing is defined here and nothing new imports it: it goes
once the branches editing turn.py have merged.
"""

from __future__ import annotations

from router_svc.events import SSE_DONE, sse_encode
from router_svc.replay import replay_events

__all__ = ["SSE_DONE", "replay_events", "sse_encode"]
