"""The ``respgw`` command: one subcommand per service, plus ``local`` for a whole gateway on one
machine and ``echo-hub``, a demo model server.

Every setting is a flag and an environment variable (``respgw <command> --help`` lists both).
Each service's settings are imported up front (they are small); the service itself only when its
subcommand runs.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from dataclasses import dataclass

import uvloop

from bootstrap_svc.config import BootstrapSettings
from gateway import logs
from gateway.grpcerrors import ServiceError
from gateway.settings import add_arguments, from_namespace, option
from respgw_cli import local
from router_svc.config import RouterSettings
from state_svc.config import StateSettings

log = logging.getLogger("respgw")


@dataclass(frozen=True)
class EchoHubSettings:
    host: str = option("127.0.0.1", "Address the echo hub binds.", env="RESPGW_ECHO_HUB_HOST")
    port: int = option(8000, "Port of the echo hub.", env="RESPGW_ECHO_HUB_PORT")
    log_level: str = option("info", "Log level.", env="RESPGW_LOG_LEVEL")
    log_format: str = option("text", "Log format: json or text.", env="RESPGW_LOG_FORMAT")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="respgw",
        description="Responses Gateway: OpenAI's stateful Responses API over any "
        "OpenAI-compatible model server.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands: list[tuple[str, type, str]] = [
        ("router", RouterSettings, "Serve the Responses and Conversations API over HTTP."),
        (
            "state",
            StateSettings,
            "Serve the state service (gRPC): stored responses and conversations.",
        ),
        (
            "bootstrap",
            BootstrapSettings,
            "Serve the reference bootstrap service (gRPC) for stateful tools.",
        ),
        (
            "local",
            local.LocalSettings,
            "Run a whole gateway on this machine: router and state service on "
            "embedded SQLite, in one process.",
        ),
        ("echo-hub", EchoHubSettings, "Serve the echo demo model server (Chat Completions)."),
    ]
    for name, cls, help_text in commands:
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p, cls)
        p.set_defaults(settings_cls=cls)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    settings = from_namespace(args.settings_cls, args)
    logs.setup(
        settings.log_level,
        settings.log_format,
        access_flush_s=getattr(settings, "access_log_flush_s", 0.0),
    )
    try:
        if args.command == "router":
            from router_svc import app

            app.run(settings)
        elif args.command == "state":
            from state_svc import server as state_server

            uvloop.run(state_server.run(settings))
        elif args.command == "bootstrap":
            from bootstrap_svc import server as bootstrap_server

            uvloop.run(bootstrap_server.run(settings))
        elif args.command == "local":
            uvloop.run(local.run(settings))
        elif args.command == "echo-hub":
            from respgw_cli import echo_hub

            asyncio.run(echo_hub.serve(settings.host, settings.port))
    except ValueError as exc:
        log.error(str(exc))
        sys.exit(2)
    except ServiceError as exc:
        # A backend that cannot be opened at start (a missing folder, a database that refuses).
        log.error(f"cannot start: {exc.message}")
        sys.exit(1)
    except KeyboardInterrupt:
        pass
