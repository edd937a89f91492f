"""The tool loop: code_interpreter and shell, run by the gateway for a Chat Completions hub.

A chat model cannot run OpenAI's hosted tools, so when a turn declares ``code_interpreter`` or
``shell``, the bootstrap service prepared a session for it and the execution service runs that
kind of call (:mod:`router_svc.execution`), the model is offered each as a function tool (their
items and how a chat model knew them: :mod:`router_svc.tool_items`). When the model calls one,
the router runs the call in the session, sends the output back as the tool's answer and calls the
model again, until it answers without such a call, calls one of the caller's own tools (those are
returned to the caller, as always), or a limit is reached: the request's ``max_tool_calls`` (a
call beyond it is not run) or ``--tool-max-rounds`` hub calls (the last one is made without the
tools, so the model answers).

A ``shell`` whose ``environment`` is ``local`` (or absent, as in OpenAI's API) is the client's,
as a function tool is: it is offered in every round, needs no session (no bootstrap or execution
call when it is the turn's only stateful tool), and its call is returned to the client as a
``shell_call`` (``environment: {"type": "local"}``), which ends the loop; the client's
``shell_call_output`` in its next request reaches the model as that call's answer
(:func:`router_svc.tool_items.replayable`). ``max_tool_calls`` does not count these calls.

Streamed, the calls have the events of the current SDK
(``response.code_interpreter_call.in_progress``, ``..._code.delta``, ``..._code.done``,
``.interpreting``, ``.completed``; ``response.shell_call_command.added/delta/done``,
``response.shell_call_output_content.delta/done``). Files a call wrote are cited in the answer's
text with ``container_file_citation`` annotations where the text names them.

A sandbox failure (a timeout, a limit, an expired session) is the call's output, never the
turn's failure: the model reads it and answers. A hub failure fails the turn as usual.

This module drives the loop: whether a turn runs it (:func:`runs_tools`), and the rounds of a
whole answer (:func:`answer`). What the rounds share and running one call:
:mod:`router_svc.tool_calls`; the streamed loop: :mod:`router_svc.tool_stream`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from router_svc import bootstrap, errors
from router_svc.dialects import chat
from router_svc.ids import new_id
from router_svc.shapes import Item, ResponseObject
from router_svc.tool_calls import Loop, Turn, executor_of, not_run
from router_svc.tool_items import (
    CODE_INTERPRETER,
    STATEFUL,
    Offer,
    ci_item,
    parse_python,
    parse_shell,
    shell_call_item,
    shell_entries,
    shell_output_item,
    shell_text,
)
from router_svc.tool_stream import StreamLoop as StreamLoop

if TYPE_CHECKING:
    from router_svc.services import Services

# The item types of stateful tool calls a history may hold.
_TOOL_ITEMS = frozenset({"code_interpreter_call", "shell_call", "shell_call_output"})


def runs_tools(svc: Services, turn: Turn) -> bool:
    """True when this module answers the turn: a chat hub, and either a local shell, a
    prepared stateful tool the execution service may run, or stateful tool items in the history
    to replay."""
    if not svc.dialect.tool_loop:
        return False
    if turn.req.tools and any(bootstrap.is_local_shell(t) for t in turn.req.tools):
        return True  # offered to the model; its calls are returned to the client
    if executor_of(svc) is not None and any(
        kind in STATEFUL and prepared.resource_id for kind, prepared in turn.prepared.tools.items()
    ):
        return True
    return _has_tool_items(turn.history) or _has_tool_items(turn.req.input_items)


def _has_tool_items(items: Iterable[Mapping[str, Any]]) -> bool:
    return any(item.get("type") in _TOOL_ITEMS for item in items)


async def first_request(svc: Services, turn: Turn) -> dict[str, Any]:
    """The chat request of the loop's first round, as :func:`answer` would send it (what
    POST /v1/responses/input_tokens counts)."""
    loop = Loop(svc, turn)
    await loop.prepare(stream=False)
    return loop.body(0)


# --- without streaming -------------------------------------------------------------------------


async def answer(svc: Services, turn: Turn) -> ResponseObject:
    """The turn's Response object, after as many rounds as the model needs (not stored here)."""
    loop = Loop(svc, turn)
    await loop.prepare(stream=False)
    status, details = "completed", None
    for round_no in range(loop.settings.max_rounds):
        completion = await svc.hub.post("/chat/completions", loop.body(round_no))
        try:
            answered = chat.from_chat_completion(
                turn.req, completion, response_id=turn.response_id, created_at=turn.created_at
            )
        except (TypeError, KeyError, AttributeError, IndexError, ValueError) as exc:
            # JSON of the wrong shape from the hub (a field of the wrong type) is the hub's fault.
            raise errors.UpstreamError(
                "The model server's answer has fields of the wrong type.",
                code="upstream_malformed_response",
            ) from exc
        loop.add_usage(answered.get("usage"))
        status, details = answered["status"], answered.get("incomplete_details")
        tool_messages: list[dict[str, Any]] = []
        ran = False
        caller_calls = False
        for item in answered["output"]:
            offer = (
                loop.offers.get(str(item.get("name")))
                if item.get("type") == "function_call"
                else None
            )
            if offer is None:
                caller_calls = caller_calls or item.get("type") in (
                    "function_call",
                    "custom_tool_call",
                )
                loop.cite(item)
                loop.output.append(item)
                continue
            text = await _run_whole(loop, offer, item, round_no, complete=status == "completed")
            ran = ran or text is not None
            tool_messages.append(
                {"role": "tool", "tool_call_id": item["call_id"], "content": text or "(not run)"}
            )
        if (
            status != "completed"
            or not ran
            or caller_calls
            or loop.returned
            or round_no + 1 >= loop.settings.max_rounds
        ):
            break
        loop.messages = [*loop.messages, _assistant(completion), *tool_messages]
    return loop.as_response(status, incomplete_details=details)


