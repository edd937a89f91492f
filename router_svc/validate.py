"""Validation of POST /v1/responses bodies, and the input items they become once stored.

Every field of the request is checked the way OpenAI checks it, with OpenAI's error messages and
codes (``unknown_parameter``, ``invalid_type``, ``invalid_value``, ``missing_required_parameter``,
``integer_below_min_value``, ...), and ``param`` naming the field by its dotted path
(``input[2].content[0].text``). Fields a chat hub cannot use are still accepted: the translation
drops them from the hub request and the response echoes them.

Besides the fields of OpenAI's ``ResponseCreateParams``, the sampling parameters of Chat
Completions hubs (``presence_penalty``, ``frequency_penalty``, ``seed``, and vLLM's extras such as
``top_k``) are accepted and reach the hub. A top-level field the gateway does not know is ignored,
counted in ``respgw_router_ignored_parameters_total`` and logged once per name, so that clients
keep working when the API grows; with ``strict_params`` it is refused (``unknown_parameter``).

Input items are normalized into what the Responses API serves back from ``input_items`` and
conversation listings: a string input becomes one user message, message content becomes a list of
parts, and every item gets an id (``msg_``, ``fc_``, ``fco_`` ...) and a status where OpenAI has one.

Once every field is well-formed, the request as a whole is checked as OpenAI checks it: a turn
with no input and nothing to continue from, a ``function_call_output`` whose call is nowhere
(when there is no history it could be in), and ``tool_choice: "required"`` without tools are
refused. What a Chat Completions hub cannot do is refused too (:func:`check_chat_hub`): a
``prompt`` template, which the gateway cannot resolve, and the tools nobody would run; the web
search tools (and the stateful ones when no execution service runs them) are accepted but not
offered to the model, and are reported (:data:`CHAT_NOT_RUN_TOOLS`).
"""

from __future__ import annotations

import copy
import logging
import math
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson
from prometheus_client import Counter

from router_svc import errors
from router_svc.ids import new_id

_T = TypeVar("_T")

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

MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
MIN_OUTPUT_TOKENS = 16

_NAME_PATTERN = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")

# Every field of ResponseCreateParams in the openai SDK, plus stream (a test fails when the
# installed SDK has one more).
REQUEST_FIELDS = frozenset(
    {
        "access_programs",
        "background",
        "background_options",
        "context_management",
        "conversation",
        "image",
        "include",
        "input",
        "instructions",
        "max_output_tokens",
        "max_tool_calls",
        "metadata",
        "model",
        "moderation",
        "parallel_tool_calls",
        "previous_response_id",
        "prompt",
        "prompt_cache_key",
        "prompt_cache_options",
        "prompt_cache_retention",
        "reasoning",
        "safety_identifier",
        "service_tier",
        "store",
        "stream",
        "stream_options",
        "temperature",
        "text",
        "tool_choice",
        "tools",
        "top_logprobs",
        "top_p",
        "truncation",
        "user",
    }
)

# Sampling parameters of Chat Completions hubs that the Responses API lacks: OpenAI's penalties
# and seed, and the extras vLLM, SGLang and llama.cpp servers take. They reach the hub as given;
# the response echoes the two penalties (0 when not given), as Open Responses defines them.
HUB_SAMPLING_FIELDS = frozenset(
    {
        "presence_penalty",
        "frequency_penalty",
        "seed",
        "stop",
        "top_k",
        "min_p",
        "repetition_penalty",
        "length_penalty",
        "min_tokens",
        "logit_bias",
        "stop_token_ids",
        "ignore_eos",
        "skip_special_tokens",
        "include_stop_str_in_output",
        "spaces_between_special_tokens",
        "chat_template_kwargs",
    }
)
_KNOWN_FIELDS = REQUEST_FIELDS | HUB_SAMPLING_FIELDS

INCLUDABLE = (
    "file_search_call.results",
    "web_search_call.results",
    "web_search_call.action.sources",
    "message.input_image.image_url",
    "computer_call_output.output.image_url",
    "code_interpreter_call.outputs",
    "reasoning.encrypted_content",
    "message.output_text.logprobs",
)
SERVICE_TIERS = ("auto", "default", "flex", "scale", "priority", "fast", "ultrafast")
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")
_SUMMARIES = ("auto", "concise", "detailed")
_STATUSES = ("in_progress", "completed", "incomplete")
_ROLES = ("user", "assistant", "system", "developer")
_IMAGE_DETAILS = ("low", "high", "auto", "original")

TOOL_TYPES = (
    "function",
    "file_search",
    "computer",
    "computer_use_preview",
    "web_search",
    "web_search_2025_08_26",
    "mcp",
    "code_interpreter",
    "programmatic_tool_calling",
    "image_generation",
    "local_shell",
    "shell",
    "custom",
    "namespace",
    "tool_search",
    "web_search_preview",
    "web_search_preview_2025_03_11",
    "apply_patch",
)
# What a Chat Completions hub gets of each tool type (README, "Known limits"). Offered as
# functions: function tools; custom tools (a function taking the free text as its one string
# argument, "input"); the function and custom tools of a namespace, flattened.
CHAT_OFFERED_TOOLS = frozenset({"function", "custom", "namespace"})
# Accepted but not offered to the model, and reported: a web search the gateway cannot run (the
# model answers without searching, as OpenAI's model may choose to), and code_interpreter and
# shell when no execution service runs them (when one does, the tool loop in router_svc.tools
# offers them as functions and runs the calls, and leaves them out of what is checked here).
CHAT_NOT_RUN_TOOLS = frozenset(
    {
        "web_search",
        "web_search_2025_08_26",
        "web_search_preview",
        "web_search_preview_2025_03_11",
        "code_interpreter",
        "shell",
    }
)
# Refused: the tools whose results the caller would be relying on (file search over its vector
# stores, MCP servers, image generation), and those whose calls only OpenAI's models make.
_CHAT_HOSTED_REFUSED = (
    "file_search",
    "mcp",
    "image_generation",
    "tool_search",
    "programmatic_tool_calling",
)
_CHAT_CLIENT_REFUSED = ("computer", "computer_use_preview", "local_shell", "apply_patch")
_HOSTED_TOOL_CHOICES = (
    "file_search",
    "web_search_preview",
    "computer",
    "computer_use_preview",
    "computer_use",
    "web_search_preview_2025_03_11",
    "image_generation",
    "code_interpreter",
)
_BARE_TOOL_CHOICES = ("apply_patch", "shell", "programmatic_tool_calling")

