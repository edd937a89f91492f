"""Shared plumbing of the gateway's services: settings, gRPC server, client and error helpers,
logging, metrics and tracing. It imports no service; the ``respgw`` command that starts them is
``respgw_cli``."""
