"""Replay: a stored response's event stream, rebuilt from the response (or its stored events).

:func:`replay_events` rebuilds the sequence the live stream sent (:mod:`router_svc.events`, and
:mod:`router_svc.tool_stream` for the calls the tool loop ran), event type for event type, with
one delta per content part (the stored response does not keep the hub's chunk boundaries); :func:`stored_stream` is what GET /v1/responses/{id}?stream=true sends: the
events stored with the response (:mod:`router_svc.event_log`, expanded) or that rebuilt sequence
(:func:`stored_stream_iter` makes them one at a time, as they are sent).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from router_svc.event_log import expand_log, iter_log
from router_svc.events import Events
from router_svc.inputs import output_text
from router_svc.shapes import Item, ResponseObject, StreamEvent


def stored_stream(
    response: ResponseObject, events: list[dict[str, Any]] | None
) -> list[StreamEvent]:
    """The events a stored response is streamed with: the ones stored with it, or
    :func:`replay_events`. Either way the stream opens with ``response.created``; a log that
    holds only its end (a background response cancelled before it ran) is told from
    ``response.created`` on, and a cancelled response ends with ``response.cancelled``."""
    sent = expand_log(events, response) if events else []
    if not sent or sent[0].get("type") != "response.created":
        sent = replay_events(response)
    if response.get("status") == "cancelled" and sent[-1]["type"] != "response.cancelled":
        sent = [
            *sent,
            {"type": "response.cancelled", "sequence_number": len(sent), "response": response},
        ]
    return sent


def stored_stream_iter(
    response: ResponseObject, events: list[dict[str, Any]] | None
) -> Iterator[StreamEvent]:
    """:func:`stored_stream` one event at a time: the events of a stored log are made as they
    are sent (GET /v1/responses/{id}?stream=true), not all at once."""
    # The first and last records of a log have the types of the first and last events.
    if not events or events[0].get("type") != "response.created":
        yield from stored_stream(response, events)
        return
    count = 0
    last: StreamEvent = {}
    for last in iter_log(events, response):
        count += 1
        yield last
    if response.get("status") == "cancelled" and last.get("type") != "response.cancelled":
        yield {"type": "response.cancelled", "sequence_number": count, "response": response}


def replay_events(response: ResponseObject) -> list[StreamEvent]:
    """The whole event sequence of a stored response, from ``response.created`` at sequence 0.

    A queued or in-progress response gets no terminal event (it has none yet); a cancelled one
    gets none either, since the Responses API has no event for it.
    """
    events = Events()
    status = response.get("status")
    snapshot: ResponseObject = {
        **response,
        "status": "queued" if status == "queued" else "in_progress",
        "completed_at": None,
        "error": None,
        "incomplete_details": None,
        "output": [],
        "usage": None,
    }
    out = [
        events.make("response.created", response=snapshot),
        events.make("response.in_progress", response={**snapshot, "status": "in_progress"}),
    ]
    if status == "queued":
        return out[:1]
    failed = status == "failed"
    for index, item in enumerate(response.get("output") or []):
        # In a failed response an incomplete item is one the failure left open.
        closed = not (failed and item.get("status") in ("incomplete", "in_progress"))
        out += _replay_item(events, index, item, closed=closed)
    if status == "completed":
        out.append(events.make("response.completed", response=response))
    elif status == "incomplete":
        out.append(events.make("response.incomplete", response=response))
    elif failed:
        error: Mapping[str, Any] = response.get("error") or {}
        out.append(
            events.make(
                "error",
                code=error.get("code"),
                message=error.get("message", ""),
                param=error.get("param"),
            )
        )
        out.append(events.make("response.failed", response=response))
    return out


def _replay_item(events: Events, index: int, item: Item, *, closed: bool) -> list[StreamEvent]:
    kind = item.get("type")
    item_id = item.get("id", "")
    common: dict[str, Any] = {"item_id": item_id, "output_index": index}
    opened = {**item}
    if "status" in item:
        opened["status"] = "in_progress"
    out: list[StreamEvent] = []
    if kind == "message":
        opened["content"] = []
        out.append(events.make("response.output_item.added", output_index=index, item=opened))
        parts = item.get("content") or []
        for j, part in enumerate(parts):
            out += _replay_part(events, common, j, part, closed=closed or j < len(parts) - 1)
    elif kind == "reasoning":
        opened["summary"] = []
        if "content" in item:
            opened["content"] = []
        out.append(events.make("response.output_item.added", output_index=index, item=opened))
        for j, summary in enumerate(item.get("summary") or []):
            text = summary.get("text", "")
            out.append(
                events.make(
                    "response.reasoning_summary_part.added",
                    **common,
                    summary_index=j,
                    part={"type": "summary_text", "text": ""},
                )
            )
            if text:
                out.append(
                    events.make(
                        "response.reasoning_summary_text.delta",
                        **common,
                        summary_index=j,
                        delta=text,
                    )
                )
            out.append(
                events.make(
                    "response.reasoning_summary_text.done", **common, summary_index=j, text=text
                )
            )
            out.append(
                events.make(
                    "response.reasoning_summary_part.done",
                    **common,
                    summary_index=j,
                    part={"type": "summary_text", "text": text},
                )
            )
        parts = item.get("content") or []
        for j, part in enumerate(parts):
            out += _replay_part(events, common, j, part, closed=closed or j < len(parts) - 1)
    elif kind == "function_call":
        opened["arguments"] = ""
        out.append(events.make("response.output_item.added", output_index=index, item=opened))
        arguments = item.get("arguments", "")
        if arguments:
            out.append(
                events.make("response.function_call_arguments.delta", **common, delta=arguments)
            )
        if closed:
            out.append(
                events.make(
                    "response.function_call_arguments.done",
                    **common,
                    name=item.get("name", ""),
                    arguments=arguments,
                )
            )
    elif kind in ("code_interpreter_call", "shell_call", "shell_call_output"):
        out += _replay_tool_item(events, common, item, opened, closed=closed)
    elif kind == "compaction":
        # As the live stream sent it: the summary is sealed once it is made.
        opened["encrypted_content"] = ""
        out.append(events.make("response.output_item.added", output_index=index, item=opened))
        out.append(events.make("response.compaction.compacting", **common))
    else:
        out.append(events.make("response.output_item.added", output_index=index, item=opened))
    if closed:
        out.append(events.make("response.output_item.done", output_index=index, item=item))
    return out


def _replay_tool_item(
    events: Events, common: dict[str, Any], item: Item, opened: Item, *, closed: bool
) -> list[StreamEvent]:
    """The events of an item the tool loop ran (router_svc.tool_stream), up to its
    ``output_item.done``: a code_interpreter call's code and states, a shell call's commands, a
    shell output's stdout and stderr (one delta each per command)."""
    index = common["output_index"]
    kind = item.get("type")
    out: list[StreamEvent] = []
    if kind == "code_interpreter_call":
        opened.update(code="", outputs=None)
        out.append(events.make("response.output_item.added", output_index=index, item=opened))
        out.append(events.make("response.code_interpreter_call.in_progress", **common))
        code = item.get("code") or ""
        if code:
            out.append(
                events.make("response.code_interpreter_call_code.delta", **common, delta=code)
            )
        if closed:
            out.append(events.make("response.code_interpreter_call_code.done", **common, code=code))
            if item.get("status") in ("completed", "failed"):
                out.append(events.make("response.code_interpreter_call.interpreting", **common))
                out.append(events.make("response.code_interpreter_call.completed", **common))
    elif kind == "shell_call":
        action = item.get("action") or {}
        opened["action"] = {**action, "commands": []}
        out.append(events.make("response.output_item.added", output_index=index, item=opened))
        if closed:
            for i, command in enumerate(action.get("commands") or []):
                where = {"command_index": i, "output_index": index}
                out.append(events.make("response.shell_call_command.added", **where, command=""))
                out.append(events.make("response.shell_call_command.delta", **where, delta=command))
                out.append(
                    events.make("response.shell_call_command.done", **where, command=command)
                )
    else:
        opened["output"] = []
        out.append(events.make("response.output_item.added", output_index=index, item=opened))
        entries = item.get("output") or []
        for i, entry in enumerate(entries):
            for stream in ("stdout", "stderr"):
                if entry.get(stream):
                    out.append(
                        events.make(
                            "response.shell_call_output_content.delta",
                            **common,
                            command_index=i,
                            delta={stream: entry[stream]},
                        )
                    )
        if closed:
            for i, entry in enumerate(entries):
                out.append(
                    events.make(
                        "response.shell_call_output_content.done",
                        **common,
                        command_index=i,
                        output=[entry],
                    )
                )
    return out


