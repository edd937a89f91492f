"""The Codex CLI (``@openai/codex``, pinned in tests/clients) through the real router and state
service to the fake hub, configured as a custom model provider with ``wire_api = "responses"``.

Codex sends ``store: false`` with the whole conversation as input on every request, streams,
asks for ``include: ["reasoning.encrypted_content"]``, sends ``prompt_cache_key`` and
``client_metadata``, and declares function tools, a ``namespace`` of functions and a
``web_search`` tool. The gateway answers all of it: the namespace's functions are offered to the
chat model, web search is not (and is reported as not run).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from router_svc import validate
from tests import clients
from tests.fakehub import FakeHub, Reply, text_of
from tests.support import Stack

MODEL = "fake-model"
# Codex's own flags for a run nobody watches: no approval prompts and no sandbox (the tests'
# command is an echo in a temporary folder), outside a git repository.
UNATTENDED = ["--skip-git-repo-check", "--dangerously-bypass-approvals-and-sandbox"]


@pytest.fixture(scope="module")
def codex() -> str:
    return str(clients.installed() / ".bin" / "codex")


@pytest.fixture
def codex_home(tmp_path: Path, stack: Stack) -> Path:
    """A CODEX_HOME whose config.toml makes the gateway Codex's model provider."""
    home = tmp_path / "codex-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f"""
model = "{MODEL}"
model_provider = "respgw"
check_for_update_on_startup = false

[analytics]
enabled = false

[model_providers.respgw]
name = "Responses Gateway"
base_url = "{stack.url}"
wire_api = "responses"
env_key = "RESPGW_TEST_API_KEY"
request_max_retries = 0
stream_max_retries = 0
"""
    )
    return home


@pytest.fixture
def received(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The bodies of the POST /v1/responses requests the in-process router validated."""
    bodies: list[dict[str, Any]] = []
    parse = validate.parse_turn_request

    def recording(body: Any, **kwargs: Any) -> validate.TurnRequest:
        bodies.append(body)
        return parse(body, **kwargs)

    monkeypatch.setattr(validate, "parse_turn_request", recording)
    return bodies


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    folder = tmp_path / "work"
    folder.mkdir()
    return folder


def run_codex(codex: str, home: Path, workdir: Path, *args: str) -> clients.Finished:
    env = {
        **os.environ,
        "CODEX_HOME": str(home),
        "RESPGW_TEST_API_KEY": "test-key",
        "NO_COLOR": "1",
        "RUST_LOG": "error",
    }
    return clients.run([codex, *args], env=env, cwd=workdir, timeout=90)


def metric(stack: Stack, name: str, **labels: str) -> float:
    with httpx.Client(timeout=10) as http:
        text = http.get(f"http://127.0.0.1:{stack.port}/metrics").text
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    found = re.findall(rf"^{name}{{{re.escape(wanted)}}} (\S+)$", text, re.MULTILINE)
    return float(found[0]) if found else 0.0


def roles(request: dict[str, Any]) -> list[str]:
    return [m["role"] for m in request["messages"]]


def tool_names(request: dict[str, Any]) -> list[str]:
    return [t["function"]["name"] for t in request.get("tools") or []]