# The id prefix of each input item type, used when the caller sent an item without an id.
ID_PREFIXES: dict[str, str] = {
    "message": "msg",
    "function_call": "fc",
    "function_call_output": "fco",
    "reasoning": "rs",
    "custom_tool_call": "ctc",
    "custom_tool_call_output": "ctco",
    "file_search_call": "fs",
    "computer_call": "cu",
    "computer_call_output": "cuo",
    "web_search_call": "ws",
    "tool_search_call": "tsc",
    "tool_search_output": "tso",
    "additional_tools": "at",
    "configuration_update": "cfg",
    "compaction": "cmp",
    "compaction_trigger": "cmpt",
    "image_generation_call": "ig",
    "code_interpreter_call": "ci",
    "local_shell_call": "lsh",
    "local_shell_call_output": "lsho",
    "shell_call": "sh",
    "shell_call_output": "sho",
    "apply_patch_call": "apc",
    "apply_patch_call_output": "apco",
    "mcp_list_tools": "mcpl",
    "mcp_approval_request": "mcpr",
    "mcp_approval_response": "mcpa",
    "mcp_call": "mcp",
    "program": "prg",
    "program_output": "prgo",
}
_ITEM_TYPES = (*ID_PREFIXES, "item_reference")

_MESSAGE_KEYS = frozenset({"type", "role", "content", "id", "status", "phase"})
_FUNCTION_CALL_KEYS = frozenset(
    {"type", "id", "call_id", "name", "arguments", "status", "namespace", "caller", "async"}
    | {"created_by"}
)
_FUNCTION_OUTPUT_KEYS = frozenset(
    {"type", "id", "call_id", "output", "status", "name", "namespace", "caller", "created_by"}
)
_REASONING_KEYS = frozenset({"type", "id", "summary", "content", "encrypted_content", "status"})
_CUSTOM_CALL_KEYS = frozenset(
    {"type", "id", "call_id", "input", "name", "namespace", "caller", "status", "created_by"}
    | {"async"}
)
_CUSTOM_OUTPUT_KEYS = frozenset(
    {"type", "id", "call_id", "output", "caller", "status", "created_by"}
)
# Fields of a call or call output item the gateway never interprets and stores as given, so that
# an item read back (input_items, GET) is the item sent: who made it, the program that called
# the tool, and whether the call ran asynchronously.
_KEPT_CALL_FIELDS = ("namespace", "caller", "created_by", "async")
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
    input_items: list[dict[str, Any]]  # normalized, each with an id: exactly what gets stored
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

    def stored_inputs(self) -> list[dict[str, Any]]:
        """The input items stored with the turn."""
        if not self.unstored:
            return self.input_items
        return [item for i, item in enumerate(self.input_items) if i not in self.unstored]


def _copy(value: _T) -> _T:
    """A deep copy of a JSON value; orjson's round trip is several times faster than deepcopy."""
    try:
        copied: _T = orjson.loads(orjson.dumps(value))
        return copied
    except TypeError:  # not JSON-serializable by orjson (an integer above 64 bits, ...)
        return copy.deepcopy(value)


# --- errors ----------------------------------------------------------------------------------


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def invalid_type(param: str, expected: str, value: object) -> errors.InvalidRequest:
    return errors.InvalidRequest(
        f"Invalid type for '{param}': expected {expected}, but got {_kind(value)} instead.",
        param=param,
        code="invalid_type",
    )


def missing(param: str) -> errors.InvalidRequest:
    return errors.InvalidRequest(
        f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
    )


def unknown(param: str) -> errors.InvalidRequest:
    return errors.InvalidRequest(
        f"Unknown parameter: '{param}'.", param=param, code="unknown_parameter"
    )


def _quoted_list(values: Collection[str]) -> str:
    quoted = [f"'{v}'" for v in values]
    if len(quoted) <= 2:
        return " and ".join(quoted)
    return ", ".join(quoted[:-1]) + ", and " + quoted[-1]


def invalid_value(param: str, value: object, supported: Collection[str]) -> errors.InvalidRequest:
    return errors.InvalidRequest(
        f"Invalid value: '{value}'. Supported values are: {_quoted_list(supported)}.",
        param=param,
        code="invalid_value",
    )


# --- typed getters (null means absent everywhere, as in OpenAI's API) ------------------------


def _check_keys(obj: Mapping[str, Any], allowed: Collection[str], path: str) -> None:
    for key in obj:
        if key not in allowed:
            raise unknown(f"{path}.{key}" if path else key)


