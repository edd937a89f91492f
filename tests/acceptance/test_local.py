"""`respgw local --echo-hub`, the README's first command: a whole gateway in one process."""

from __future__ import annotations

from pathlib import Path

import openai

from tests.support import ROUTER_READY, Process


def test_local_gateway_with_echo_hub_answers_chains_and_streams(tmp_path: Path) -> None:
    db = tmp_path / "state.db"
    local = Process(["local", "--echo-hub", "--port", "0", "--sqlite-path", str(db)])
    port = local.start(ROUTER_READY)
    local_client: list[openai.OpenAI] = []
    try:
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0
        )
        local_client.append(client)
        first = client.responses.create(model="echo", input="Remember 7")
        assert first.output_text == "You said: Remember 7"
        second = client.responses.create(
            model="echo", input="Which?", previous_response_id=first.id
        )
        assert second.output_text == "You said: Which?"
        with client.responses.stream(model="echo", input="Stream this") as stream:
            deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        assert "".join(deltas) == "You said: Stream this"
        assert client.responses.retrieve(second.id).previous_response_id == first.id
    finally:
        for c in local_client:
            c.close()
        assert local.stopped_gracefully(), "".join(local.lines[-20:])
    assert db.exists()


def test_local_gateway_with_bootstrap_prepares_code_interpreter_sessions(tmp_path: Path) -> None:
    local = Process(
        [
            "local",
            "--echo-hub",
            "--bootstrap",
            "--port",
            "0",
            "--sqlite-path",
            str(tmp_path / "s.db"),
            "--bootstrap-workdir",
            str(tmp_path / "sessions"),
        ]
    )
    port = local.start(ROUTER_READY)
    try:
        with openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0
        ) as client:
            resp = client.responses.create(
                model="echo",
                input="run code",
                tools=[{"type": "code_interpreter", "container": {"type": "auto"}}],
            )
            container = resp.tools[0].container
            assert isinstance(container, str) and container.startswith("cntr_")
            assert (tmp_path / "sessions").is_dir()
    finally:
        assert local.stopped_gracefully(), "".join(local.lines[-20:])
