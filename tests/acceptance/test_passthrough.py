"""GET /v1/models and POST /v1/chat/completions, passed through to the hub, through the official
openai SDK against the real router and the fake hub."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.fakehub import MODELS, FakeHub, Reply
from tests.support import Stack


@pytest.fixture(scope="module")
def router(_hub_server: FakeHub) -> Iterator[Stack]:
    s = Stack(_hub_server.url, router={"default_model": "fake-model"}).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def keyed(_hub_server: FakeHub) -> Iterator[Stack]:
    s = Stack(_hub_server.url, router={"api_keys": "key-a=tenant-a"}).start()
    yield s
    s.stop()


# --- models --------------------------------------------------------------------------------------


def test_models_list_is_the_hubs(router: Stack, hub: FakeHub) -> None:
    client = router.client()
    models = client.models.list(extra_headers={"x-request-id": "req_models_1"})
    assert [m.id for m in models] == [m["id"] for m in MODELS["data"]]
    assert models.data[0].owned_by == "fakehub"
    assert hub.paths == ["/v1/models"]
    assert hub.headers[0]["x-request-id"] == "req_models_1"


@pytest.mark.parametrize("model", ["fake-model", "org/other-model"])
def test_models_retrieve_finds_one_in_the_hubs_list(
    router: Stack, hub: FakeHub, model: str
) -> None:
    found = router.client().models.retrieve(model)
    assert found.id == model and found.object == "model"


def test_models_retrieve_of_an_unknown_model_is_a_404(router: Stack, hub: FakeHub) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        router.client().models.retrieve("no-such-model")
    assert info.value.code == "model_not_found"
    assert info.value.param == "model"


def test_models_hub_failure_is_mapped(router: Stack, hub: FakeHub) -> None:
    hub.enqueue(Reply(status=503))
    with pytest.raises(openai.InternalServerError) as info:
        router.client().models.list()
    assert info.value.status_code == 502
    assert info.value.code == "upstream_error"


# --- chat completions ----------------------------------------------------------------------------


def test_chat_completion_is_passed_through(router: Stack, hub: FakeHub) -> None:
    client = router.client()
    completion = client.chat.completions.create(
        model="fake-model",
        messages=[{"role": "system", "content": "s"}, {"role": "user", "content": "hi there"}],
        temperature=0.2,
        seed=5,
        extra_body={"top_k": 20, "chat_template_kwargs": {"enable_thinking": False}},
        extra_headers={"x-request-id": "req_chat_1"},
    )
    assert completion.choices[0].message.content == "echo: hi there"
    assert completion.usage is not None and completion.usage.total_tokens == 18
    [sent] = hub.chat_requests()
    assert sent == {
        "model": "fake-model",
        "messages": [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "hi there"},
        ],
        "temperature": 0.2,
        "seed": 5,
        "top_k": 20,
        "chat_template_kwargs": {"enable_thinking": False},
    }
    assert hub.headers[0]["x-request-id"] == "req_chat_1"


def test_chat_completion_streams_through(router: Stack, hub: FakeHub) -> None:
    hub.enqueue(
        Reply(
            text="one two three",
            tool_calls=[{"id": "call_1", "name": "f", "arguments": '{"a": 1}'}],
        )
    )
    stream = router.client().chat.completions.create(
        model="fake-model",
        messages=[{"role": "user", "content": "count"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    args = "".join(
        call.function.arguments or ""
        for c in chunks
        if c.choices
        for call in c.choices[0].delta.tool_calls or []
        if call.function is not None
    )
    assert text == "one two three"
    assert args == '{"a": 1}'
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 18
    assert hub.chat_requests()[0]["stream"] is True


def test_streamed_bytes_are_the_hubs_unchanged(router: Stack, hub: FakeHub) -> None:
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "a b"}], "stream": True}

    def read(url: str) -> tuple[httpx.Response, bytes]:
        with (
            httpx.Client(timeout=10) as http,
            http.stream("POST", f"{url}/chat/completions", json=body) as resp,
        ):
            return resp, resp.read()

    _, expected = read(hub.url)
    relayed, got = read(router.url)
    assert relayed.status_code == 200
    assert relayed.headers["content-type"].startswith("text/event-stream")

    def same_second(raw: bytes) -> bytes:  # the fake hub stamps each chunk with the time
        return re.sub(rb'"created":\d+', b'"created":0', raw)

    assert same_second(got) == same_second(expected)
    assert got.endswith(b"data: [DONE]\n\n")
    assert hub.requests[0] == hub.requests[1] == body


@pytest.mark.parametrize(
    ("reply", "error", "status", "code"),
    [
        (Reply(status=500), openai.InternalServerError, 502, "upstream_error"),
        (Reply(status=422), openai.InternalServerError, 502, "upstream_rejected"),
        (Reply(status=429), openai.RateLimitError, 429, "upstream_rate_limited"),
        (Reply(status=504), openai.InternalServerError, 504, "upstream_timeout"),
        (
            Reply(
                status=400,
                error_body={"error": {"message": "This model's maximum context length is 8"}},
            ),
            openai.BadRequestError,
            400,
            "context_length_exceeded",
        ),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
def test_chat_completion_hub_errors_are_mapped(
    router: Stack,
    hub: FakeHub,
    reply: Reply,
    error: type[openai.APIStatusError],
    status: int,
    code: str,
    stream: bool,
) -> None:
    hub.enqueue(reply)
    with pytest.raises(error) as info:
        router.client().chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "x"}], stream=stream
        )
    assert info.value.status_code == status
    assert info.value.code == code


def test_a_stream_that_breaks_off_ends_with_an_error_event(router: Stack, hub: FakeHub) -> None:
    hub.enqueue(Reply(text="a b c d e", break_after_chunks=2))
    stream = router.client().chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "x"}], stream=True
    )
    seen: list[str] = []
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            seen.append(chunk.choices[0].delta.content or "")
    assert seen == ["a", " b"]
    assert "broke off" in info.value.message


def test_a_body_that_is_not_a_json_object_never_reaches_the_hub(
    router: Stack, hub: FakeHub
) -> None:
    with httpx.Client(timeout=10) as http:
        resp = http.post(
            f"{router.url}/chat/completions",
            content=b"[1, 2]",
            headers={"content-type": "application/json"},
        )
    assert resp.status_code == 400
    assert resp.json()["error"]["type"] == "invalid_request_error"
    assert hub.requests == []


# --- authentication ------------------------------------------------------------------------------


def test_api_keys_are_enforced_and_never_sent_to_the_hub(keyed: Stack, hub: FakeHub) -> None:
    for call in (
        lambda c: c.models.list(),
        lambda c: c.models.retrieve("fake-model"),
        lambda c: c.chat.completions.create(
            model="fake-model", messages=[{"role": "user", "content": "x"}]
        ),
    ):
        with pytest.raises(openai.AuthenticationError):
            call(keyed.client("wrong-key"))
    assert hub.requests == []

    client = keyed.client("key-a")
    assert [m.id for m in client.models.list()] == [m["id"] for m in MODELS["data"]]
    completion = client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "x"}]
    )
    assert completion.choices[0].message.content == "echo: x"
    assert all("key-a" not in h.get("authorization", "") for h in hub.headers)


def open_streams(stack: Stack) -> float:
    with httpx.Client(timeout=10) as http:
        text = http.get(f"http://127.0.0.1:{stack.port}/metrics").text
    [value] = re.findall(r"^respgw_router_open_streams (\S+)$", text, re.MULTILINE)
    return float(value)


def test_a_client_that_leaves_mid_stream_releases_the_hub_stream(
    router: Stack, hub: FakeHub
) -> None:
    hub.enqueue(Reply(text=" ".join(["word"] * 50), chunk_delay_s=0.05))
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "x"}], "stream": True}
    with (
        httpx.Client(timeout=10) as http,
        http.stream("POST", f"{router.url}/chat/completions", json=body) as resp,
    ):
        assert resp.status_code == 200
        chunks = resp.iter_raw()  # kept: a dropped iterator closes the response at once
        next(chunks)
        assert open_streams(router) == 1
    deadline = time.monotonic() + 5
    while open_streams(router) != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert open_streams(router) == 0
    completion = router.client().chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "still here"}]
    )
    assert completion.choices[0].message.content == "echo: still here"


def sample(stack: Stack, name: str, labels: str) -> float:
    with httpx.Client(timeout=10) as http:
        text = http.get(f"http://127.0.0.1:{stack.port}/metrics").text
    found = re.findall(rf"^{name}{{{re.escape(labels)}}} (\S+)$", text, re.MULTILINE)
    return float(found[0]) if found else 0.0


def test_passed_through_calls_are_counted_like_every_route(router: Stack, hub: FakeHub) -> None:
    """The router's request and hub metrics count the passed-through calls, and the caller gets
    the request id the hub was sent."""
    requests = 'route="POST /v1/chat/completions",status="200"'
    hub_calls = 'path="/chat/completions",stream="false"'
    models = 'route="GET /v1/models",status="200"'
    before = (
        sample(router, "respgw_router_requests_total", requests),
        sample(router, "respgw_router_hub_latency_seconds_count", hub_calls),
        sample(router, "respgw_router_requests_total", models),
    )
    raw = router.client().chat.completions.with_raw_response.create(
        model="fake-model", messages=[{"role": "user", "content": "x"}]
    )
    router.client().models.list()
    after = (
        sample(router, "respgw_router_requests_total", requests),
        sample(router, "respgw_router_hub_latency_seconds_count", hub_calls),
        sample(router, "respgw_router_requests_total", models),
    )
    assert [b - a for a, b in zip(before, after, strict=True)] == [1, 1, 1]
    assert raw.headers["x-request-id"] == hub.headers[0]["x-request-id"]


# --- models per tenant ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def limited(_hub_server: FakeHub) -> Iterator[Stack]:
    s = Stack(
        _hub_server.url,
        router={
            "api_keys": "key-a=tenant-a,key-b=tenant-b",
            "tenant_models": "tenant-a=fake-model|not-served",
        },
    ).start()
    yield s
    s.stop()


def test_a_tenant_with_models_of_its_own_is_listed_only_those(limited: Stack, hub: FakeHub) -> None:
    a, b = limited.client("key-a"), limited.client("key-b")
    assert [m.id for m in a.models.list()] == ["fake-model"]  # what the hub serves of its list
    assert a.models.retrieve("fake-model").id == "fake-model"
    assert [m.id for m in b.models.list()] == [m["id"] for m in MODELS["data"]]
    assert b.models.retrieve("org/other-model").id == "org/other-model"
    calls = len(hub.requests)
    with pytest.raises(openai.NotFoundError) as info:
        a.models.retrieve("org/other-model")
    assert (info.value.code, info.value.param) == ("model_not_found", "model")
    assert len(hub.requests) == calls, "refused without asking the hub"


def test_a_tenant_may_not_name_another_model_on_any_route_that_calls_the_hub(
    limited: Stack, hub: FakeHub
) -> None:
    a, b = limited.client("key-a"), limited.client("key-b")
    other = "org/other-model"
    message = [{"role": "user", "content": "x"}]
    for call in (
        lambda: a.responses.create(model=other, input="x"),
        lambda: a.responses.create(model=other, input="x", stream=True),
        lambda: a.responses.create(model=other, input="x", background=True),
        lambda: a.responses.compact(model=other, input="x"),
        lambda: a.responses.input_tokens.count(model=other, input="x"),
        lambda: a.chat.completions.create(model=other, messages=message),  # type: ignore[arg-type]
    ):
        with pytest.raises(openai.NotFoundError) as info:
            call()
        assert info.value.code == "model_not_found", info.value
        assert info.value.param == "model"
        assert other in info.value.message
    # Naming none is not a way around it.
    with pytest.raises(openai.BadRequestError) as missing:
        a.responses.input_tokens.count(input="x")
    assert (missing.value.code, missing.value.param) == ("missing_required_parameter", "model")
    assert hub.requests == []
    # Its own model works; another tenant is not limited.
    assert a.responses.create(model="fake-model", input="x").status == "completed"
    assert b.responses.create(model=other, input="x").status == "completed"
    assert a.chat.completions.create(model="fake-model", messages=message).choices  # type: ignore[arg-type]
    assert [r["model"] for r in hub.requests] == ["fake-model", other, "fake-model"]
