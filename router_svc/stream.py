"""Where stream.py's names live now, for the importers not yet moved (issue 14).

The event plumbing is :mod:`router_svc.events`, each dialect's stream translator is in its module
of :mod:`router_svc.dialects`, the replay of a stored response :mod:`router_svc.replay`. Nothing is
defined here; import from those modules.
"""

from __future__ import annotations

from router_svc.dialects.chat import (
    ChatStreamTranslator,
)
from router_svc.dialects.responses import (
    ResponsesStreamTranslator,
)
from router_svc.events import (
    SSE_DONE,
    STREAM_INCOMPLETE,
    sse_encode,
)
from router_svc.replay import (
    replay_events,
    stored_stream,
)

__all__ = [
    "SSE_DONE",
    "STREAM_INCOMPLETE",
    "ChatStreamTranslator",
    "ResponsesStreamTranslator",
    "replay_events",
    "sse_encode",
    "stored_stream",
]
