"""The request: POST /v1/responses bodies parsed into a :class:`TurnRequest`.

Every field of the request is checked the way OpenAI checks it (the checks and their words are
in :mod:`router_svc.checks`, the field names, enums and tool types in
:mod:`router_svc.vocabulary`, the input items in :mod:`router_svc.inputs`), with ``param`` naming
the field by its dotted path (``input[2].content[0].text``). Fields a chat hub cannot use are
still accepted: the translation drops them from the hub request and the response echoes them.

Besides the fields of OpenAI's ``ResponseCreateParams``, the sampling parameters of Chat
Completions hubs (``presence_penalty``, ``frequency_penalty``, ``seed``, and vLLM's extras such as
``top_k``) are accepted and reach the hub. A top-level field the gateway does not know is ignored,
counted in ``respgw_router_ignored_parameters_total`` and logged once per name, so that clients
keep working when the API grows; with ``strict_params`` it is refused (``unknown_parameter``).

Once every field is well-formed, the request as a whole is checked as OpenAI checks it: a turn
with no input and nothing to continue from, a ``function_call_output`` whose call is nowhere
(when there is no history it could be in), and ``tool_choice: "required"`` without tools are
refused. What a request's hub cannot do (a prompt template or a hosted tool on a Chat
Completions hub) is its dialect's to refuse (``router_svc.dialects.Dialect.refuse``), which the
routes call once the request is parsed: nothing here depends on the hub.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter

from router_svc import checks, errors, inputs, vocabulary
from router_svc.shapes import Item

log = logging.getLogger(__name__)

IGNORED_PARAMETERS = Counter(
    "respgw_router_ignored_parameters_total",
    "Top-level request parameters the router did not know and ignored, by name (64 names at "
    "most; any further name, or one that is not a plain identifier, counts as 'other').",
    ["param"],
)
# The ignored names that get a label of their own: a bounded set, so that clients cannot grow
# the metric without limit.
MAX_IGNORED_NAMES = 64
OTHER_PARAMETER = "other"
_LABEL_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_ignored_names: set[str] = set()
_other_logged = False

MIN_OUTPUT_TOKENS = 16

_FUNCTION_TOOL_KEYS = frozenset(
    {
        "type",
        "name",
        "description",
        "parameters",
        "strict",
        "allowed_callers",
        "async",
        "defer_loading",
        "output_schema",
    }
)


@dataclass
class TurnRequest:
    """A validated POST /v1/responses request."""

    body: dict[str, Any]  # the caller's body, never mutated
    model: str
    input_items: list[Item]  # normalized, each with an id: exactly what gets stored
    instructions: str | None
    store: bool
    stream: bool
    background: bool
    previous_response_id: str | None
    conversation_id: str | None
    metadata: dict[str, str]
    tools: list[dict[str, Any]]
    include: list[str]
    # The positions in input_items of item references ({"type": "item_reference", "id": ...}),
    # which turn.begin replaces by the items they name before anything else reads the input.
    references: tuple[int, ...] = ()
    # The positions of input items sent to the model but not stored with the turn: resolved
    # references to items already in the turn's conversation (see turn.resolve_references).
    unstored: tuple[int, ...] = ()

    def stored_inputs(self) -> list[Item]:
        """The input items stored with the turn."""
        if not self.unstored:
            return self.input_items
        return [item for i, item in enumerate(self.input_items) if i not in self.unstored]


# --- the request -----------------------------------------------------------------------------


def parse_turn_request(
    body: object,
    *,
    default_model: str = "",
    strict_params: bool = False,
) -> TurnRequest:
    """Validates a POST /v1/responses body; raises :class:`errors.InvalidRequest` on any bad field.

    A top-level field the gateway does not know is ignored (and counted), or refused with
    ``unknown_parameter`` when ``strict_params`` is true. What the hub cannot do is not checked
    here: the caller asks its dialect (``Dialect.refuse``).
    """
    if not isinstance(body, dict):
        raise errors.InvalidRequest(
            "Invalid type for request body: expected an object, but got "
            f"{checks.kind(body)} instead.",
            code="invalid_type",
        )
    _unknown_fields(body, strict=strict_params)

    model = body.get("model")
    if model is None or model == "":
        if default_model:
            model = default_model
        elif model == "":
            checks.nonempty(model, "model")
        else:
            raise checks.missing("model")
    model = checks.string(model, "model")

    raw_input = body.get("input")
    input_items = inputs.normalize_items(raw_input, param="input", references=True)
    references: tuple[int, ...] = ()
    if isinstance(raw_input, list):
        references = tuple(
            i for i, item in enumerate(input_items) if item.get("type") == "item_reference"
        )

    instructions = body.get("instructions")
    if instructions is not None:
        checks.string(instructions, "instructions")

    previous = body.get("previous_response_id")
    if previous is not None:
        previous = checks.prefixed_id(previous, "previous_response_id", "resp")

    conversation_id = _conversation(body.get("conversation"))
    if previous is not None and conversation_id is not None:
        raise errors.InvalidRequest(
            "Mutually exclusive parameters: Ensure you are only providing one of: "
            "'previous_response_id' or 'conversation'.",
            param="conversation",
            code="mutually_exclusive_parameters",
        )

    store = _flag(body, "store", default=True)
    stream = _flag(body, "stream", default=False)
    background = _flag(body, "background", default=False)
    if background and not store:
        raise errors.InvalidRequest(
            "Background responses must be stored: 'background' requires 'store' to be true.",
            param="background",
            code="invalid_value",
        )
    if body.get("stream_options") is not None:
        options = checks.obj(body["stream_options"], "stream_options")
        checks.check_keys(options, {"include_obfuscation"}, "stream_options")
        if options.get("include_obfuscation") is not None:
            checks.boolean(options["include_obfuscation"], "stream_options.include_obfuscation")

    metadata = checks.metadata(body.get("metadata"))
    _scalars(body)
    _sampling(body)
    tools = _tools(body.get("tools"))
    if body.get("tool_choice") is not None:
        _tool_choice(body["tool_choice"], tools)
    if body.get("text") is not None:
        _text(body["text"])
    if body.get("reasoning") is not None:
        _reasoning(body["reasoning"])
    include = _include(body.get("include"))
    _other_objects(body)

    # The request as a whole, once each field is well-formed.
    if body.get("tool_choice") == "required" and not tools:
        raise errors.InvalidRequest(
            "Tool choice 'required' must be specified with 'tools' parameter.",
            param="tool_choice",
        )
    has_history = previous is not None or conversation_id is not None
    if not has_history and body.get("prompt") is None:
        # A prompt template may bring the input; a chat hub's dialect refuses the template.
        _has_input(body.get("input"))
    if not has_history and not references:
        # With a history, the call may be in it, and a referenced item may be the call: the turn
        # checks that once it has loaded them.
        check_tool_outputs(input_items)

    req = TurnRequest(
        body=body,
        model=model,
        input_items=input_items,
        instructions=instructions,
        store=store,
        stream=stream,
        background=background,
        previous_response_id=previous,
        conversation_id=conversation_id,
        metadata=metadata,
        tools=tools,
        include=include,
        references=references,
    )
    return req


def _has_input(raw: object) -> None:
    """A turn with nothing to continue from needs input (OpenAI's errors for a missing input and
    an empty array)."""
    if raw is None:
        raise checks.missing("input")
    if isinstance(raw, list) and not raw:
        raise errors.InvalidRequest(
            "Invalid 'input': empty array. Expected an array with minimum length 1, but got an "
            "empty array instead.",
            param="input",
            code="empty_array",
        )


# The item that answers each kind of tool call, and the calls it may answer.
_OUTPUT_CALLS = {
    "function_call_output": ("function_call", "function call"),
    "custom_tool_call_output": ("custom_tool_call", "custom tool call"),
}


def check_tool_outputs(
    items: list[dict[str, Any]], earlier: Collection[Mapping[str, Any]] = ()
) -> None:
    """Refuses a tool call output whose call is neither among ``items`` nor ``earlier`` (the
    history), with OpenAI's error (400, ``param: "input"``, no code).

    :func:`parse_turn_request` checks a request without history; a turn that continues a
    previous response or a conversation checks its input against the history it loaded.
    """
    calls: dict[str, set[str]] = {}
    for item in (*earlier, *items):
        if item.get("type") in ("function_call", "custom_tool_call"):
            calls.setdefault(str(item.get("type")), set()).add(str(item.get("call_id")))
    for item in items:
        kind = _OUTPUT_CALLS.get(str(item.get("type")))
        if kind is None:
            continue
        call_type, words = kind
        if item.get("call_id") not in calls.get(call_type, ()):
            raise errors.InvalidRequest(
                f"No tool call found for {words} output with call_id {item.get('call_id')}.",
                param="input",
            )


def _unknown_fields(body: Mapping[str, Any], *, strict: bool) -> None:
    for key in body:
        if key in vocabulary.KNOWN_FIELDS:
            continue
        if strict:
            raise checks.unknown(key)
        IGNORED_PARAMETERS.labels(_ignored_label(key)).inc()


def _ignored_label(name: str) -> str:
    """The metric label of an ignored parameter; the first time a name is seen, one log line."""
    global _other_logged
    if name in _ignored_names:
        return name
    if len(_ignored_names) < MAX_IGNORED_NAMES and _LABEL_PATTERN.match(name):
        _ignored_names.add(name)
        log.warning(
            "ignoring an unknown request parameter (--strict-params refuses it)",
            extra={"param": name},
        )
        return name
    if not _other_logged:
        _other_logged = True
        log.warning(
            "ignoring unknown request parameters; from now on any new name (or one that is not a "
            f"plain identifier) is counted as '{OTHER_PARAMETER}'"
        )
    return OTHER_PARAMETER


def _flag(body: Mapping[str, Any], key: str, *, default: bool) -> bool:
    value = body.get(key)
    return default if value is None else checks.boolean(value, key)


def _conversation(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return checks.prefixed_id(value, "conversation", "conv")
    if isinstance(value, dict):
        checks.check_keys(value, {"id"}, "conversation")
        return checks.prefixed_id(
            checks.required(value, "id", "conversation"), "conversation.id", "conv"
        )
    raise checks.invalid_type("conversation", "one of a string or an object", value)


# The fields _scalars and _other_objects check (every one they read): a body with none of them
# (most bodies: model and input) skips their walk over every name.
_SCALARS = frozenset(
    {
        "max_output_tokens",
        "max_tool_calls",
        "temperature",
        "top_p",
        "top_logprobs",
        "parallel_tool_calls",
        "truncation",
        "service_tier",
        "prompt_cache_retention",
        "user",
        "prompt_cache_key",
        "safety_identifier",
    }
)
_OTHER_OBJECT_KEYS = ("access_programs", "image", "moderation", "prompt_cache_options")
_OTHER_OBJECTS = frozenset(
    {*_OTHER_OBJECT_KEYS, "background_options", "prompt", "context_management"}
)


def _scalars(body: Mapping[str, Any]) -> None:
    if body.keys().isdisjoint(_SCALARS):
        return

    def present(key: str) -> bool:
        return body.get(key) is not None

    if present("max_output_tokens"):
        checks.integer(body["max_output_tokens"], "max_output_tokens", minimum=MIN_OUTPUT_TOKENS)
    if present("max_tool_calls"):
        checks.integer(body["max_tool_calls"], "max_tool_calls", minimum=0)
    if present("temperature"):
        checks.decimal(body["temperature"], "temperature", minimum=0, maximum=2)
    if present("top_p"):
        checks.decimal(body["top_p"], "top_p", minimum=0, maximum=1)
    if present("top_logprobs"):
        checks.integer(body["top_logprobs"], "top_logprobs", minimum=0, maximum=20)
    if present("parallel_tool_calls"):
        checks.boolean(body["parallel_tool_calls"], "parallel_tool_calls")
    if present("truncation"):
        checks.enum(body["truncation"], "truncation", ("auto", "disabled"))
    if present("service_tier"):
        checks.enum(body["service_tier"], "service_tier", vocabulary.SERVICE_TIERS)
    if present("prompt_cache_retention"):
        checks.enum(body["prompt_cache_retention"], "prompt_cache_retention", ("in_memory", "24h"))
    if present("user"):
        checks.string(body["user"], "user")
    if present("prompt_cache_key"):
        checks.string(body["prompt_cache_key"], "prompt_cache_key")
    if present("safety_identifier"):
        checks.string(body["safety_identifier"], "safety_identifier", max_length=128)


def _sampling(body: Mapping[str, Any]) -> None:
    if body.keys().isdisjoint(_SAMPLING_CHECKS):
        return
    for key, check in _SAMPLING_CHECKS.items():
        if body.get(key) is not None:
            check(body[key], key)


def _penalty(value: object, param: str) -> None:
    checks.decimal(value, param, minimum=-2, maximum=2)


def _stop(value: object, param: str) -> None:
    if isinstance(value, str):
        return
    if not isinstance(value, list):
        raise checks.invalid_type(param, "one of a string or an array of strings", value)
    for i, entry in enumerate(value):
        checks.string(entry, f"{param}[{i}]")


def _integers(value: object, param: str) -> None:
    for i, entry in enumerate(checks.array(value, param)):
        checks.integer(entry, f"{param}[{i}]")


_SAMPLING_CHECKS: dict[str, Callable[[object, str], object]] = {
    "presence_penalty": _penalty,
    "frequency_penalty": _penalty,
    "seed": checks.integer,
    "stop": _stop,
    "top_k": lambda v, p: checks.integer(v, p, minimum=-1),
    "min_p": lambda v, p: checks.decimal(v, p, minimum=0, maximum=1),
    "repetition_penalty": lambda v, p: checks.decimal(v, p, minimum=0, maximum=math.inf),
    "length_penalty": lambda v, p: checks.decimal(v, p, minimum=-math.inf, maximum=math.inf),
    "min_tokens": lambda v, p: checks.integer(v, p, minimum=0),
    "logit_bias": checks.obj,
    "stop_token_ids": _integers,
    "ignore_eos": checks.boolean,
    "skip_special_tokens": checks.boolean,
    "include_stop_str_in_output": checks.boolean,
    "spaces_between_special_tokens": checks.boolean,
    "chat_template_kwargs": checks.obj,
}


def _include(value: object) -> list[str]:
    if value is None:
        return []
    return [
        checks.enum(entry, f"include[{i}]", vocabulary.INCLUDABLE)
        for i, entry in enumerate(checks.array(value, "include"))
    ]


def _text(value: object) -> None:
    text = checks.obj(value, "text")
    checks.check_keys(text, {"format", "verbosity"}, "text")
    if text.get("verbosity") is not None:
        checks.enum(text["verbosity"], "text.verbosity", ("low", "medium", "high"))
    if text.get("format") is None:
        return
    fmt = checks.obj(text["format"], "text.format")
    kind = checks.enum(
        checks.required(fmt, "type", "text.format"),
        "text.format.type",
        ("text", "json_schema", "json_object"),
    )
    if kind != "json_schema":
        checks.check_keys(fmt, {"type"}, "text.format")
        return
    checks.check_keys(fmt, {"type", "name", "schema", "description", "strict"}, "text.format")
    checks.name(checks.required(fmt, "name", "text.format"), "text.format.name")
    checks.obj(checks.required(fmt, "schema", "text.format"), "text.format.schema")
    if fmt.get("description") is not None:
        checks.string(fmt["description"], "text.format.description")
    if fmt.get("strict") is not None:
        checks.boolean(fmt["strict"], "text.format.strict")


def _reasoning(value: object) -> None:
    reasoning = checks.obj(value, "reasoning")
    checks.check_keys(
        reasoning, {"effort", "summary", "generate_summary", "context", "mode"}, "reasoning"
    )
    if reasoning.get("effort") is not None:
        checks.enum(reasoning["effort"], "reasoning.effort", vocabulary.REASONING_EFFORTS)
    for key in ("summary", "generate_summary"):
        if reasoning.get(key) is not None:
            checks.enum(reasoning[key], f"reasoning.{key}", vocabulary.SUMMARIES)
    if reasoning.get("context") is not None:
        checks.enum(
            reasoning["context"], "reasoning.context", ("auto", "current_turn", "all_turns")
        )
    if reasoning.get("mode") is not None:
        checks.string(reasoning["mode"], "reasoning.mode")


def _other_objects(body: Mapping[str, Any]) -> None:
    # Fields that only mean something on OpenAI's platform: the gateway accepts them, echoes what
    # the Response object has of them, and checks what it echoes. Keys it does not know inside
    # them are left alone (these objects grow with OpenAI's platform).
    if body.keys().isdisjoint(_OTHER_OBJECTS):
        return
    for key in _OTHER_OBJECT_KEYS:
        if body.get(key) is not None:
            checks.obj(body[key], key)
    _optional_enum(body, "access_programs", "cyber", _CYBER_PROGRAMS)
    _optional_enum(body, "image", "context_compression", ("auto", "enabled", "disabled"))
    if body.get("moderation") is not None:
        checks.string(
            checks.required(body["moderation"], "model", "moderation"), "moderation.model"
        )
    options = body.get("prompt_cache_options")
    if options is not None:
        _optional_enum(body, "prompt_cache_options", "mode", ("implicit", "explicit"))
        _optional_enum(body, "prompt_cache_options", "ttl", ("30m", "12h"))
        if options.get("comparison_response_id") is not None:
            checks.string(
                options["comparison_response_id"], "prompt_cache_options.comparison_response_id"
            )
        if options.get("prewarm") is not None:
            checks.boolean(options["prewarm"], "prompt_cache_options.prewarm")
    if body.get("background_options") is not None:
        _background_options(body)
    if body.get("prompt") is not None:
        prompt = checks.obj(body["prompt"], "prompt")
        checks.check_keys(prompt, {"id", "version", "variables"}, "prompt")
        checks.string(checks.required(prompt, "id", "prompt"), "prompt.id")
        if prompt.get("version") is not None:
            checks.string(prompt["version"], "prompt.version")
        if prompt.get("variables") is not None:
            checks.obj(prompt["variables"], "prompt.variables")
    if body.get("context_management") is not None:
        for i, entry in enumerate(checks.array(body["context_management"], "context_management")):
            path = f"context_management[{i}]"
            obj = checks.obj(entry, path)
            checks.check_keys(obj, {"type", "compact_threshold"}, path)
            checks.string(checks.required(obj, "type", path), f"{path}.type")
            if obj.get("compact_threshold") is not None:
                checks.integer(obj["compact_threshold"], f"{path}.compact_threshold", minimum=0)


_CYBER_PROGRAMS = ("standard", "daybreak_blue", "daybreak_red")


def _optional_enum(
    body: Mapping[str, Any], parent: str, key: str, allowed: Collection[str]
) -> None:
    """Checks ``body[parent][key]`` (the parent an object already checked) when present."""
    obj = body.get(parent)
    if obj is not None and obj.get(key) is not None:
        checks.enum(obj[key], f"{parent}.{key}", allowed)


def _background_options(body: Mapping[str, Any]) -> None:
    options = checks.obj(body["background_options"], "background_options")
    window = options.get("completion_window")
    if window is not None:
        window = checks.enum(
            window, "background_options.completion_window", ("soonest", "2h", "8h")
        )
    if options.get("continuation_id") is not None:
        checks.string(options["continuation_id"], "background_options.continuation_id")
    if window in ("2h", "8h") and (not body.get("background") or body.get("stream")):
        raise errors.InvalidRequest(
            f"Invalid value for 'background_options.completion_window': the '{window}' "
            "completion window requires 'background' to be true and 'stream' to be false.",
            param="background_options.completion_window",
            code="invalid_value",
        )


# --- tools -----------------------------------------------------------------------------------


def _tools(value: object) -> list[dict[str, Any]]:
    if value is None:
        return []
    return [_tool(raw, f"tools[{i}]") for i, raw in enumerate(checks.array(value, "tools"))]


def _tool(raw: object, path: str) -> dict[str, Any]:
    tool = checks.obj(raw, path)
    kind = checks.enum(checks.required(tool, "type", path), f"{path}.type", vocabulary.TOOL_TYPES)
    if kind == "function":
        checks.check_keys(tool, _FUNCTION_TOOL_KEYS, path)
        checks.name(checks.required(tool, "name", path), f"{path}.name")
        if tool.get("description") is not None:
            checks.string(tool["description"], f"{path}.description")
        if tool.get("parameters") is not None:
            checks.obj(tool["parameters"], f"{path}.parameters")
        if tool.get("strict") is not None:
            checks.boolean(tool["strict"], f"{path}.strict")
    elif kind == "code_interpreter":
        container = checks.required(tool, "container", path)
        if not isinstance(container, str | dict):
            raise checks.invalid_type(
                f"{path}.container", "one of a string or an object", container
            )
    elif kind == "shell" and tool.get("environment") is not None:
        # local (the client runs the commands) or hosted; absent is local (bootstrap.py).
        env_path = f"{path}.environment"
        environment = checks.obj(tool["environment"], env_path)
        checks.enum(
            checks.required(environment, "type", env_path),
            f"{env_path}.type",
            vocabulary.SHELL_ENVIRONMENTS,
        )
    elif kind == "custom":
        checks.string(checks.required(tool, "name", path), f"{path}.name")
    elif kind == "namespace":
        checks.check_keys(tool, {"type", "name", "description", "tools"}, path)
        checks.nonempty(checks.required(tool, "name", path), f"{path}.name")
        if tool.get("description") is not None:
            checks.string(tool["description"], f"{path}.description")
        for j, member in enumerate(
            checks.array(checks.required(tool, "tools", path), f"{path}.tools")
        ):
            mpath = f"{path}.tools[{j}]"
            checks.enum(
                checks.required(checks.obj(member, mpath), "type", mpath),
                f"{mpath}.type",
                ("function", "custom"),
            )
            _tool(member, mpath)
    elif kind == "mcp":
        checks.string(checks.required(tool, "server_label", path), f"{path}.server_label")
    return checks.copy_json(tool)


def _tool_choice(value: object, tools: list[dict[str, Any]]) -> None:
    if isinstance(value, str):
        checks.enum(value, "tool_choice", vocabulary.TOOL_CHOICE_OPTIONS)
        return
    if not isinstance(value, dict):
        raise checks.invalid_type("tool_choice", "one of a string or an object", value)
    kind = checks.string(checks.required(value, "type", "tool_choice"), "tool_choice.type")
    if kind in ("function", "custom"):
        checks.check_keys(value, {"type", "name"}, "tool_choice")
        name = checks.string(checks.required(value, "name", "tool_choice"), "tool_choice.name")
        declared = [*tools, *(m for t in tools if t["type"] == "namespace" for m in t["tools"])]
        if not any(t.get("type") == kind and t.get("name") == name for t in declared):
            raise errors.InvalidRequest(
                f"Invalid value for 'tool_choice': tool '{name}' was not found in 'tools'.",
                param="tool_choice",
                code="invalid_value",
            )
    elif kind == "allowed_tools":
        checks.check_keys(value, {"type", "mode", "tools"}, "tool_choice")
        checks.enum(
            checks.required(value, "mode", "tool_choice"), "tool_choice.mode", ("auto", "required")
        )
        for i, entry in enumerate(
            checks.array(checks.required(value, "tools", "tool_choice"), "tool_choice.tools")
        ):
            _allowed_tool(entry, f"tool_choice.tools[{i}]")
    elif kind == "mcp":
        checks.check_keys(value, {"type", "server_label", "name"}, "tool_choice")
        checks.string(
            checks.required(value, "server_label", "tool_choice"), "tool_choice.server_label"
        )
        if value.get("name") is not None:
            checks.string(value["name"], "tool_choice.name")
    elif kind in vocabulary.HOSTED_TOOL_CHOICES or kind in vocabulary.BARE_TOOL_CHOICES:
        checks.check_keys(value, {"type"}, "tool_choice")
    else:
        raise checks.invalid_value("tool_choice.type", kind, vocabulary.TOOL_CHOICE_TYPES)


def _allowed_tool(value: object, path: str) -> None:
    """One entry of an allowed_tools choice: a tool named as in ``tools`` (its type, and the
    name or server label that tells it from others of its type)."""
    entry = checks.obj(value, path)
    kind = checks.enum(checks.required(entry, "type", path), f"{path}.type", vocabulary.TOOL_TYPES)
    if kind in ("function", "custom"):
        checks.string(checks.required(entry, "name", path), f"{path}.name")
    elif kind == "mcp":
        checks.string(checks.required(entry, "server_label", path), f"{path}.server_label")
    for key in ("name", "server_label"):
        if entry.get(key) is not None:
            checks.string(entry[key], f"{path}.{key}")