def _object(value: object, param: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise invalid_type(param, "an object", value)
    return value


def _array(value: object, param: str) -> list[Any]:
    if not isinstance(value, list):
        raise invalid_type(param, "an array", value)
    return value


def _string(value: object, param: str, *, max_length: int | None = None) -> str:
    if not isinstance(value, str):
        raise invalid_type(param, "a string", value)
    if max_length is not None and len(value) > max_length:
        raise errors.InvalidRequest(
            f"Invalid '{param}': string too long. Expected a string with maximum length "
            f"{max_length}, but got a string with length {len(value)} instead.",
            param=param,
            code="string_above_max_length",
        )
    return value


def _nonempty(value: object, param: str) -> str:
    text = _string(value, param)
    if not text:
        raise errors.InvalidRequest(
            f"Invalid '{param}': empty string. Expected a string with minimum length 1, but got "
            "an empty string instead.",
            param=param,
            code="empty_string",
        )
    return text


def _boolean(value: object, param: str) -> bool:
    if not isinstance(value, bool):
        raise invalid_type(param, "a boolean", value)
    return value


def _integer(
    value: object, param: str, *, minimum: int | None = None, maximum: int | None = None
) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid_type(param, "an integer", value)
    if minimum is not None and value < minimum:
        raise errors.InvalidRequest(
            f"Invalid '{param}': integer below minimum value. Expected a value >= {minimum}, "
            f"but got {value} instead.",
            param=param,
            code="integer_below_min_value",
        )
    if maximum is not None and value > maximum:
        raise errors.InvalidRequest(
            f"Invalid '{param}': integer above maximum value. Expected a value <= {maximum}, "
            f"but got {value} instead.",
            param=param,
            code="integer_above_max_value",
        )
    return value


def _decimal(value: object, param: str, *, minimum: float, maximum: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid_type(param, "a decimal", value)
    if value < minimum:
        raise errors.InvalidRequest(
            f"Invalid '{param}': decimal below minimum value. Expected a value >= {minimum:g}, "
            f"but got {value} instead.",
            param=param,
            code="decimal_below_min_value",
        )
    if value > maximum:
        raise errors.InvalidRequest(
            f"Invalid '{param}': decimal above maximum value. Expected a value <= {maximum:g}, "
            f"but got {value} instead.",
            param=param,
            code="decimal_above_max_value",
        )
    return float(value)


def _enum(value: object, param: str, allowed: Collection[str]) -> str:
    text = _string(value, param)
    if text not in allowed:
        raise invalid_value(param, text, allowed)
    return text


def _required(obj: Mapping[str, Any], key: str, path: str) -> Any:
    value = obj.get(key)
    if value is None:
        raise missing(f"{path}.{key}" if path else key)
    return value


def _id_with_prefix(value: object, param: str, prefix: str) -> str:
    text = _nonempty(value, param)
    if not text.startswith(prefix):
        raise errors.InvalidRequest(
            f"Invalid '{param}': '{text}'. Expected an ID that begins with '{prefix}'.",
            param=param,
            code="invalid_value",
        )
    return text


# --- the request -----------------------------------------------------------------------------


def parse_turn_request(
    body: object,
    *,
    default_model: str = "",
    strict_params: bool = False,
    hub_api: str | None = None,
) -> TurnRequest:
    """Validates a POST /v1/responses body; raises :class:`errors.InvalidRequest` on any bad field.

    A top-level field the gateway does not know is ignored (and counted), or refused with
    ``unknown_parameter`` when ``strict_params`` is true. With ``hub_api="chat"`` what a Chat
    Completions hub cannot do is refused here too (:func:`check_chat_hub`), before any history
    is loaded or the bootstrap service called.
    """
    if not isinstance(body, dict):
        raise errors.InvalidRequest(
            f"Invalid type for request body: expected an object, but got {_kind(body)} instead.",
            code="invalid_type",
        )
    _unknown_fields(body, strict=strict_params)

    model = body.get("model")
    if model is None or model == "":
        if default_model:
            model = default_model
        elif model == "":
            _nonempty(model, "model")
        else:
            raise missing("model")
    model = _string(model, "model")

    raw_input = body.get("input")
    input_items = normalize_items(raw_input, param="input", references=True)
    references: tuple[int, ...] = ()
    if isinstance(raw_input, list):
        references = tuple(
            i for i, item in enumerate(input_items) if item.get("type") == "item_reference"
        )

    instructions = body.get("instructions")
    if instructions is not None:
        _string(instructions, "instructions")

    previous = body.get("previous_response_id")
    if previous is not None:
        previous = _id_with_prefix(previous, "previous_response_id", "resp")

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
        options = _object(body["stream_options"], "stream_options")
        _check_keys(options, {"include_obfuscation"}, "stream_options")
        if options.get("include_obfuscation") is not None:
            _boolean(options["include_obfuscation"], "stream_options.include_obfuscation")

    metadata = parse_metadata(body.get("metadata"))
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
        # A prompt template may bring the input; on a chat hub check_chat_hub refuses it.
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
    if hub_api == "chat":
        check_chat_hub(req)
    return req


def _has_input(raw: object) -> None:
    """A turn with nothing to continue from needs input (OpenAI's errors for a missing input and
    an empty array)."""
    if raw is None:
        raise missing("input")
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


def check_chat_hub(req: TurnRequest) -> list[str]:
    """Refuses what a Chat Completions hub cannot do; returns the types of the declared tools
    that are accepted but not offered to the model (:data:`CHAT_NOT_RUN_TOOLS`), in order.

    Refused: a ``prompt`` template (the gateway has no prompt store to resolve it from, and
    answering without it would answer another question), and the tools nobody would run
    (OpenAI's error for a hosted tool a model does not support, with the reason).
    """
    prompt = req.body.get("prompt")
    if prompt is not None:
        raise errors.InvalidRequest(
            f"Prompt templates are not supported by this server: prompt '{prompt.get('id')}' "
            "cannot be resolved, because its model server speaks Chat Completions. Send the "
            "prompt's text as 'instructions' and 'input' instead.",
            param="prompt",
            code="unsupported_parameter",
        )
    not_run: list[str] = []
    for tool in req.tools:
        kind = str(tool.get("type"))
        if kind in CHAT_OFFERED_TOOLS:
            continue
        if kind in CHAT_NOT_RUN_TOOLS:
            if kind not in not_run:
                not_run.append(kind)
            continue
        if kind in _CHAT_CLIENT_REFUSED:
            message = (
                f"Tool '{kind}' is not supported with {req.model}: this server's model server "
                "speaks Chat Completions, which has no such tool. Declare a function tool "
                "instead."
            )
        else:
            message = (
                f"Hosted tool '{kind}' is not supported with {req.model}: this server's model "
                f"server speaks Chat Completions, and the gateway does not run '{kind}' itself."
            )
        raise errors.InvalidRequest(message, param="tools")
    return not_run


def _unknown_fields(body: Mapping[str, Any], *, strict: bool) -> None:
    for key in body:
        if key in _KNOWN_FIELDS:
            continue
        if strict:
            raise unknown(key)
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
    return default if value is None else _boolean(value, key)


def _conversation(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return _id_with_prefix(value, "conversation", "conv")
    if isinstance(value, dict):
        _check_keys(value, {"id"}, "conversation")
        return _id_with_prefix(_required(value, "id", "conversation"), "conversation.id", "conv")
    raise invalid_type("conversation", "one of a string or an object", value)


def parse_metadata(value: object, *, param: str = "metadata") -> dict[str, str]:
    """Checks OpenAI's metadata limits: 16 pairs, keys up to 64 and values up to 512 characters."""
    if value is None:
        return {}
    obj = _object(value, param)
    if len(obj) > MAX_METADATA_PAIRS:
        raise errors.InvalidRequest(
            f"Invalid '{param}': too many properties. Expected an object with at most "
            f"{MAX_METADATA_PAIRS} properties, but got an object with {len(obj)} properties "
            "instead.",
            param=param,
            code="object_above_max_properties",
        )
    out: dict[str, str] = {}
    for key, item in obj.items():
        if len(key) > MAX_METADATA_KEY:
            raise errors.InvalidRequest(
                f"Invalid '{param}': key too long. Expected keys with maximum length "
                f"{MAX_METADATA_KEY}, but got a key with length {len(key)} instead.",
                param=param,
                code="string_above_max_length",
            )
        if not isinstance(item, str):
            raise errors.InvalidRequest(
                f"Invalid type for '{param}.{key}': expected a string, but got {_kind(item)} "
                "instead.",
                param=param,
                code="invalid_type",
            )
        if len(item) > MAX_METADATA_VALUE:
            raise errors.InvalidRequest(
                f"Invalid '{param}.{key}': string too long. Expected a string with maximum "
                f"length {MAX_METADATA_VALUE}, but got a string with length {len(item)} instead.",
                param=param,
                code="string_above_max_length",
            )
        out[key] = item
    return out


def _scalars(body: Mapping[str, Any]) -> None:
    def present(key: str) -> bool:
        return body.get(key) is not None

    if present("max_output_tokens"):
        _integer(body["max_output_tokens"], "max_output_tokens", minimum=MIN_OUTPUT_TOKENS)
    if present("max_tool_calls"):
        _integer(body["max_tool_calls"], "max_tool_calls", minimum=0)
    if present("temperature"):
        _decimal(body["temperature"], "temperature", minimum=0, maximum=2)
    if present("top_p"):
        _decimal(body["top_p"], "top_p", minimum=0, maximum=1)
    if present("top_logprobs"):
        _integer(body["top_logprobs"], "top_logprobs", minimum=0, maximum=20)
    if present("parallel_tool_calls"):
        _boolean(body["parallel_tool_calls"], "parallel_tool_calls")
    if present("truncation"):
        _enum(body["truncation"], "truncation", ("auto", "disabled"))
    if present("service_tier"):
        _enum(body["service_tier"], "service_tier", SERVICE_TIERS)
    if present("prompt_cache_retention"):
        _enum(body["prompt_cache_retention"], "prompt_cache_retention", ("in_memory", "24h"))
    if present("user"):
        _string(body["user"], "user")
    if present("prompt_cache_key"):
        _string(body["prompt_cache_key"], "prompt_cache_key")
    if present("safety_identifier"):
        _string(body["safety_identifier"], "safety_identifier", max_length=128)


def _sampling(body: Mapping[str, Any]) -> None:
    for key, check in _SAMPLING_CHECKS.items():
        if body.get(key) is not None:
            check(body[key], key)


def _penalty(value: object, param: str) -> None:
    _decimal(value, param, minimum=-2, maximum=2)


def _stop(value: object, param: str) -> None:
    if isinstance(value, str):
        return
    if not isinstance(value, list):
        raise invalid_type(param, "one of a string or an array of strings", value)
    for i, entry in enumerate(value):
        _string(entry, f"{param}[{i}]")


def _integers(value: object, param: str) -> None:
    for i, entry in enumerate(_array(value, param)):
        _integer(entry, f"{param}[{i}]")


_SAMPLING_CHECKS: dict[str, Callable[[object, str], object]] = {
    "presence_penalty": _penalty,
    "frequency_penalty": _penalty,
    "seed": _integer,
    "stop": _stop,
    "top_k": lambda v, p: _integer(v, p, minimum=-1),
    "min_p": lambda v, p: _decimal(v, p, minimum=0, maximum=1),
    "repetition_penalty": lambda v, p: _decimal(v, p, minimum=0, maximum=math.inf),
    "length_penalty": lambda v, p: _decimal(v, p, minimum=-math.inf, maximum=math.inf),
    "min_tokens": lambda v, p: _integer(v, p, minimum=0),
    "logit_bias": _object,
    "stop_token_ids": _integers,
    "ignore_eos": _boolean,
    "skip_special_tokens": _boolean,
    "include_stop_str_in_output": _boolean,
    "spaces_between_special_tokens": _boolean,
    "chat_template_kwargs": _object,
}


def _include(value: object) -> list[str]:
    if value is None:
        return []
    return [
        _enum(entry, f"include[{i}]", INCLUDABLE)
        for i, entry in enumerate(_array(value, "include"))
    ]


def _text(value: object) -> None:
    text = _object(value, "text")
    _check_keys(text, {"format", "verbosity"}, "text")
    if text.get("verbosity") is not None:
        _enum(text["verbosity"], "text.verbosity", ("low", "medium", "high"))
    if text.get("format") is None:
        return
    fmt = _object(text["format"], "text.format")
    kind = _enum(
        _required(fmt, "type", "text.format"),
        "text.format.type",
        ("text", "json_schema", "json_object"),
    )
    if kind != "json_schema":
        _check_keys(fmt, {"type"}, "text.format")
        return
    _check_keys(fmt, {"type", "name", "schema", "description", "strict"}, "text.format")
    _name(_required(fmt, "name", "text.format"), "text.format.name")
    _object(_required(fmt, "schema", "text.format"), "text.format.schema")
    if fmt.get("description") is not None:
        _string(fmt["description"], "text.format.description")
    if fmt.get("strict") is not None:
        _boolean(fmt["strict"], "text.format.strict")


def _name(value: object, param: str) -> str:
    name = _string(value, param)
    if not _NAME_PATTERN.match(name):
        raise errors.InvalidRequest(
            f"Invalid '{param}': string does not match pattern. Expected a string that matches "
            "the pattern '^[a-zA-Z0-9_-]{1,64}$'.",
            param=param,
            code="invalid_value",
        )
    return name


def _reasoning(value: object) -> None:
    reasoning = _object(value, "reasoning")
    _check_keys(
        reasoning, {"effort", "summary", "generate_summary", "context", "mode"}, "reasoning"
    )
    if reasoning.get("effort") is not None:
        _enum(reasoning["effort"], "reasoning.effort", REASONING_EFFORTS)
    for key in ("summary", "generate_summary"):
        if reasoning.get(key) is not None:
            _enum(reasoning[key], f"reasoning.{key}", _SUMMARIES)
    if reasoning.get("context") is not None:
        _enum(reasoning["context"], "reasoning.context", ("auto", "current_turn", "all_turns"))
    if reasoning.get("mode") is not None:
        _string(reasoning["mode"], "reasoning.mode")


def _other_objects(body: Mapping[str, Any]) -> None:
    # Fields that only mean something on OpenAI's platform: the gateway accepts them, echoes what
    # the Response object has of them, and checks what it echoes. Keys it does not know inside
    # them are left alone (these objects grow with OpenAI's platform).
    for key in ("access_programs", "image", "moderation", "prompt_cache_options"):
        if body.get(key) is not None:
            _object(body[key], key)
    _optional_enum(body, "access_programs", "cyber", _CYBER_PROGRAMS)
    _optional_enum(body, "image", "context_compression", ("auto", "enabled", "disabled"))
    if body.get("moderation") is not None:
        _string(_required(body["moderation"], "model", "moderation"), "moderation.model")
    options = body.get("prompt_cache_options")
    if options is not None:
        _optional_enum(body, "prompt_cache_options", "mode", ("implicit", "explicit"))
        _optional_enum(body, "prompt_cache_options", "ttl", ("30m", "12h"))
        if options.get("comparison_response_id") is not None:
            _string(
                options["comparison_response_id"], "prompt_cache_options.comparison_response_id"
            )
        if options.get("prewarm") is not None:
            _boolean(options["prewarm"], "prompt_cache_options.prewarm")
    if body.get("background_options") is not None:
        _background_options(body)
    if body.get("prompt") is not None:
        prompt = _object(body["prompt"], "prompt")
        _check_keys(prompt, {"id", "version", "variables"}, "prompt")
        _string(_required(prompt, "id", "prompt"), "prompt.id")
        if prompt.get("version") is not None:
            _string(prompt["version"], "prompt.version")
        if prompt.get("variables") is not None:
            _object(prompt["variables"], "prompt.variables")
    if body.get("context_management") is not None:
        for i, entry in enumerate(_array(body["context_management"], "context_management")):
            path = f"context_management[{i}]"
            obj = _object(entry, path)
            _check_keys(obj, {"type", "compact_threshold"}, path)
            _string(_required(obj, "type", path), f"{path}.type")
            if obj.get("compact_threshold") is not None:
                _integer(obj["compact_threshold"], f"{path}.compact_threshold", minimum=0)


_CYBER_PROGRAMS = ("standard", "daybreak_blue", "daybreak_red")


def _optional_enum(
    body: Mapping[str, Any], parent: str, key: str, allowed: Collection[str]
) -> None:
    """Checks ``body[parent][key]`` (the parent an object already checked) when present."""
    obj = body.get(parent)
    if obj is not None and obj.get(key) is not None:
        _enum(obj[key], f"{parent}.{key}", allowed)


def _background_options(body: Mapping[str, Any]) -> None:
    options = _object(body["background_options"], "background_options")
    window = options.get("completion_window")
    if window is not None:
        window = _enum(window, "background_options.completion_window", ("soonest", "2h", "8h"))
    if options.get("continuation_id") is not None:
        _string(options["continuation_id"], "background_options.continuation_id")
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
    return [_tool(raw, f"tools[{i}]") for i, raw in enumerate(_array(value, "tools"))]


def _tool(raw: object, path: str) -> dict[str, Any]:
    tool = _object(raw, path)
    kind = _enum(_required(tool, "type", path), f"{path}.type", TOOL_TYPES)
    if kind == "function":
        _check_keys(tool, _FUNCTION_TOOL_KEYS, path)
        _name(_required(tool, "name", path), f"{path}.name")
        if tool.get("description") is not None:
            _string(tool["description"], f"{path}.description")
        if tool.get("parameters") is not None:
            _object(tool["parameters"], f"{path}.parameters")
        if tool.get("strict") is not None:
            _boolean(tool["strict"], f"{path}.strict")
    elif kind == "code_interpreter":
        container = _required(tool, "container", path)
        if not isinstance(container, str | dict):
            raise invalid_type(f"{path}.container", "one of a string or an object", container)
    elif kind == "custom":
        _string(_required(tool, "name", path), f"{path}.name")
    elif kind == "namespace":
        _check_keys(tool, {"type", "name", "description", "tools"}, path)
        _nonempty(_required(tool, "name", path), f"{path}.name")
        if tool.get("description") is not None:
            _string(tool["description"], f"{path}.description")
        for j, member in enumerate(_array(_required(tool, "tools", path), f"{path}.tools")):
            mpath = f"{path}.tools[{j}]"
            _enum(
                _required(_object(member, mpath), "type", mpath),
                f"{mpath}.type",
                ("function", "custom"),
            )
            _tool(member, mpath)
    elif kind == "mcp":
        _string(_required(tool, "server_label", path), f"{path}.server_label")
    return _copy(tool)


def _tool_choice(value: object, tools: list[dict[str, Any]]) -> None:
    if isinstance(value, str):
        _enum(value, "tool_choice", ("none", "auto", "required"))
        return
    if not isinstance(value, dict):
        raise invalid_type("tool_choice", "one of a string or an object", value)
    kind = _string(_required(value, "type", "tool_choice"), "tool_choice.type")
    if kind in ("function", "custom"):
        _check_keys(value, {"type", "name"}, "tool_choice")
        name = _string(_required(value, "name", "tool_choice"), "tool_choice.name")
        declared = [*tools, *(m for t in tools if t["type"] == "namespace" for m in t["tools"])]
        if not any(t.get("type") == kind and t.get("name") == name for t in declared):
            raise errors.InvalidRequest(
                f"Invalid value for 'tool_choice': tool '{name}' was not found in 'tools'.",
                param="tool_choice",
                code="invalid_value",
            )
    elif kind == "allowed_tools":
        _check_keys(value, {"type", "mode", "tools"}, "tool_choice")
        _enum(_required(value, "mode", "tool_choice"), "tool_choice.mode", ("auto", "required"))
        for i, entry in enumerate(
            _array(_required(value, "tools", "tool_choice"), "tool_choice.tools")
        ):
            _allowed_tool(entry, f"tool_choice.tools[{i}]")
    elif kind == "mcp":
        _check_keys(value, {"type", "server_label", "name"}, "tool_choice")
        _string(_required(value, "server_label", "tool_choice"), "tool_choice.server_label")
        if value.get("name") is not None:
            _string(value["name"], "tool_choice.name")
    elif kind in _HOSTED_TOOL_CHOICES or kind in _BARE_TOOL_CHOICES:
        _check_keys(value, {"type"}, "tool_choice")
    else:
        raise invalid_value(
            "tool_choice.type",
            kind,
            (
                "function",
                "custom",
                "allowed_tools",
                "mcp",
                *_HOSTED_TOOL_CHOICES,
                *_BARE_TOOL_CHOICES,
            ),
        )


def _allowed_tool(value: object, path: str) -> None:
    """One entry of an allowed_tools choice: a tool named as in ``tools`` (its type, and the
    name or server label that tells it from others of its type)."""
    entry = _object(value, path)
    kind = _enum(_required(entry, "type", path), f"{path}.type", TOOL_TYPES)
    if kind in ("function", "custom"):
        _string(_required(entry, "name", path), f"{path}.name")
    elif kind == "mcp":
        _string(_required(entry, "server_label", path), f"{path}.server_label")
    for key in ("name", "server_label"):
        if entry.get(key) is not None:
            _string(entry[key], f"{path}.{key}")


# --- input items -----------------------------------------------------------------------------


def normalize_items(
    raw: object, *, param: str = "input", references: bool = False
) -> list[dict[str, Any]]:
    """The caller's input (a string or an array of items) as the items to store, each with an id.

    An item reference (``{"type": "item_reference", "id": ...}``, or an object with only an
    ``id``) is kept as ``{"type": "item_reference", "id": ...}`` for the caller to resolve when
    ``references`` is set, and refused otherwise.

    Raises :class:`errors.InvalidRequest` naming the offending item (``input[2].content``).
    """
    if raw is None:
        return []
    if isinstance(raw, str):
        return [user_message(raw)]
    if not isinstance(raw, list):
        raise invalid_type(param, "one of a string or an array of input items", raw)
    items = [_item(entry, f"{param}[{i}]") for i, entry in enumerate(raw)]
    if not references:
        for i, item in enumerate(items):
            if item.get("type") == "item_reference":
                raise errors.InvalidRequest(
                    f"Item references are not supported in '{param}' ('{param}[{i}]' refers "
                    f"to item '{item['id']}'). Send the item itself.",
                    param=f"{param}[{i}]",
                    code="unsupported_value",
                )
    return items


def user_message(text: str) -> dict[str, Any]:
    """A stored user message holding one text part."""
    return {
        "id": new_id("msg"),
        "type": "message",
        "status": "completed",
        "role": "user",
        "content": [{"type": "input_text", "text": text}],
    }


def _item(raw: object, path: str) -> dict[str, Any]:
    item = _object(raw, path)
    kind = item.get("type")
    if kind is None:
        # EasyInputMessage and ItemReference both leave "type" out.
        if "role" in item:
            kind = "message"
        elif "id" in item:
            kind = "item_reference"
        else:
            raise missing(f"{path}.type")
    kind = _enum(kind, f"{path}.type", _ITEM_TYPES)
    if kind == "message":
        return _message(item, path)
    if kind == "function_call":
        return _function_call(item, path)
    if kind == "function_call_output":
        return _function_call_output(item, path)
    if kind == "reasoning":
        return _reasoning_item(item, path)
    if kind == "custom_tool_call":
        return _custom_tool_call(item, path)
    if kind == "custom_tool_call_output":
        return _custom_tool_call_output(item, path)
    if kind == "item_reference":
        _check_keys(item, ("type", "id"), path)
        if item.get("id") is None:
            raise missing(f"{path}.id")
        return {"type": "item_reference", "id": _nonempty(item["id"], f"{path}.id")}
    # Item types of built-in tools: stored as given, never interpreted by the gateway.
    stored = _copy(item)
    stored["type"] = kind
    if stored.get("id") is None:
        stored = {"id": new_id(ID_PREFIXES[kind]), **stored}
    else:
        _nonempty(stored["id"], f"{path}.id")
    return stored


def _item_id(item: Mapping[str, Any], path: str, kind: str) -> str:
    value = item.get("id")
    if value is None:
        return new_id(ID_PREFIXES[kind])
    return _nonempty(value, f"{path}.id")


def _status(item: Mapping[str, Any], path: str) -> str:
    value = item.get("status")
    return "completed" if value is None else _enum(value, f"{path}.status", _STATUSES)


def _message(item: Mapping[str, Any], path: str) -> dict[str, Any]:
    _check_keys(item, _MESSAGE_KEYS, path)
    role = _enum(_required(item, "role", path), f"{path}.role", _ROLES)
    content = _required(item, "content", path)
    cpath = f"{path}.content"
    if role == "assistant":
        parts = _assistant_content(content, cpath)
    else:
        parts = _input_content(content, cpath)
    out: dict[str, Any] = {
        "id": _item_id(item, path, "message"),
        "type": "message",
        "status": _status(item, path),
        "role": role,
        "content": parts,
    }
    if item.get("phase") is not None:
        out["phase"] = _enum(item["phase"], f"{path}.phase", ("commentary", "final_answer"))
    return out


def _input_content(content: object, path: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "input_text", "text": content}]
    if not isinstance(content, list):
        raise invalid_type(path, "one of a string or an array of input content parts", content)
    return [
        _input_part(part, f"{path}[{i}]", ("input_text", "input_image", "input_file"))
        for i, part in enumerate(content)
    ]


def _input_part(raw: object, path: str, allowed: tuple[str, ...]) -> dict[str, Any]:
    part = _object(raw, path)
    kind = _enum(_required(part, "type", path), f"{path}.type", allowed)
    breakpoint_ = part.get("prompt_cache_breakpoint")
    out: dict[str, Any]
    if kind == "input_text":
        _check_keys(part, {"type", "text", "prompt_cache_breakpoint"}, path)
        out = {"type": "input_text", "text": _string(_required(part, "text", path), f"{path}.text")}
    elif kind == "input_image":
        _check_keys(
            part, {"type", "detail", "file_id", "image_url", "prompt_cache_breakpoint"}, path
        )
        detail = part.get("detail")
        out = {
            "type": "input_image",
            "detail": "auto" if detail is None else _enum(detail, f"{path}.detail", _IMAGE_DETAILS),
            "file_id": None,
            "image_url": None,
        }
        for key in ("file_id", "image_url"):
            if part.get(key) is not None:
                out[key] = _nonempty(part[key], f"{path}.{key}")
        if out["file_id"] is None and out["image_url"] is None:
            raise errors.InvalidRequest(
                f"Invalid '{path}': an input_image needs one of 'image_url' or 'file_id'.",
                param=path,
                code="missing_required_parameter",
            )
    else:
        keys = ("file_data", "file_id", "file_url", "filename")
        _check_keys(part, {"type", "detail", *keys, "prompt_cache_breakpoint"}, path)
        out = {"type": "input_file"}
        for key in keys:
            if part.get(key) is not None:
                out[key] = _string(part[key], f"{path}.{key}")
        if part.get("detail") is not None:
            out["detail"] = _enum(part["detail"], f"{path}.detail", ("auto", "low", "high"))
        if not any(key in out for key in ("file_data", "file_id", "file_url")):
            raise errors.InvalidRequest(
                f"Invalid '{path}': an input_file needs one of 'file_data', 'file_id' or "
                "'file_url'.",
                param=path,
                code="missing_required_parameter",
            )
    if breakpoint_ is not None:
        out["prompt_cache_breakpoint"] = _copy(
            _object(breakpoint_, f"{path}.prompt_cache_breakpoint")
        )
    return out


def _assistant_content(content: object, path: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [output_text(content)]
    if not isinstance(content, list):
        raise invalid_type(path, "one of a string or an array of output content parts", content)
    parts: list[dict[str, Any]] = []
    for i, raw in enumerate(content):
        ppath = f"{path}[{i}]"
        part = _object(raw, ppath)
        kind = _enum(_required(part, "type", ppath), f"{ppath}.type", ("output_text", "refusal"))
        if kind == "refusal":
            _check_keys(part, {"type", "refusal"}, ppath)
            refusal = _string(_required(part, "refusal", ppath), f"{ppath}.refusal")
            parts.append({"type": "refusal", "refusal": refusal})
            continue
        _check_keys(part, {"type", "text", "annotations", "logprobs"}, ppath)
        out = output_text(_string(_required(part, "text", ppath), f"{ppath}.text"))
        for key in ("annotations", "logprobs"):
            if part.get(key) is not None:
                out[key] = _copy(_array(part[key], f"{ppath}.{key}"))
        parts.append(out)
    return parts


def output_text(text: str) -> dict[str, Any]:
    """An ``output_text`` content part as the Responses API serves it."""
    return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}


def _function_call(item: Mapping[str, Any], path: str) -> dict[str, Any]:
    _check_keys(item, _FUNCTION_CALL_KEYS, path)
    out: dict[str, Any] = {
        "id": _item_id(item, path, "function_call"),
        "type": "function_call",
        "status": _status(item, path),
        "arguments": _string(_required(item, "arguments", path), f"{path}.arguments"),
        "call_id": _nonempty(_required(item, "call_id", path), f"{path}.call_id"),
        "name": _nonempty(_required(item, "name", path), f"{path}.name"),
    }
    _keep(item, out, _KEPT_CALL_FIELDS)
    return out


def _keep(item: Mapping[str, Any], out: dict[str, Any], keys: Collection[str]) -> None:
    """Copies the fields ``keys`` the item has (not null) into ``out``, as given."""
    for key in keys:
        if item.get(key) is not None:
            out[key] = _copy(item[key])


def _call_output(value: object, path: str) -> str | list[dict[str, Any]]:
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise invalid_type(path, "one of a string or an array of content parts", value)
    return [
        _input_part(part, f"{path}[{i}]", ("input_text", "input_image", "input_file"))
        for i, part in enumerate(value)
    ]


def _function_call_output(item: Mapping[str, Any], path: str) -> dict[str, Any]:
    _check_keys(item, _FUNCTION_OUTPUT_KEYS, path)
    out: dict[str, Any] = {
        "id": _item_id(item, path, "function_call_output"),
        "type": "function_call_output",
        "status": _status(item, path),
        "call_id": _nonempty(_required(item, "call_id", path), f"{path}.call_id"),
        "output": _call_output(_required(item, "output", path), f"{path}.output"),
    }
    _keep(item, out, ("name", *_KEPT_CALL_FIELDS))
    return out


def _reasoning_item(item: Mapping[str, Any], path: str) -> dict[str, Any]:
    _check_keys(item, _REASONING_KEYS, path)
    out: dict[str, Any] = {
        "id": _nonempty(_required(item, "id", path), f"{path}.id"),
        "type": "reasoning",
        "summary": _texts(_required(item, "summary", path), f"{path}.summary", "summary_text"),
    }
    if item.get("content") is not None:
        out["content"] = _texts(item["content"], f"{path}.content", "reasoning_text")
    if item.get("encrypted_content") is not None:
        out["encrypted_content"] = _string(item["encrypted_content"], f"{path}.encrypted_content")
    if item.get("status") is not None:
        out["status"] = _enum(item["status"], f"{path}.status", _STATUSES)
    return out


def _texts(value: object, path: str, kind: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, raw in enumerate(_array(value, path)):
        ppath = f"{path}[{i}]"
        part = _object(raw, ppath)
        _check_keys(part, {"type", "text"}, ppath)
        _enum(_required(part, "type", ppath), f"{ppath}.type", (kind,))
        out.append({"type": kind, "text": _string(_required(part, "text", ppath), f"{ppath}.text")})
    return out


def _custom_tool_call(item: Mapping[str, Any], path: str) -> dict[str, Any]:
    _check_keys(item, _CUSTOM_CALL_KEYS, path)
    out: dict[str, Any] = {
        "id": _item_id(item, path, "custom_tool_call"),
        "type": "custom_tool_call",
        "status": _status(item, path),
        "call_id": _nonempty(_required(item, "call_id", path), f"{path}.call_id"),
        "input": _string(_required(item, "input", path), f"{path}.input"),
        "name": _nonempty(_required(item, "name", path), f"{path}.name"),
    }
    _keep(item, out, _KEPT_CALL_FIELDS)
    return out


def _custom_tool_call_output(item: Mapping[str, Any], path: str) -> dict[str, Any]:
    _check_keys(item, _CUSTOM_OUTPUT_KEYS, path)
    out: dict[str, Any] = {
        "id": _item_id(item, path, "custom_tool_call_output"),
        "type": "custom_tool_call_output",
        "status": _status(item, path),
        "call_id": _nonempty(_required(item, "call_id", path), f"{path}.call_id"),
        "output": _call_output(_required(item, "output", path), f"{path}.output"),
    }
    _keep(item, out, _KEPT_CALL_FIELDS)
    return out
