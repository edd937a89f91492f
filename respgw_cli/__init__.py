"""The composition root: the ``respgw`` command, the only package that imports every service.

The services (``router_svc``, ``state_svc``, ``bootstrap_svc``) never import each other, and the
shared plumbing (``gateway``) imports none of them (``tests/test_architecture.py`` holds both);
what starts them, one at a time or together, lives here:

- ``main``: the ``respgw`` command and its subcommands (``python -m respgw_cli`` is the same);
- ``local``: ``respgw local``, the router with an embedded state service (and optionally the
  reference bootstrap service and the echo hub) in one process;
- ``echo_hub``: ``respgw echo-hub``, a demo model server that repeats the last user message.
"""
