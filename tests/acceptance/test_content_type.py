"""The router takes a JSON body only when it is declared JSON: any other Content-Type, or none, is
a 415 in OpenAI's error shape, before anything is called. A web page can send those bodies to a
gateway on localhost without a CORS preflight (keyless in local mode); ``application/json`` it
cannot."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.fakehub import FakeHub
from tests.support import Stack

BODY = b'{"model": "m", "input": "hello"}'

REFUSED = {
    # The three types a cross-site "simple" request may carry, as a browser sends them.
    "text/plain": "text/plain;charset=UTF-8",
    "form": "application/x-www-form-urlencoded",
    "multipart": "multipart/form-data; boundary=x",
    # fetch() and sendBeacon() send no Content-Type for a Blob or ArrayBuffer body.
    "missing": None,
    "empty": "",
    "another type": "application/xml",
    "json-like name": "text/json",
    "a longer type": "application/jsonp",
}

ACCEPTED = [
    "application/json",
    "application/json; charset=utf-8",
    "Application/JSON",
    "application/json ; charset=UTF-8",
]


@pytest.fixture(scope="module")
def router(_hub_server: FakeHub) -> Iterator[Stack]:
    s = Stack(_hub_server.url, router={"default_model": "fake-model"}).start()
    yield s
    s.stop()


def post(stack: Stack, path: str, content_type: str | None, body: bytes = BODY) -> httpx.Response:
    headers = {} if content_type is None else {"content-type": content_type}
    with httpx.Client(timeout=10) as http:
        request = http.build_request("POST", f"{stack.url}{path}", content=body, headers=headers)
        if content_type is None:
            assert "content-type" not in request.headers
        return http.send(request)


@pytest.mark.parametrize("name", REFUSED)
@pytest.mark.parametrize("path", ["/responses", "/conversations"])
def test_a_body_not_declared_json_is_refused_with_415(
    router: Stack, hub: FakeHub, name: str, path: str
) -> None:
    body = BODY if path == "/responses" else b"{}"
    r = post(router, path, REFUSED[name], body)
    assert r.status_code == 415, r.text
    assert r.json() == {
        "error": {
            "message": r.json()["error"]["message"],
            "type": "invalid_request_error",
            "param": None,
            "code": "unsupported_media_type",
        }
    }
    assert "application/json" in r.json()["error"]["message"]
    assert hub.chat_requests() == [], "the hub was never called"


def test_the_conversation_routes_refuse_it_too(router: Stack, hub: FakeHub) -> None:
    client = router.client()
    conv = client.conversations.create(metadata={"k": "v"})
    items = b'{"items": [{"type": "message", "role": "user", "content": "x"}]}'
    for path, body in [
        (f"/conversations/{conv.id}", b'{"metadata": {"k": "changed"}}'),
        (f"/conversations/{conv.id}/items", items),
    ]:
        r = post(router, path, "text/plain", body)
        assert r.status_code == 415, (path, r.text)
    assert client.conversations.retrieve(conv.id).metadata == {"k": "v"}
    assert list(client.conversations.items.list(conv.id)) == []


@pytest.mark.parametrize("content_type", ACCEPTED)
def test_json_with_any_parameters_and_any_case_is_taken(
    router: Stack, hub: FakeHub, content_type: str
) -> None:
    r = post(router, "/responses", content_type)
    assert r.status_code == 200, r.text
    assert r.json()["output"][0]["content"][0]["text"] == "echo: hello"


def test_the_sdk_is_served(router: Stack, hub: FakeHub) -> None:
    client = router.client()
    assert client.responses.create(model="m", input="hi").output_text == "echo: hi"
    assert client.conversations.create().object == "conversation"
