"""Where turn.py finds the Response object's builders until it imports :mod:`router_svc.response`.

translate.py was split by concept (issue 14): the chat dialect is :mod:`router_svc.dialects.chat`,
the responses dialect :mod:`router_svc.dialects.responses`, the Response object and its items
:mod:`router_svc.response`. Nothing is defined here and nothing new imports it: it goes once the
branches editing turn.py have merged.
"""

from __future__ import annotations

from router_svc.response import error_object, response_object

__all__ = ["error_object", "response_object"]
