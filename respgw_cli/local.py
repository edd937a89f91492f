"""``respgw local``: a whole gateway in one process and one event loop.

The router, with every router setting, in front of an embedded state service on SQLite; with
``--bootstrap`` the reference bootstrap service too, and with ``--echo-hub`` the demo hub.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, replace
from typing import ClassVar

from gateway import tracing
from gateway.settings import option
from router_svc.config import RouterSettings

log = logging.getLogger("respgw")


@dataclass(frozen=True)
class LocalSettings(RouterSettings):
    """The router's settings (the state address excepted: the state service is embedded) and
    what the embedded services need."""

    not_flags: ClassVar[frozenset[str]] = frozenset({"state_address"})

    hub_url: str = option(
        "",
        "Base URL of the model server, up to and including /v1. Required unless --echo-hub.",
        env="RESPGW_HUB_URL",
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
    log_format: str = option("text", "Log format: json or text.", env="RESPGW_LOG_FORMAT")


def router_settings(
    settings: LocalSettings, *, hub_url: str, state_address: str, bootstrap_address: str = ""
) -> RouterSettings:
    """The router's part of ``settings`` as plain :class:`RouterSettings`, with the addresses of
    what this process embeds (``bootstrap_address`` empty keeps ``--bootstrap-address``)."""
    own = {f.name: getattr(settings, f.name) for f in dataclasses.fields(RouterSettings)}
    return replace(
        RouterSettings(**own),
        hub_url=hub_url,
        state_address=state_address,
        bootstrap_address=bootstrap_address or settings.bootstrap_address,
        default_model=settings.default_model or ("echo" if settings.echo_hub else ""),
    )


async def run(settings: LocalSettings) -> None:
    """Serves until cancelled (Ctrl-C or SIGTERM stop uvicorn), then stops what it started."""
    import uvicorn

    from router_svc import app as router_app
    from state_svc import server as state_server
    from state_svc.config import StateSettings

    if settings.bootstrap and settings.bootstrap_address:
        raise ValueError("give --bootstrap (run one here) or --bootstrap-address, not both")
    hub_url = settings.hub_url
    echo_runner = None
    if settings.echo_hub:
        from respgw_cli import echo_hub

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
    router = router_settings(
        settings,
        hub_url=hub_url,
        state_address=f"127.0.0.1:{state.port}",
        bootstrap_address=bootstrap_address,
    )
    tracing.setup("respgw-router", router.otel_endpoint)
    # The router's own server configuration (its limits and timeouts), on this event loop.
    config = router_app.server_config(router_app.create_app(router), router, loop="none")
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