def _replay_part(
    events: Events,
    common: dict[str, Any],
    content_index: int,
    part: dict[str, Any],
    *,
    closed: bool,
) -> list[StreamEvent]:
    kind = part.get("type")
    where = {**common, "content_index": content_index}
    out: list[StreamEvent] = []
    if kind == "output_text":
        text = part.get("text", "")
        logprobs = part.get("logprobs") or []
        out.append(events.make("response.content_part.added", **where, part=output_text("")))
        if text:
            out.append(
                events.make("response.output_text.delta", **where, delta=text, logprobs=logprobs)
            )
        if closed:
            for n, annotation in enumerate(part.get("annotations") or []):
                out.append(
                    events.make(
                        "response.output_text.annotation.added",
                        **where,
                        annotation_index=n,
                        annotation=annotation,
                    )
                )
            out.append(
                events.make("response.output_text.done", **where, text=text, logprobs=logprobs)
            )
    elif kind == "refusal":
        text = part.get("refusal", "")
        out.append(
            events.make(
                "response.content_part.added", **where, part={"type": "refusal", "refusal": ""}
            )
        )
        if text:
            out.append(events.make("response.refusal.delta", **where, delta=text))
        if closed:
            out.append(events.make("response.refusal.done", **where, refusal=text))
    else:
        text = part.get("text", "")
        out.append(
            events.make(
                "response.content_part.added", **where, part={"type": str(kind), "text": ""}
            )
        )
        if text:
            out.append(events.make("response.reasoning_text.delta", **where, delta=text))
        if closed:
            out.append(events.make("response.reasoning_text.done", **where, text=text))
    if closed:
        out.append(events.make("response.content_part.done", **where, part=part))
    return out