async def _run_whole(
    loop: Loop, offer: Offer, call: Item, round_no: int, *, complete: bool
) -> str | None:
    """Runs one stateful call of a whole (not streamed) answer and adds its items to the output;
    returns the tool's answer for the model, or None when the call was not run."""
    arguments = str(call.get("arguments") or "")
    call_id = str(call.get("call_id") or new_id("call"))
    reason = "" if complete else "cut"
    if not offer.local:  # a local shell's calls are the client's, as its functions are
        reason = reason or loop.may_run(round_no)
    if offer.kind == CODE_INTERPRETER:
        code, problem = parse_python(arguments)
        item = ci_item(offer, code=code)
        loop.output.append(item)
        if reason:
            item["status"] = "incomplete"
            return None
        if problem:
            result = not_run(problem)
            text = problem
        else:
            result, text = await loop.run_python(offer, code, call_id)
        await loop.finish_ci(item, result)
        return text
    action, problem = parse_shell(arguments)
    shell_call = shell_call_item(offer, call_id, action)
    loop.output.append(shell_call)
    if reason:
        shell_call["status"] = "incomplete"
        return None
    shell_call["status"] = "completed"
    if offer.local and not problem:
        loop.returned += 1  # the client runs it and sends its shell_call_output
        return None
    result = not_run(problem) if problem else await loop.run_shell(offer, action, call_id)
    entries = shell_entries(action, result)
    if problem:
        entries = [{"stdout": "", "stderr": problem, "outcome": {"type": "exit", "exit_code": 1}}]
    output = shell_output_item(call_id, action)
    output.update(status="completed", output=entries)
    loop.output.append(output)
    return (
        shell_text(action, entries, result, loop.settings.output_chars) if not problem else problem
    )


def _assistant(completion: Mapping[str, Any]) -> dict[str, Any]:
    """The hub's answer as the assistant message of the next round's request."""
    message = (completion.get("choices") or [{}])[0].get("message") or {}
    content = message.get("content")
    out: dict[str, Any] = {
        "role": "assistant",
        "content": content if isinstance(content, str) else None,
    }
    calls = [
        {
            "id": c.get("id"),
            "type": "function",
            "function": {
                "name": (c.get("function") or {}).get("name"),
                "arguments": (c.get("function") or {}).get("arguments") or "",
            },
        }
        for c in message.get("tool_calls") or []
        if isinstance(c, dict)
    ]
    if calls:
        out["tool_calls"] = calls
    return out
