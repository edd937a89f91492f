"""The one fake of the test suites: a small OpenAI-compatible model server that records every
request it gets and answers from a script.

It serves ``POST /v1/chat/completions`` (whole or streamed), ``POST /v1/responses`` (a hub that
speaks the Responses API), ``GET /v1/models`` (``MODELS``) and, at its root as vLLM does,
``POST /tokenize`` in vLLM's and llama.cpp's shapes, llama.cpp's ``POST /apply-template`` and
OpenAI's ``POST /v1/responses/input_tokens`` (``tokenizer``; see :func:`token_count`), on 127.0.0.1 with a port of its own,
from a thread of its own so that synchronous and asynchronous clients can both use it. Without a
script it echoes the last user message.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

import orjson
from aiohttp import web

# The hub's model list, as vLLM serves it.
MODELS: dict[str, Any] = {
    "object": "list",
    "data": [
        {"id": "fake-model", "object": "model", "created": 1700000000, "owned_by": "fakehub"},
        {"id": "org/other-model", "object": "model", "created": 1700000001, "owned_by": "fakehub"},
    ],
}
# How long a held reply (Reply.hold) waits for the test at most: a test that forgets to release
# the hub fails instead of hanging.
HOLD_TIMEOUT_S = 20.0


@dataclass
class Reply:
    """One scripted answer.

    text / tool_calls / finish_reason / usage shape a normal answer; status+error_body make the
    hub fail; delay_s waits first; hold waits until the test sets it (the hub answers 504 if it
    is not set within HOLD_TIMEOUT_S); malformed sends broken JSON; break_after_chunks cuts a stream.
    A stream that ends cleanly but early: send_finish_reason=False leaves out the chunk with the
    finish_reason, send_done=False the closing ``data: [DONE]`` (chat), send_terminal=False the
    terminal event (a Responses hub); the connection is then closed normally.
    """

    text: str | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str = "stop"
    usage: dict[str, int] | None = None
    status: int = 200
    error_body: Any = None
    delay_s: float = 0.0
    malformed: bool = False
    break_after_chunks: int | None = None
    chunk_delay_s: float = 0.0
    reasoning: str | None = None
    send_finish_reason: bool = True
    send_done: bool = True
    send_terminal: bool = True
    # A chat answer made from the last tool message of the request: "{tool}" is replaced by its
    # content (what a model does with a tool's output).
    text_from_tool: str | None = None
    # Sent as the whole (non-streamed) answer instead of a well-formed one: JSON of the wrong
    # shape, for instance.
    raw_body: bytes | None = None
    # The phase of the message a Responses hub answers with ("commentary", "final_answer").
    phase: str | None = None
    # Set by the test when the hub may answer: what the client got before that came without
    # the hub's answer (no clock involved).
    hold: threading.Event | None = None
    # Sent as the stream's chunks instead of well-formed ones (each a ``data:`` line; a chat
    # stream then ends with ``data: [DONE]``): chunks of the wrong shape, for instance.
    raw_chunks: list[bytes] | None = None


def text_of(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def render(messages: list[dict[str, Any]], tools: list[Any], *, generation_prompt: bool) -> str:
    """The fake model's chat template: each message as ``<|role|> text`` and its tool calls as
    JSON, after the tools as JSON."""
    parts = [f"<|tools|> {orjson.dumps(tools).decode()}"] if tools else []
    for message in messages:
        parts.append(f"<|{message.get('role')}|> {text_of(message)}")
        parts.extend(orjson.dumps(call).decode() for call in message.get("tool_calls") or [])
    if generation_prompt:
        parts.append("<|assistant|>")
    return " ".join(parts)


def token_count(
    messages: list[dict[str, Any]],
    tools: list[Any] | None = None,
    *,
    generation_prompt: bool = True,
) -> int:
    """The fake tokenizer's count: the words of the rendered template."""
    return len(render(messages, tools or [], generation_prompt=generation_prompt).split())


def responses_token_count(body: dict[str, Any]) -> int:
    """The fake Responses hub's count of a request: the words of its instructions, input and
    tools as JSON."""
    text = orjson.dumps([body.get("instructions"), body.get("input"), body.get("tools")])
    return len(text.decode().split())


