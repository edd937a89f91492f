"""Counting the tokens of a hub request (POST /v1/responses/input_tokens).

The count is of the request a turn would send the hub (history, instructions, tools), by the
hub's own tokenizer when it has one (``--tokenizer``):

- ``auto``, a chat hub: ``POST {root}/tokenize`` with ``model``, ``messages`` and ``tools`` (the
  chat template applied, generation prompt included), answered ``{"count": N, ...}``: the shape
  vLLM and SGLang serve, at the server root (the hub URL without ``/v1``);
- ``auto``, a Responses hub: ``POST {hub}/responses/input_tokens`` (OpenAI's own endpoint);
- ``llamacpp``, a chat hub: llama.cpp's ``POST {root}/apply-template`` (the chat template applied), then
  ``POST {root}/tokenize`` of that prompt, answered ``{"tokens": [...]}``;
- ``off``, or a hub without the endpoint: an estimate, the bytes of the JSON of the request's
  messages (or input), instructions and tools divided by 4.

A hub without the endpoint (404, 405 or 501 that is not the server's own error about the request)
is remembered for :data:`ABSENT_FOR_S`, so it is not asked on every count. A tokenizer that
answers without a count is a 502 ``upstream_malformed_response``, not an estimate: the operator's
hub is broken and a silent estimate would hide it. Every other hub failure maps as for a turn.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any, Literal

import orjson

from router_svc import hub

if TYPE_CHECKING:
    from router_svc.services import Services

log = logging.getLogger(__name__)

# How a count was made, as the x-respgw-token-count header says.
Method = Literal["tokenizer", "estimated"]
COUNT_HEADER = "x-respgw-token-count"

ABSENT_FOR_S = 600.0
# Statuses with which a server says it has no such endpoint.
_ABSENT_STATUSES = frozenset({404, 405, 501})
# The fields of a Responses hub request that OpenAI's input_tokens endpoint takes.
_COUNT_FIELDS = (
    "model",
    "input",
    "instructions",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "reasoning",
    "text",
    "truncation",
    "personality",
)


async def count(
    svc: Services, path: str, body: dict[str, Any], *, model_given: bool
) -> tuple[int, Method]:
    """The input tokens of the hub request ``body`` (for hub path ``path``), and how they were
    counted. ``model_given`` false leaves the model out of the tokenizer's request (the hub
    counts with the model it serves)."""
    mode = svc.settings.tokenizer
    if mode == "off" or time.monotonic() < svc.tokenizer_absent_until:
        return estimate(body), "estimated"
    if path == "/responses":
        counted = await _responses_hub(svc, body, model_given=model_given)
    elif mode == "llamacpp":
        counted = await _llamacpp(svc, body)
    else:
        counted = await _tokenize(svc, body, model_given=model_given)
    if counted is None:
        svc.tokenizer_absent_until = time.monotonic() + ABSENT_FOR_S
        log.warning(
            "the hub has no tokenizer endpoint; token counts are estimated",
            extra={"tokenizer": mode, "retry_after_s": ABSENT_FOR_S},
        )
        return estimate(body), "estimated"
    return counted, "tokenizer"


def estimate(body: dict[str, Any]) -> int:
    """Bytes of the JSON of what the model reads (messages or input, instructions, tools) / 4."""
    text = {k: body[k] for k in ("instructions", "messages", "input", "tools") if k in body}
    return math.ceil(len(orjson.dumps(text)) / 4)


async def _tokenize(svc: Services, body: dict[str, Any], *, model_given: bool) -> int | None:
    request: dict[str, Any] = {"messages": body.get("messages", [])}
    if model_given:
        request["model"] = body.get("model")
    for key in ("tools", "chat_template_kwargs"):
        if body.get(key) is not None:
            request[key] = body[key]
    request["add_generation_prompt"] = True
    answer = await _post(svc, "/tokenize", request, root=True)
    if answer is None:
        return None
    value = answer.get("count")
    if value is None and isinstance(answer.get("tokens"), list):
        value = len(answer["tokens"])
    return _tokens(value, "count")


async def _responses_hub(svc: Services, body: dict[str, Any], *, model_given: bool) -> int | None:
    request = {k: body[k] for k in _COUNT_FIELDS if k in body}
    if not model_given:
        request.pop("model", None)
    answer = await _post(svc, "/responses/input_tokens", request, root=False)
    return None if answer is None else _tokens(answer.get("input_tokens"), "input_tokens")


async def _llamacpp(svc: Services, body: dict[str, Any]) -> int | None:
    request: dict[str, Any] = {"messages": body.get("messages", [])}
    if body.get("tools"):
        request["tools"] = body["tools"]
    applied = await _post(svc, "/apply-template", request, root=True)
    if applied is None:
        return None
    prompt = applied.get("prompt")
    if not isinstance(prompt, str):
        raise hub.malformed("The model server's /apply-template answer has no prompt.")
    # The template writes the special tokens (BOS included) as text: parsed, not added again.
    tokenized = await _post(
        svc,
        "/tokenize",
        {"content": prompt, "add_special": False, "parse_special": True},
        root=True,
    )
    if tokenized is None:
        return None
    tokens = tokenized.get("tokens")
    if not isinstance(tokens, list):
        raise hub.malformed("The model server's /tokenize answer has no tokens.")
    return len(tokens)


async def _post(
    svc: Services, path: str, body: dict[str, Any], *, root: bool
) -> dict[str, Any] | None:
    """The hub's JSON answer, or None when it has no such endpoint."""
    status, raw = await svc.hub.post_raw(path, body, root=root)
    if status in _ABSENT_STATUSES and not _own_error(raw):
        return None
    if status >= 400:
        raise hub.status_error(status, raw)
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise hub.malformed(f"The model server's {path} answer is not JSON.") from exc
    if not isinstance(parsed, dict):
        raise hub.malformed(f"The model server's {path} answer is not a JSON object.")
    return parsed


def _own_error(raw: bytes) -> bool:
    """Whether a 404 is the server's error about the request (vLLM's for an unknown model, in
    OpenAI's error shape) rather than a route it does not serve."""
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return False
    return isinstance(parsed, dict) and isinstance(parsed.get("error"), dict)


def _tokens(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise hub.malformed(f"The model server's token count ('{name}') is not a count.")
    return value