def test_codex_exec_runs_a_tool_and_resumes_for_a_second_turn(
    stack: Stack,
    hub: FakeHub,
    codex: str,
    codex_home: Path,
    workdir: Path,
    received: list[dict[str, Any]],
) -> None:
    call = {
        "id": "call_echo",
        "name": "exec_command",
        "arguments": json.dumps({"cmd": "echo codex-was-here"}),
    }
    hub.enqueue(
        Reply(tool_calls=[call], finish_reason="tool_calls"),
        Reply(text="The command printed codex-was-here."),
        Reply(text="Second turn answer."),
    )
    not_run = metric(stack, "respgw_router_tools_not_run_total", type="web_search")

    first = run_codex(codex, codex_home, workdir, "exec", *UNATTENDED, "Run echo codex-was-here")
    assert first.returncode == 0 and not first.timed_out, first.describe()
    assert first.stdout.strip() == "The command printed codex-was-here.", first.describe()

    second = run_codex(codex, codex_home, workdir, "exec", "resume", "--last", *UNATTENDED, "Next?")
    assert second.returncode == 0 and not second.timed_out, second.describe()
    assert second.stdout.strip() == "Second turn answer.", second.describe()

    # What Codex sent: the whole conversation each time, unstored, streamed.
    assert len(received) == 3
    for body in received:
        assert body["store"] is False and body["stream"] is True
        assert "previous_response_id" not in body and "conversation" not in body
        assert body["include"] == ["reasoning.encrypted_content"]
        assert body["prompt_cache_key"] and "client_metadata" in body
        kinds = {t["type"] for t in body["tools"]}
        assert {"function", "namespace", "web_search"} <= kinds
    assert [i["type"] for i in received[1]["input"][-2:]] == [
        "function_call",
        "function_call_output",
    ]
    assert len(received[2]["input"]) > len(received[1]["input"])

    asked, answered, resumed = hub.chat_requests()
    for request in (asked, answered, resumed):
        assert request["model"] == MODEL and request["stream"] is True
        # Codex's function tools and the functions of its namespace are offered; its web search
        # is not (nothing here runs it).
        names = tool_names(request)
        assert {"exec_command", "spawn_agent"} <= set(names)
        assert all(t["type"] == "function" for t in request["tools"])
        # Its developer messages become system messages.
        assert roles(request)[0] == "system"
    assert text_of(asked["messages"][-1]) == "Run echo codex-was-here"

    # The second request is the whole conversation again: the call, and the output of the
    # command Codex ran.
    assistant, tool = answered["messages"][-2:]
    assert [c["id"] for c in assistant["tool_calls"]] == ["call_echo"]
    assert assistant["tool_calls"][0]["function"]["name"] == "exec_command"
    assert tool["role"] == "tool" and tool["tool_call_id"] == "call_echo"
    assert "codex-was-here" in text_of(tool)

    # The resumed session sends every earlier turn (store: false: nothing is kept here).
    texts = [text_of(m) for m in resumed["messages"]]
    assert "Run echo codex-was-here" in texts
    assert texts[-2:] == ["The command printed codex-was-here.", "Next?"]
    assert roles(resumed)[-2:] == ["assistant", "user"]

    # Each request declared web_search; each was counted as not run.
    assert metric(stack, "respgw_router_tools_not_run_total", type="web_search") - not_run == 3


def test_codex_replays_the_reasoning_the_gateway_sealed(
    stack: Stack,
    hub: FakeHub,
    codex: str,
    codex_home: Path,
    workdir: Path,
    received: list[dict[str, Any]],
) -> None:
    """Codex keeps no state on the server (store: false): the reasoning of a tool-calling answer
    comes back in its next request as the encrypted_content the gateway sealed, and the chat hub
    gets the reasoning text again on the assistant message that made the call."""
    call = {
        "id": "call_echo",
        "name": "exec_command",
        "arguments": json.dumps({"cmd": "echo sealed-reasoning"}),
    }
    thought = "The user wants the command run; call exec_command first."
    hub.enqueue(
        Reply(reasoning=thought, tool_calls=[call], finish_reason="tool_calls"),
        Reply(text="Done: sealed-reasoning."),
    )
    run = run_codex(codex, codex_home, workdir, "exec", *UNATTENDED, "Run echo sealed-reasoning")
    assert run.returncode == 0 and not run.timed_out, run.describe()
    assert run.stdout.strip() == "Done: sealed-reasoning.", run.describe()

    replayed = [i for i in received[1]["input"] if i.get("type") == "reasoning"]
    assert len(replayed) == 1
    assert replayed[0]["encrypted_content"].startswith("rgw1.")

    _, answered = hub.chat_requests()
    assistant = answered["messages"][-2]
    assert assistant["role"] == "assistant"
    assert assistant["reasoning_content"] == thought
    assert [c["id"] for c in assistant["tool_calls"]] == ["call_echo"]
