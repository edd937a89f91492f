"""OpenAI's Containers API through the openai SDK, over the reference execution service: containers
and their files, tenant-scoped, and code_interpreter running in a named container."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.acceptance.test_code_interpreter import CODE_INTERPRETER, Bootstrap, python
from tests.fakehub import FakeHub, Reply
from tests.support import Stack


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Bootstrap]:
    b = Bootstrap(tmp_path / "sessions", call_timeout_s=5.0)
    yield b
    b.stop()


@pytest.fixture
def gateway(hub: FakeHub, sandbox: Bootstrap) -> Iterator[Stack]:
    s = Stack(
        hub.url,
        router={"bootstrap_address": sandbox.address, "api_keys": "key-a=acme,key-b=globex"},
    ).start()
    yield s
    s.stop()


def test_a_file_written_in_turn_one_is_listed_and_downloaded(gateway: Stack, hub: FakeHub) -> None:
    client = gateway.client("key-a")
    code = "with open('report.csv', 'w') as f:\n    f.write('city,temp\\nParis,21\\n')"
    hub.enqueue(python(code), Reply(text="Wrote /mnt/data/report.csv."))
    response = client.responses.create(model="m", input="Make a report", tools=[CODE_INTERPRETER])
    container_id = response.output[0].container_id  # type: ignore[union-attr]
    annotation = response.output[1].content[0].annotations[0]  # type: ignore[union-attr]
    assert annotation.type == "container_file_citation"
    assert annotation.container_id == container_id and annotation.filename == "report.csv"
    files = list(client.containers.files.list(container_id))
    assert [(f.path, f.bytes, f.source) for f in files] == [
        ("/mnt/data/report.csv", 19, "assistant")
    ]
    assert files[0].id == annotation.file_id
    content = client.containers.files.content.retrieve(files[0].id, container_id=container_id)
    assert content.read() == b"city,temp\nParis,21\n"
    container = client.containers.retrieve(container_id)
    assert container.id == container_id and container.status == "running"
    assert container.expires_after is not None and container.expires_after.minutes == 20


def test_containers_create_list_retrieve_delete(gateway: Stack) -> None:
    client = gateway.client("key-a")
    made = client.containers.create(
        name="analysis", expires_after={"anchor": "last_active_at", "minutes": 5}, memory_limit="1g"
    )
    assert made.id.startswith("cntr_") and made.object == "container"
    assert made.name == "analysis" and made.memory_limit == "1g"
    assert made.expires_after is not None and made.expires_after.minutes == 5
    other = client.containers.create(name="other")
    assert [c.id for c in client.containers.list(order="asc")] == [made.id, other.id]
    assert [c.id for c in client.containers.list(name="analysis")] == [made.id]
    page = client.containers.list(limit=1, order="asc")
    assert [c.id for c in page.data] == [made.id] and page.has_more
    assert [c.id for c in client.containers.list(limit=1, order="asc", after=made.id)] == [other.id]
    assert client.containers.retrieve(made.id).model_dump() == made.model_dump()
    # Another tenant sees none of it.
    foreign = gateway.client("key-b")
    assert list(foreign.containers.list()) == []
    with pytest.raises(openai.NotFoundError):
        foreign.containers.retrieve(made.id)
    with pytest.raises(openai.NotFoundError):
        foreign.containers.delete(made.id)
    client.containers.delete(made.id)
    with pytest.raises(openai.NotFoundError):
        client.containers.retrieve(made.id)
    assert [c.id for c in client.containers.list()] == [other.id]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "name"),
        ({"name": "x", "memory_limit": "2g"}, "memory_limit"),
        ({"name": "x", "expires_after": {"anchor": "created_at", "minutes": 5}}, "expires_after"),
        ({"name": "x", "file_ids": ["file-1"]}, "file_ids"),
        ({"name": "x", "network_policy": {"type": "allowlist"}}, "network_policy"),
    ],
)
def test_container_create_refusals(gateway: Stack, body: dict[str, Any], param: str) -> None:
    with httpx.Client(timeout=10, headers={"authorization": "Bearer key-a"}) as http:
        r = http.post(f"{gateway.url}/containers", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_files_upload_list_content_delete_and_code_in_that_container(
    gateway: Stack, hub: FakeHub
) -> None:
    client = gateway.client("key-a")
    container = client.containers.create(name="data")
    uploaded = client.containers.files.create(
        container.id, file=("numbers.txt", b"1\n2\n3\n", "text/plain")
    )
    assert uploaded.path == "/mnt/data/numbers.txt" and uploaded.bytes == 6
    assert uploaded.source == "user" and uploaded.container_id == container.id
    assert (
        client.containers.files.retrieve(uploaded.id, container_id=container.id).id == uploaded.id
    )
    # code_interpreter with {"container": id} runs in that container.
    hub.enqueue(
        python("print(sum(int(x) for x in open('numbers.txt')))"),
        Reply(text_from_tool="The sum is {tool}."),
    )
    answer = client.responses.create(
        model="m",
        input="Sum the numbers",
        tools=[{"type": "code_interpreter", "container": container.id}],
    )
    assert answer.output_text == "The sum is 6."
    assert answer.output[0].container_id == container.id  # type: ignore[union-attr]
    # A file of one container copied into another by its id.
    target = client.containers.create(name="copy")
    with httpx.Client(timeout=10, headers={"authorization": "Bearer key-a"}) as http:
        r = http.post(f"{gateway.url}/containers/{target.id}/files", json={"file_id": uploaded.id})
    assert r.status_code == 200, r.text
    copied = r.json()
    assert copied["path"] == "/mnt/data/numbers.txt" and copied["bytes"] == 6
    assert (
        client.containers.files.content.retrieve(copied["id"], container_id=target.id).read()
        == b"1\n2\n3\n"
    )
    client.containers.files.delete(uploaded.id, container_id=container.id)
    assert list(client.containers.files.list(container.id)) == []
    with pytest.raises(openai.NotFoundError):
        client.containers.files.content.retrieve(uploaded.id, container_id=container.id)
    # Another tenant can neither list nor upload.
    foreign = gateway.client("key-b")
    with pytest.raises(openai.NotFoundError):
        list(foreign.containers.files.list(target.id))
    with pytest.raises(openai.NotFoundError):
        foreign.containers.files.create(target.id, file=("x.txt", b"x"))


def test_an_auto_container_gets_its_memory_limit(gateway: Stack, hub: FakeHub) -> None:
    client = gateway.client("key-a")
    code = "import resource\nprint(resource.getrlimit(resource.RLIMIT_AS)[0] >> 20)"
    hub.enqueue(python(code), Reply(text_from_tool="{tool} MiB"))
    auto: Any = {"type": "code_interpreter", "container": {"type": "auto", "memory_limit": "4g"}}
    response = client.responses.create(model="m", input="How much memory?", tools=[auto])
    assert response.output_text == "4096 MiB"
    container_id = response.output[0].container_id  # type: ignore[union-attr]
    assert client.containers.retrieve(container_id).memory_limit == "4g"
    # What the sessions cannot honour is refused before anything runs.
    calls = len(hub.chat_requests())
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(
            model="m",
            input="x",
            tools=[
                {"type": "code_interpreter", "container": {"type": "auto", "file_ids": ["file-1"]}}
            ],
        )
    assert info.value.param == "tools[0].container.file_ids"
    assert len(hub.chat_requests()) == calls


def test_an_upload_cannot_leave_the_container(gateway: Stack) -> None:
    client = gateway.client("key-a")
    container = client.containers.create(name="safe")
    made = client.containers.files.create(container.id, file=("../../etc/passwd", b"x"))
    assert made.path == "/mnt/data/passwd"


def test_a_deleted_container_cannot_run_code(gateway: Stack, hub: FakeHub) -> None:
    client = gateway.client("key-a")
    container = client.containers.create(name="gone")
    client.containers.delete(container.id)
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(
            model="m", input="x", tools=[{"type": "code_interpreter", "container": container.id}]
        )
    assert info.value.code == "stateful_tool_bootstrap_failed"


def test_without_an_execution_service_the_api_says_so(stack: Stack) -> None:
    with httpx.Client(timeout=10) as http:
        r = http.get(f"{stack.url}/containers")
    assert r.status_code == 501 and r.headers["x-should-retry"] == "false"
    assert r.json()["error"]["code"] == "containers_unavailable"
    assert json.loads(r.text)["error"]["type"] == "server_error"
