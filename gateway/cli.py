"""The ``respgw`` command: one subcommand per service, plus ``local`` for a whole gateway on one
machine and ``echo-hub``, a demo model server.

Every setting is a flag and an environment variable (``respgw <command> --help`` lists both).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from dataclasses import dataclass, replace

import uvloop

from gateway import logs
from gateway.grpcerrors import ServiceError
from gateway.settings import add_arguments, from_namespace, option

log = logging.getLogger("respgw")


@dataclass(frozen=True)
class LocalSettings:
    host: str = option("127.0.0.1", "Address the HTTP server binds.", env="RESPGW_ROUTER_HOST")
    port: int = option(8080, "Port of the Responses API.", env="RESPGW_ROUTER_PORT")
    hub_url: str = option(
        "",
        "Base URL of the model server, up to and including /v1. Required unless --echo-hub.",
        env="RESPGW_HUB_URL",
    )
    hub_api: str = option("chat", "What the hub speaks: chat or responses.", env="RESPGW_HUB_API")
    hub_api_key: str = option("", "Bearer token sent to the hub.", env="RESPGW_HUB_API_KEY")
    default_model: str = option(
        "", "Model used when a request names none.", env="RESPGW_DEFAULT_MODEL"
    )
    echo_hub: bool = option(
        False,
        "Start the built-in echo demo model server and use it as the hub (a demo: it "
        "only repeats your last message).",
        env="RESPGW_ECHO_HUB",
    )
    sqlite_path: str = option(
        "respgw-state.db",
        "SQLite file the embedded state service keeps everything in.",
        env="RESPGW_STATE_SQLITE_PATH",
    )
    api_keys: str = option(
        "",
        "Comma-separated KEY=TENANT pairs; empty is single-tenant without keys.",
        env="RESPGW_API_KEYS",
    )
    bootstrap: bool = option(
        False,
        "Also run the reference bootstrap service in this process, so requests with "
        "code_interpreter or shell tools get execution sessions.",
        env="RESPGW_LOCAL_BOOTSTRAP",
    )
    bootstrap_workdir: str = option(
        "respgw-sessions",
        "Folder for the execution sessions of --bootstrap.",
        env="RESPGW_BOOTSTRAP_WORKDIR",
    )
    log_level: str = option("info", "Log level.", env="RESPGW_LOG_LEVEL")
    log_format: str = option("text", "Log format: json or text.", env="RESPGW_LOG_FORMAT")


@dataclass(frozen=True)
class EchoHubSettings:
    host: str = option("127.0.0.1", "Address the echo hub binds.", env="RESPGW_ECHO_HUB_HOST")
    port: int = option(8000, "Port of the echo hub.", env="RESPGW_ECHO_HUB_PORT")
    log_level: str = option("info", "Log level.", env="RESPGW_LOG_LEVEL")
    log_format: str = option("text", "Log format: json or text.", env="RESPGW_LOG_FORMAT")


def _parser() -> argparse.ArgumentParser:
    from bootstrap_svc.config import BootstrapSettings
    from router_svc.config import RouterSettings
    from state_svc.config import StateSettings

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
            LocalSettings,
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
    logs.setup(settings.log_level, settings.log_format)
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
            uvloop.run(run_local(settings))
        elif args.command == "echo-hub":
            asyncio.run(run_echo_hub(settings))
    except ValueError as exc:
        log.error(str(exc))
        sys.exit(2)
    except ServiceError as exc:
        # A backend that cannot be opened at start (a missing folder, a database that refuses).
        log.error(f"cannot start: {exc.message}")
        sys.exit(1)
    except KeyboardInterrupt:
        pass


async def run_echo_hub(settings: EchoHubSettings) -> None:
    from gateway import echo_hub

    runner, port = await echo_hub.start(settings.host, settings.port)
    log.info(f"echo hub listening on http://{settings.host}:{port}/v1")
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


async def run_local(settings: LocalSettings) -> None:
    """The router and an embedded state service (SQLite) in one process and one event loop."""
    import uvicorn

    from router_svc import app as router_app
    from router_svc.config import RouterSettings
    from state_svc import server as state_server
    from state_svc.config import StateSettings

    hub_url = settings.hub_url
    echo_runner = None
    if settings.echo_hub:
        from gateway import echo_hub

        echo_runner, echo_port = await echo_hub.start("127.0.0.1", 0)
        hub_url = f"http://127.0.0.1:{echo_port}/v1"
        log.warning("using the echo demo hub: answers repeat your last message")
    if not hub_url:
        raise ValueError("give --hub-url (your model server) or --echo-hub (a demo)")
    state = await state_server.start(
        replace(
            StateSettings(), listen="127.0.0.1:0", sqlite_path=settings.sqlite_path, metrics_port=0
        )
    )
    bootstrap = None
    bootstrap_address = ""
    if settings.bootstrap:
        from bootstrap_svc import server as bootstrap_server
        from bootstrap_svc.config import BootstrapSettings

        bootstrap = await bootstrap_server.start(
            replace(
                BootstrapSettings(),
                listen="127.0.0.1:0",
                workdir=settings.bootstrap_workdir,
                metrics_port=0,
            )
        )
        bootstrap_address = f"127.0.0.1:{bootstrap.port}"
    router_settings = replace(
        RouterSettings(),
        host=settings.host,
        port=settings.port,
        hub_url=hub_url,
        hub_api=settings.hub_api,
        hub_api_key=settings.hub_api_key,
        default_model=settings.default_model or ("echo" if settings.echo_hub else ""),
        state_address=f"127.0.0.1:{state.port}",
        bootstrap_address=bootstrap_address,
        api_keys=settings.api_keys,
    )
    # The router's own server configuration (its limits and timeouts), on this event loop.
    config = router_app.server_config(
        router_app.create_app(router_settings), router_settings, loop="none"
    )
    log.info(
        f"gateway listening on http://{settings.host}:{settings.port}/v1 "
        f"(state in {settings.sqlite_path}, hub {hub_url})"
    )
    try:
        await uvicorn.Server(config).serve()
    finally:
        await state.stop(5.0)
        if bootstrap is not None:
            await bootstrap.stop(5.0)
        if echo_runner is not None:
            await echo_runner.cleanup()