class FakeHub:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        # The headers of each request, in the order of ``requests``, names lowercased.
        self.headers: list[dict[str, str]] = []
        self.paths: list[str] = []
        self.script: deque[Reply] = deque()
        # Whether POST /tokenize is served (else 404, as a server without it answers).
        self.tokenizer = True
        # When set, the count /tokenize answers instead of the one computed from its messages.
        self.token_count: int | None = None
        # Whether POST /v1/responses/compact is served (OpenAI's, answered from the script's text
        # as the summary) or a 404, as on a hub without it.
        self.compact_endpoint = False
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FakeHub:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def enqueue(self, *replies: Reply) -> None:
        with self._lock:
            self.script.extend(replies)

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self.headers.clear()
            self.paths.clear()
            self.script.clear()
            self.tokenizer = True
            self.token_count = None
            self.compact_endpoint = False

    def tokenize_requests(self) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r, p in zip(self.requests, self.paths, strict=True) if p == "/tokenize"]

    def chat_requests(self) -> list[dict[str, Any]]:
        with self._lock:
            return [
                r
                for r, p in zip(self.requests, self.paths, strict=True)
                if p.endswith("/chat/completions")
            ]

    async def _start(self) -> None:
        app = web.Application(
            client_max_size=64 * 1024 * 1024
        )  # long histories, as a model server takes them
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/responses", self._responses)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/tokenize", self._tokenize)
        app.router.add_post("/v1/responses/input_tokens", self._input_tokens)
        app.router.add_post("/apply-template", self._apply_template)
        app.router.add_post("/v1/responses/compact", self._compact)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]

    def _record(self, body: dict[str, Any], request: web.Request) -> None:
        with self._lock:
            self.requests.append(body)
            self.headers.append({k.lower(): v for k, v in request.headers.items()})
            self.paths.append(request.path)

    def _next(self, body: dict[str, Any], request: web.Request) -> Reply:
        path = request.path
        with self._lock:
            self.requests.append(body)
            self.headers.append({k.lower(): v for k, v in request.headers.items()})
            self.paths.append(path)
            if self.script:
                return self.script.popleft()
        last = ""
        for message in reversed(body.get("messages") or []):
            if message.get("role") == "user":
                last = text_of(message)
                break
        if not body.get("messages"):
            items = body.get("input")
            last = items if isinstance(items, str) else "(items)"
        return Reply(text=f"echo: {last}")

    async def _fail(self, reply: Reply) -> web.Response | None:
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        if reply.hold is not None and not await asyncio.to_thread(reply.hold.wait, HOLD_TIMEOUT_S):
            body = {"error": {"message": "the test never released the hub", "type": "timeout"}}
            return web.json_response(body, status=504)
        if reply.status != 200:
            body = (
                reply.error_body
                if reply.error_body is not None
                else {"error": {"message": "scripted failure", "type": "server_error"}}
            )
            raw = body if isinstance(body, bytes) else orjson.dumps(body)
            return web.Response(status=reply.status, body=raw, content_type="application/json")
        if reply.malformed:
            return web.Response(status=200, body=b'{"choices": [', content_type="application/json")
        if reply.raw_body is not None:
            return web.Response(status=200, body=reply.raw_body, content_type="application/json")
        return None

    async def _models(self, request: web.Request) -> web.Response:
        """The model list (recorded with an empty body); a scripted failure fails it too."""
        reply = self._next({}, request)
        failed = await self._fail(reply)
        if failed is not None:
            return failed
        return web.json_response(MODELS, dumps=lambda o: orjson.dumps(o).decode())

    async def _tokenizer_answer(
        self, body: dict[str, Any], request: web.Request
    ) -> web.Response | None:
        """The answer of a tokenizer endpoint that is off (a 404) or has ``token_count`` set,
        given without taking a scripted reply (those are for the calls that follow); else a
        scripted failure, or None to answer normally."""
        if not self.tokenizer or self.token_count is not None:
            self._record(body, request)
            if not self.tokenizer:
                return web.json_response({"detail": "Not Found"}, status=404)
            return web.json_response({"count": self.token_count, "tokens": []})
        return await self._fail(self._next(body, request))

    async def _tokenize(self, request: web.Request) -> web.Response:
        """vLLM's POST /tokenize of chat messages: ``{"count", "max_model_len", "tokens"}``."""
        body = orjson.loads(await request.read())
        failed = await self._tokenizer_answer(body, request)
        if failed is not None:
            return failed
        if "content" in body:  # llama.cpp's shape: the text of an applied template
            words = str(body["content"]).split()
            return web.json_response({"tokens": list(range(len(words)))})
        count = token_count(
            body.get("messages") or [],
            body.get("tools"),
            generation_prompt=body.get("add_generation_prompt", True),
        )
        answer = {"count": count, "max_model_len": 4096, "tokens": list(range(count))}
        return web.json_response(answer, dumps=lambda o: orjson.dumps(o).decode())

    async def _input_tokens(self, request: web.Request) -> web.Response:
        """OpenAI's POST /v1/responses/input_tokens (when ``tokenizer``)."""
        body = orjson.loads(await request.read())
        failed = await self._tokenizer_answer(body, request)
        if failed is not None:
            return failed
        answer = {"object": "response.input_tokens", "input_tokens": responses_token_count(body)}
        return web.json_response(answer)

    async def _apply_template(self, request: web.Request) -> web.Response:
        """llama.cpp's POST /apply-template: ``{"prompt"}``, the chat template applied."""
        body = orjson.loads(await request.read())
        failed = await self._tokenizer_answer(body, request)
        if failed is not None:
            return failed
        prompt = render(body.get("messages") or [], body.get("tools") or [], generation_prompt=True)
        return web.json_response({"prompt": prompt})

    async def _compact(self, request: web.Request) -> web.Response:
        if not self.compact_endpoint:
            return web.Response(status=404, text="Not Found")
        body = orjson.loads(await request.read())
        reply = self._next(body, request)
        users = [i for i in body.get("input") or [] if i.get("role") == "user"]
        item = {
            "id": "cmp_upstream",
            "type": "compaction",
            "encrypted_content": f"hub:{reply.text}",
        }
        answer = {
            "id": "resp_upstream_compact",
            "object": "response.compaction",
            "created_at": int(time.time()),
            "output": [*users, item],
            "usage": {
                "input_tokens": 11,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": 7,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": 18,
            },
        }
        return web.json_response(answer, dumps=lambda o: orjson.dumps(o).decode())

    def _usage(self, reply: Reply) -> dict[str, Any]:
        return reply.usage or {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        reply = self._next(body, request)
        if reply.text_from_tool is not None:
            tool = next(
                (
                    text_of(m)
                    for m in reversed(body.get("messages") or [])
                    if m.get("role") == "tool"
                ),
                "",
            )
            reply = replace(reply, text=reply.text_from_tool.replace("{tool}", tool))
        failed = await self._fail(reply)
        if failed is not None:
            return failed
        created = int(time.time())
        base = {"id": "chatcmpl-fake", "created": created, "model": body.get("model", "fake")}
        if not body.get("stream"):
            message: dict[str, Any] = {"role": "assistant", "content": reply.text}
            if reply.reasoning is not None:
                message["reasoning_content"] = reply.reasoning
            if reply.tool_calls:
                message["tool_calls"] = [
                    {
                        "id": c["id"],
                        "type": "function",
                        "function": {"name": c["name"], "arguments": c["arguments"]},
                    }
                    for c in reply.tool_calls
                ]
            return web.json_response(
                {
                    **base,
                    "object": "chat.completion",
                    "choices": [
                        {"index": 0, "message": message, "finish_reason": reply.finish_reason}
                    ],
                    "usage": self._usage(reply),
                },
                dumps=lambda o: orjson.dumps(o).decode(),
            )
        return await self._chat_stream(request, body, reply, base)

    async def _chat_stream(
        self, request: web.Request, body: dict[str, Any], reply: Reply, base: dict[str, Any]
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        if reply.raw_chunks is not None:
            for raw in reply.raw_chunks:
                await resp.write(b"data: " + raw + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        chunks: list[dict[str, Any]] = []
        if reply.reasoning:
            # vLLM's reasoning parsers stream the thinking first, as reasoning_content deltas.
            half = len(reply.reasoning) // 2
            chunks.append({"role": "assistant", "reasoning_content": reply.reasoning[:half]})
            chunks.append({"reasoning_content": reply.reasoning[half:]})
        if reply.text:
            pieces = reply.text.split(" ")
            for i, piece in enumerate(pieces):
                delta: dict[str, Any] = {"content": piece if i == 0 else " " + piece}
                if i == 0:
                    delta["role"] = "assistant"
                chunks.append(delta)
        for index, call in enumerate(reply.tool_calls):
            args = call["arguments"]
            half = len(args) // 2
            chunks.append(
                {
                    "tool_calls": [
                        {
                            "index": index,
                            "id": call["id"],
                            "type": "function",
                            "function": {"name": call["name"], "arguments": args[:half]},
                        }
                    ]
                }
            )
            chunks.append(
                {"tool_calls": [{"index": index, "function": {"arguments": args[half:]}}]}
            )
        sent = 0
        for delta in chunks:
            if reply.break_after_chunks is not None and sent >= reply.break_after_chunks:
                # Cut the connection without a terminating chunk, as a crashing server would.
                transport = request.transport
                if transport is not None:
                    transport.abort()
                return resp
            if reply.chunk_delay_s:
                await asyncio.sleep(reply.chunk_delay_s)
            chunk = {
                **base,
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
            }
            await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
            sent += 1
        if reply.malformed:
            await resp.write(b"data: {not json\n\n")
            await resp.write_eof()
            return resp
        end = {
            **base,
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": {}, "finish_reason": reply.finish_reason}],
        }
        if reply.send_finish_reason:
            await resp.write(b"data: " + orjson.dumps(end) + b"\n\n")
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {
                **base,
                "object": "chat.completion.chunk",
                "choices": [],
                "usage": self._usage(reply),
            }
            await resp.write(b"data: " + orjson.dumps(usage) + b"\n\n")
        if reply.send_done:
            await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        """A Responses-API hub (like OpenAI itself), non-streaming and streaming."""
        body = orjson.loads(await request.read())
        reply = self._next(body, request)
        failed = await self._fail(reply)
        if failed is not None:
            return failed
        text = reply.text or ""
        item = {
            "id": "msg_upstream1",
            "type": "message",
            "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
        }
        if reply.phase is not None:
            item["phase"] = reply.phase
        usage = {
            "input_tokens": 11,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": 7,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 18,
        }
        response = {
            "id": "resp_upstream1",
            "object": "response",
            "created_at": int(time.time()),
            "status": "completed",
            "model": body.get("model", "fake"),
            "output": [item],
            "usage": usage,
            "store": False,
        }
        if not body.get("stream"):
            return web.json_response(response, dumps=lambda o: orjson.dumps(o).decode())
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        if reply.raw_chunks is not None:
            for raw in reply.raw_chunks:
                await resp.write(b"data: " + raw + b"\n\n")
            await resp.write_eof()
            return resp
        in_progress = {**response, "status": "in_progress", "output": [], "usage": None}
        empty_item = {**item, "status": "in_progress", "content": []}
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        events: list[dict[str, Any]] = [
            {"type": "response.created", "response": in_progress},
            {"type": "response.in_progress", "response": in_progress},
            {"type": "response.output_item.added", "output_index": 0, "item": empty_item},
            {
                "type": "response.content_part.added",
                "item_id": item["id"],
                "output_index": 0,
                "content_index": 0,
                "part": part,
            },
        ]
        for piece in [text[: len(text) // 2], text[len(text) // 2 :]]:
            events.append(
                {
                    "type": "response.output_text.delta",
                    "item_id": item["id"],
                    "output_index": 0,
                    "content_index": 0,
                    "delta": piece,
                    "logprobs": [],
                }
            )
        events += [
            {
                "type": "response.output_text.done",
                "item_id": item["id"],
                "output_index": 0,
                "content_index": 0,
                "text": text,
                "logprobs": [],
            },
            {
                "type": "response.content_part.done",
                "item_id": item["id"],
                "output_index": 0,
                "content_index": 0,
                "part": {**part, "text": text},
            },
            {"type": "response.output_item.done", "output_index": 0, "item": item},
        ]
        if reply.send_terminal:
            events.append({"type": "response.completed", "response": response})
        for seq, event in enumerate(events):
            event["sequence_number"] = seq
            await resp.write(
                b"event: " + event["type"].encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"
            )
        await resp.write_eof()
        return resp
