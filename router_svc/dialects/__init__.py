"""Hub dialects: the model-server APIs the gateway speaks to its hub, one module each.

``chat`` (:mod:`router_svc.dialects.chat`) is a Chat Completions hub, ``responses``
(:mod:`router_svc.dialects.responses`) a hub that speaks the Responses API itself.
"""
