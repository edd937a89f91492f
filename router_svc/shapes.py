"""The JSON shapes the router passes around: the Response object, its items and streaming events.

Types only, for readers and mypy: a ``TypedDict`` is a plain ``dict`` at run time, so naming a
shape adds no check, no copy and no cost. The keys are the ones the Responses API uses (the
installed openai SDK's ``Response`` and stream event models, which
``tests/router_svc/test_shapes.py`` holds them to); every key is optional (``total=False``)
because a response stored by an older gateway may lack newer keys, and an event carries only the
keys of its type.

- :class:`ResponseObject`: what POST /v1/responses answers (made by
  :func:`router_svc.response.response_object` whichever dialect answered), stored, and carried by
  the ``response.*`` lifecycle events; :class:`ResponseError` is its ``error``.
- :data:`Item`: an input or output item. Items differ by ``type`` (``message``,
  ``function_call``, ``reasoning``, ``compaction``, tool calls and their outputs, ...) and most
  code reads the keys of one type; a ``TypedDict`` would make every such read a fight with mypy,
  so an item is a JSON object under a name of its own.
- :class:`StreamEvent`: one Responses streaming event (:mod:`router_svc.events`);
  :class:`EventFields` are its keys after ``type`` and ``sequence_number``, what
  :meth:`router_svc.events.Events.make` takes, so mypy checks each key an event is made with.

A stored Response object or event log (parsed JSON) is ``cast`` where it is parsed
(:func:`router_svc.state_records.response_of`, :mod:`router_svc.event_log`), unchecked; a hub's
answer stays plain JSON until a dialect builds the gateway's own from it.
"""

from __future__ import annotations

from typing import Any, TypedDict

# An input or output item: a JSON object whose keys depend on its "type" (see the docstring).
Item = dict[str, Any]


class ResponseError(TypedDict):
    """A Response object's ``error`` (:func:`router_svc.response.error_object`)."""

    code: str
    message: str


class ResponseObject(TypedDict, total=False):
    """The Response object. ``presence_penalty`` and ``frequency_penalty`` are echoed as OpenAI
    echoes them although the SDK's model does not name them."""

    id: str
    object: str
    created_at: int
    status: str
    background: bool | None
    completed_at: int | None
    conversation: dict[str, Any] | None
    error: ResponseError | None
    incomplete_details: dict[str, Any] | None
    instructions: Any
    max_output_tokens: int | None
    max_tool_calls: int | None
    model: str
    output: list[Item]
    parallel_tool_calls: bool
    previous_response_id: str | None
    prompt: Any
    prompt_cache_key: str | None
    prompt_cache_retention: str | None
    reasoning: dict[str, Any] | None
    safety_identifier: str | None
    service_tier: str | None
    store: bool
    temperature: float | None
    text: dict[str, Any]
    tool_choice: Any
    tools: list[dict[str, Any]]
    top_logprobs: int | None
    top_p: float | None
    presence_penalty: float
    frequency_penalty: float
    truncation: str | None
    usage: dict[str, Any] | None
    user: str | None
    metadata: dict[str, str] | None
    access_programs: dict[str, Any] | None
    image: dict[str, Any] | None
    moderation: Any
    prompt_cache_options: dict[str, Any] | None
    prompt_cache_diagnostics: dict[str, Any] | None


class EventFields(TypedDict, total=False):
    """A streaming event's keys after ``type`` and ``sequence_number``: the keys of its type
    (what :meth:`router_svc.events.Events.make` takes)."""

    # The response.* lifecycle events (created, in_progress, completed, incomplete, failed, ...).
    response: ResponseObject
    # Where in the response an event of an item, a part or a text is.
    output_index: int
    item_id: str
    content_index: int
    summary_index: int
    # response.output_item.added / .done
    item: Item
    # response.content_part.added / .done, response.reasoning_summary_part.*
    part: dict[str, Any]
    # The *.delta and *.done events of texts, arguments, code and commands. A delta is a piece
    # of text, but a shell call's output delta is {"stdout" or "stderr": text}.
    delta: Any
    text: str
    refusal: str
    arguments: str
    name: str
    input: str
    code: str | None
    logprobs: list[dict[str, Any]]
    obfuscation: str
    # response.output_text.annotation.added
    annotation: dict[str, Any]
    annotation_index: int
    # response.shell_call_command.*, response.shell_call_output_content.*
    command: str
    command_index: int
    output: list[dict[str, Any]]
    # error
    message: str
    param: str | None


class StreamEvent(EventFields, total=False):
    """One streaming event: ``type`` and ``sequence_number``, then the keys of its type."""

    type: str
    sequence_number: int
