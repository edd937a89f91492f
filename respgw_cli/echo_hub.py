"""A demo model server that echoes the last user message, for trying the gateway without a model.

It speaks just enough of the Chat Completions API (non-streaming and streaming, with usage) for
the router, and a non-streaming Responses API. It is a demo, never a default: point the router at a real model server in production.

To try code_interpreter and shell (``respgw local --echo-hub --bootstrap``): when the router offers
its ``python`` (or ``shell``) tool and the last user message holds a fenced ```python (or ```sh)
block, the echo hub calls the tool with that code, and answers the tool's output with
"The tool said: ...".
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from typing import Any

import orjson
from aiohttp import web

log = logging.getLogger("respgw")


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def _usage(messages: list[dict[str, Any]], text: str) -> dict[str, int]:
    prompt = sum(len(str(m.get("content", "")).split()) for m in messages)
    completion = len(text.split())
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


_FENCE = re.compile(r"```(python|py|sh|bash|shell)?[ \t]*\n(.*?)```", re.DOTALL)


def _tool_turn(body: dict[str, Any], messages: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """The demo of the tool loop: (text, tool call) for this request; the call is empty when the
    echo hub answers with text."""
    last = messages[-1] if messages else {}
    if last.get("role") == "tool":
        return f"The tool said: {str(last.get('content') or '').strip()}", {}
    offered = {
        (t.get("function") or {}).get("name")
        for t in body.get("tools") or []
        if isinstance(t, dict) and t.get("type") == "function"
    }
    found = _FENCE.search(_last_user_text(messages))
    if found is not None:
        language, code = found.group(1) or "python", found.group(2)
        if language in ("python", "py") and "python" in offered:
            return "", {"name": "python", "arguments": orjson.dumps({"code": code}).decode()}
        if language in ("sh", "bash", "shell") and "shell" in offered:
            arguments = orjson.dumps({"commands": [code.strip()]}).decode()
            return "", {"name": "shell", "arguments": arguments}
    return f"You said: {_last_user_text(messages)}", {}


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await request.json(loads=orjson.loads)
    messages = body.get("messages") or []
    text, call = _tool_turn(body, messages)
    if call:
        call = {"id": f"call_{os.urandom(12).hex()}", "type": "function", "function": call}
    model = body.get("model", "echo")
    created = int(time.time())
    if not body.get("stream"):
        message: dict[str, Any] = {"role": "assistant", "content": text or None}
        if call:
            message["tool_calls"] = [call]
        return web.json_response(
            {
                "id": "chatcmpl-echo",
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": message,
                        "finish_reason": "tool_calls" if call else "stop",
                    }
                ],
                "usage": _usage(messages, text),
            },
            dumps=lambda o: orjson.dumps(o).decode(),
        )
    resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await resp.prepare(request)
    base = {
        "id": "chatcmpl-echo",
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
    }
    words = text.split(" ") if text else []
    for i, word in enumerate(words):
        delta: dict[str, Any] = {"content": word if i == 0 else " " + word}
        if i == 0:
            delta["role"] = "assistant"
        chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
        await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
    if call:
        delta = {"role": "assistant", "tool_calls": [{"index": 0, **call}]}
        chunk = {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
        await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
    finish = "tool_calls" if call else "stop"
    done = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}
    await resp.write(b"data: " + orjson.dumps(done) + b"\n\n")
    usage = {**base, "choices": [], "usage": _usage(messages, text)}
    await resp.write(b"data: " + orjson.dumps(usage) + b"\n\ndata: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def responses(request: web.Request) -> web.Response:
    """A non-streaming Responses API answer (``store`` is ignored: nothing is kept), so that the
    router's responses dialect, and gateways that call a Responses API, can be tried too."""
    body = await request.json(loads=orjson.loads)
    raw = body.get("input") or []
    items = [{"role": "user", "content": raw}] if isinstance(raw, str) else raw
    messages = [i for i in items if isinstance(i, dict) and i.get("role")]
    text = f"You said: {_last_user_text(messages)}"
    usage = _usage(messages, text)
    return web.json_response(
        {
            "id": f"resp_{os.urandom(12).hex()}",
            "object": "response",
            "created_at": int(time.time()),
            "status": "completed",
            "model": body.get("model", "echo"),
            "output": [
                {
                    "id": "msg_echo",
                    "type": "message",
                    "role": "assistant",
                    "status": "completed",
                    "content": [{"type": "output_text", "text": text, "annotations": []}],
                }
            ],
            "usage": {
                "input_tokens": usage["prompt_tokens"],
                "output_tokens": usage["completion_tokens"],
                "total_tokens": usage["total_tokens"],
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens_details": {"reasoning_tokens": 0},
            },
        },
        dumps=lambda o: orjson.dumps(o).decode(),
    )


async def models(request: web.Request) -> web.Response:
    return web.json_response(
        {"object": "list", "data": [{"id": "echo", "object": "model", "owned_by": "respgw"}]}
    )


def make_app() -> web.Application:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/responses", responses)
    app.router.add_get("/v1/models", models)
    return app


async def start(host: str, port: int) -> tuple[web.AppRunner, int]:
    """Starts the echo hub in the running loop; returns the runner and the bound port."""
    runner = web.AppRunner(make_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server = site._server
    assert server is not None
    bound: int = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    return runner, bound


async def serve(host: str, port: int) -> None:
    """``respgw echo-hub``: serves until cancelled."""
    runner, bound = await start(host, port)
    log.info(f"echo hub listening on http://{host}:{bound}/v1")
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
