"""The ``respgw`` command: its subcommands, the settings each one reads, and what ``respgw local``
hands the router."""

from __future__ import annotations

import dataclasses
import re

import httpx
import pytest

from bootstrap_svc.config import BootstrapSettings
from gateway.settings import ServerSettings, env_names, from_namespace
from respgw_cli import echo_hub, local, main
from router_svc.config import RouterSettings
from state_svc.config import StateSettings


def _parse(*argv: str) -> object:
    args = main._parser().parse_args(list(argv))
    return from_namespace(args.settings_cls, args)


def test_each_subcommand_builds_its_services_settings() -> None:
    assert isinstance(_parse("router", "--hub-url", "http://h/v1"), RouterSettings)
    assert isinstance(_parse("state", "--backend", "memory"), StateSettings)
    assert isinstance(_parse("bootstrap"), BootstrapSettings)
    assert isinstance(_parse("local", "--echo-hub"), local.LocalSettings)
    assert isinstance(_parse("echo-hub", "--port", "0"), main.EchoHubSettings)


def test_every_service_shares_the_server_settings() -> None:
    shared = [f.name for f in dataclasses.fields(ServerSettings)]
    for cls in (RouterSettings, StateSettings, BootstrapSettings, local.LocalSettings):
        assert issubclass(cls, ServerSettings)
        # The shared flags come last, after the service's own, in --help and everywhere else.
        assert env_names(cls)[-len(shared) :] == env_names(ServerSettings)


def test_local_takes_every_router_flag_but_the_state_address(
    capsys: pytest.CaptureFixture[str],
) -> None:
    router_envs = set(env_names(RouterSettings))
    local_envs = set(env_names(local.LocalSettings))
    assert router_envs - local_envs == {"RESPGW_STATE_ADDRESS"}
    with pytest.raises(SystemExit):
        _parse("local", "--state-address", "127.0.0.1:1")
    assert "unrecognized arguments: --state-address" in capsys.readouterr().err


def test_local_hands_the_router_its_flags_and_the_embedded_addresses() -> None:
    settings = _parse("local", "--echo-hub", "--max-body-bytes", "1234", "--hub-api", "responses")
    assert isinstance(settings, local.LocalSettings)
    assert settings.log_format == "text"  # a terminal's default, unlike the services' json
    router = local.router_settings(
        settings, hub_url="http://127.0.0.1:1/v1", state_address="127.0.0.1:2"
    )
    assert type(router) is RouterSettings
    assert (router.max_body_bytes, router.hub_api) == (1234, "responses")
    assert (router.hub_url, router.state_address) == ("http://127.0.0.1:1/v1", "127.0.0.1:2")
    assert router.default_model == "echo"  # the echo hub's model, unless one is given


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ((), "give --hub-url (your model server) or --echo-hub (a demo)"),
        (("--hub-url", "http://h/v1", "--bootstrap", "--bootstrap-address", "h:1"), "not both"),
    ],
)
async def test_local_refuses_what_it_cannot_start_before_starting_anything(
    argv: tuple[str, ...], message: str
) -> None:
    settings = _parse("local", *argv)
    assert isinstance(settings, local.LocalSettings)
    with pytest.raises(ValueError, match=re.escape(message)):
        await local.run(settings)


async def test_the_echo_hub_repeats_the_last_user_message() -> None:
    runner, port = await echo_hub.start("127.0.0.1", 0)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}/v1") as client:
            reply = await client.post(
                "/chat/completions",
                json={"model": "echo", "messages": [{"role": "user", "content": "hi there"}]},
            )
        assert reply.status_code == 200
        assert reply.json()["choices"][0]["message"]["content"] == "You said: hi there"
    finally:
        await runner.cleanup()
