"""POST /v1/responses/input_tokens: the input tokens of the turn a body would make.

The body is POST /v1/responses's (the openai SDK's ``responses.input_tokens.count`` sends
``model``, ``input``, ``instructions``, ``previous_response_id`` or ``conversation``, ``tools``,
``tool_choice``, ``text``, ``reasoning``, ``truncation``, ``personality``), validated as a turn is.
The history is loaded as a turn loads it and the hub request built as the turn would build it
(:meth:`turn.Turn.upstream`, or the tool loop's first round); its tokens are then counted by the
hub's tokenizer or estimated (:mod:`router_svc.tokens`), and the ``x-respgw-token-count`` header
says which (``tokenizer`` or ``estimated``). Nothing is stored, no bootstrap service is called
(the items and tools it would add are not counted) and the model generates nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from router_svc import checks, tokens, tool_loop, turn, validate
from router_svc.http import JSONResponse, check_item_ids, parse_json, read_body, services, tenant
from router_svc.services import Services

# The model of a count that names none on a gateway without --default-model: the tokenizer is
# asked without one (vLLM and SGLang count with the model they serve).
_UNNAMED = "\x00unnamed"
_MAX_PERSONALITY = 64


async def count_input_tokens(request: Request) -> Response:
    svc = services(request)
    who = tenant(request)
    body = parse_json(await read_body(request))
    req = parse_count_request(body, svc)
    svc.auth.check_model(who, "" if req.model == _UNNAMED else req.model)
    check_item_ids(req.input_items, "input")
    t = await turn.begin(svc, req, tenant=who, prepare_tools=False)
    path, upstream = await hub_request(svc, t)
    personality = body.get("personality")
    if personality is not None and path == "/responses":
        upstream["personality"] = personality
    given = req.model != _UNNAMED
    counted, method = await tokens.count(svc, path, upstream, model_given=given)
    return JSONResponse(
        {"object": "response.input_tokens", "input_tokens": counted},
        headers={tokens.COUNT_HEADER: method, **t.headers()},
    )


def parse_count_request(body: dict[str, Any], svc: Services) -> validate.TurnRequest:
    """The body validated as POST /v1/responses validates it (a 400 naming the bad field), as a
    turn that stores nothing; ``personality`` (only this endpoint's) is checked and set aside."""
    personality = body.get("personality")
    if personality is not None:
        checks.nonempty(personality, "personality")
        checks.string(personality, "personality", max_length=_MAX_PERSONALITY)
    fields = {k: v for k, v in body.items() if k != "personality"}
    settings = svc.settings
    req = validate.parse_turn_request(
        fields,
        default_model=settings.default_model or _UNNAMED,
        strict_params=settings.strict_params,
    )
    svc.dialect.refuse(req)
    return dataclasses.replace(req, store=False, stream=False, background=False)


async def hub_request(svc: Services, t: turn.Turn) -> tuple[str, dict[str, Any]]:
    """The hub path and the body the turn's (first) hub call would send, not streamed."""
    if tool_loop.runs_tools(svc, t):
        return "/chat/completions", await tool_loop.first_request(svc, t)
    return t.upstream(svc.dialect, stream=False)


routes = [Route("/v1/responses/input_tokens", count_input_tokens, methods=["POST"])]
