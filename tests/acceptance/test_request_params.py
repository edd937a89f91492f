"""Requests real clients send, through the official openai SDK against the real router: fields the
gateway does not know (ignored and counted, or refused with --strict-params), the hub's sampling
fields, the penalties and function strictness echoed, and the fields that only mean something on
OpenAI's platform."""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from gateway.settings import add_arguments, from_namespace
from router_svc.config import RouterSettings
from tests.fakehub import FakeHub
from tests.support import Stack

# The first request of the Codex CLI carries client_metadata, which OpenAI accepts.
CODEX_EXTRA = {"client_metadata": {"installation_id": "0f1e2d3c"}}


@pytest.fixture(scope="module")
def router(_hub_server: FakeHub) -> Iterator[Stack]:
    s = Stack(_hub_server.url, router={"default_model": "fake-model"}).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def strict(_hub_server: FakeHub) -> Iterator[Stack]:
    s = Stack(
        _hub_server.url, router={"default_model": "fake-model", "strict_params": True}
    ).start()
    yield s
    s.stop()


def ignored(stack: Stack, name: str) -> float:
    with httpx.Client(timeout=10) as http:
        text = http.get(f"http://127.0.0.1:{stack.port}/metrics").text
    pattern = rf'^respgw_router_ignored_parameters_total{{param="{re.escape(name)}"}} (\S+)$'
    found = re.findall(pattern, text, re.MULTILINE)
    return float(found[0]) if found else 0.0


def test_unknown_fields_are_ignored_and_counted(router: Stack, hub: FakeHub) -> None:
    before = ignored(router, "client_metadata")
    response = router.client().responses.create(
        model="fake-model", input="hello", extra_body=CODEX_EXTRA
    )
    assert response.status == "completed" and response.output_text == "echo: hello"
    assert "client_metadata" not in hub.chat_requests()[0]
    assert ignored(router, "client_metadata") - before == 1


def test_unknown_fields_are_refused_with_strict_params(strict: Stack, hub: FakeHub) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        strict.client().responses.create(model="fake-model", input="hello", extra_body=CODEX_EXTRA)
    assert info.value.code == "unknown_parameter"
    assert info.value.param == "client_metadata"
    assert info.value.message.endswith("Unknown parameter: 'client_metadata'.")
    assert hub.requests == []
    # What the gateway knows is accepted in strict mode too.
    ok = strict.client().responses.create(
        model="fake-model", input="hello", extra_body={"presence_penalty": 0.1}
    )
    assert ok.status == "completed"


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        ([], {}, False),
        (["--strict-params"], {}, True),
        (["--strict-params", "false"], {"RESPGW_STRICT_PARAMS": "true"}, False),
        ([], {"RESPGW_STRICT_PARAMS": "1"}, True),
    ],
)
def test_strict_params_is_a_flag_and_an_environment_variable(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], env: dict[str, str], expected: bool
) -> None:
    monkeypatch.delenv("RESPGW_STRICT_PARAMS", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    parser = argparse.ArgumentParser()
    add_arguments(parser, RouterSettings)
    assert from_namespace(RouterSettings, parser.parse_args(argv)).strict_params is expected


def test_penalties_and_sampling_fields_reach_the_hub_and_penalties_are_echoed(
    router: Stack, hub: FakeHub
) -> None:
    client = router.client()
    sampling: dict[str, Any] = {
        "presence_penalty": 0.4,
        "frequency_penalty": -0.2,
        "seed": 11,
        "top_k": 30,
        "min_p": 0.05,
        "repetition_penalty": 1.1,
        "stop": ["END"],
    }
    response = client.responses.create(
        model="fake-model", input="sample", top_logprobs=3, extra_body=sampling
    )
    sent = hub.chat_requests()[0]
    assert {k: sent[k] for k in sampling} == sampling
    assert sent["top_logprobs"] == 3 and sent["logprobs"] is True
    extra = response.model_extra or {}
    assert (extra["presence_penalty"], extra["frequency_penalty"]) == (0.4, -0.2)
    stored = client.responses.retrieve(response.id).model_extra or {}
    assert (stored["presence_penalty"], stored["frequency_penalty"]) == (0.4, -0.2)

    plain = client.responses.create(model="fake-model", input="plain").model_extra or {}
    assert (plain["presence_penalty"], plain["frequency_penalty"]) == (0.0, 0.0)


def test_echoed_function_tools_carry_strict(router: Stack, hub: FakeHub) -> None:
    client = router.client()
    tools: Any = [
        {"type": "function", "name": "bare", "parameters": {"type": "object"}},
        {"type": "function", "name": "loose", "parameters": None, "strict": None},
        {
            "type": "function",
            "name": "tight",
            "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
            "strict": True,
        },
    ]
    with client.responses.stream(model="fake-model", input="x", tools=tools) as stream:
        created = next(iter(stream))
        final = stream.get_final_response()
    assert created.type == "response.created"
    for response in (created.response, final, client.responses.retrieve(final.id)):
        assert [(t.type, t.strict) for t in response.tools] == [  # type: ignore[union-attr]
            ("function", False),
            ("function", False),
            ("function", True),
        ]
    # The hub is asked for strict only where the caller asked for it.
    assert [t["function"].get("strict") for t in hub.chat_requests()[0]["tools"]] == [
        None,
        None,
        True,
    ]


def test_platform_only_fields_are_accepted_and_echoed(router: Stack, hub: FakeHub) -> None:
    client = router.client()
    with client.responses.stream(
        model="fake-model",
        input="platform",
        service_tier="flex",
        safety_identifier="user-hash",
        prompt_cache_key="pck",
        prompt_cache_retention="24h",
        stream_options={"include_obfuscation": False},
        context_management=[{"type": "compaction", "compact_threshold": 5000}],
        extra_body={
            "moderation": {"model": "omni-moderation-latest"},
            "access_programs": {"cyber": "standard"},
            "image": {"context_compression": "auto"},
            "prompt_cache_options": {"ttl": "12h", "mode": "explicit"},
            "background_options": {"completion_window": "soonest"},
        },
    ) as stream:
        final = stream.get_final_response()
    assert final.status == "completed"
    assert final.service_tier == "flex"
    assert (final.safety_identifier, final.prompt_cache_key) == ("user-hash", "pck")
    assert final.prompt_cache_retention == "24h"
    assert final.moderation is None
    assert final.access_programs is not None and final.access_programs.cyber == "standard"
    assert final.image is not None and final.image.context_compression == "disabled"
    options = final.prompt_cache_options
    assert options is not None and (options.mode, options.ttl) == ("explicit", "12h")
    sent = hub.chat_requests()[0]
    assert not {
        "service_tier",
        "moderation",
        "access_programs",
        "image",
        "prompt_cache_options",
        "background_options",
        "context_management",
    } & set(sent)
