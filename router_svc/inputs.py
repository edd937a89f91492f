"""Input items: what a caller sends as ``input`` (or as a conversation's ``items``), normalized
into the items stored and served back from ``input_items`` and conversation listings.

A string input becomes one user message, message content becomes a list of parts, and every item
gets an id (``msg_``, ``fc_``, ``fco_`` ... :data:`vocabulary.ID_PREFIXES`) and a status where
OpenAI has one. :data:`ITEMS` has one row per item type: the keys the item may have, and its
normalizer. The items of built-in tools are stored as given, never interpreted by the gateway.

Errors name the offending item by its path (``input[2].content``), in OpenAI's words
(:mod:`router_svc.checks`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any, NamedTuple

from router_svc import errors, vocabulary
from router_svc.checks import (  # by name: they run for every item and part of every request
    array,
    check_keys,
    copy_json,
    enum,
    invalid_type,
    invalid_value,
    missing,
    nonempty,
    obj,
    required,
    string,
)
from router_svc.ids import new_id
from router_svc.shapes import Item

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


def normalize_items(raw: object, *, param: str = "input", references: bool = False) -> list[Item]:
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


def user_message(text: str) -> Item:
    """A stored user message holding one text part."""
    return {
        "id": new_id("msg"),
        "type": "message",
        "status": "completed",
        "role": "user",
        "content": [{"type": "input_text", "text": text}],
    }


def output_text(text: str) -> dict[str, Any]:
    """An ``output_text`` content part as the Responses API serves it."""
    return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}


# A normalizer: the item (its keys already checked), its path and its type, to the stored item.
Normalizer = Callable[[dict[str, Any], str, str], Item]


class ItemType(NamedTuple):
    """How one input item type is normalized."""

    keys: Collection[str] | None  # the keys it may have; None: any (stored as given)
    normalize: Normalizer


def _item(raw: object, path: str) -> Item:
    item = obj(raw, path)
    kind = item.get("type")
    if kind is None:
        # EasyInputMessage and ItemReference both leave "type" out.
        if "role" in item:
            kind = "message"
        elif "id" in item:
            kind = "item_reference"
        else:
            raise missing(f"{path}.type")
    row = ITEMS.get(kind) if isinstance(kind, str) else None
    if row is None:
        param = f"{path}.type"
        if isinstance(kind, str):
            raise invalid_value(param, kind, vocabulary.ITEM_TYPES)
        raise invalid_type(param, "a string", kind)
    keys, normalize = row
    if keys is not None:
        check_keys(item, keys, path)
    return normalize(item, path, kind)


def _item_id(item: Mapping[str, Any], path: str, kind: str) -> str:
    value = item.get("id")
    if value is None:
        return new_id(vocabulary.ID_PREFIXES[kind])
    return nonempty(value, f"{path}.id")


def _status(item: Mapping[str, Any], path: str) -> str:
    value = item.get("status")
    if value is None:
        return "completed"
    return enum(value, f"{path}.status", vocabulary.ITEM_STATUSES)


def _keep(item: Mapping[str, Any], out: dict[str, Any], keys: Collection[str]) -> None:
    """Copies the fields ``keys`` the item has (not null) into ``out``, as given."""
    for key in keys:
        if item.get(key) is not None:
            out[key] = copy_json(item[key])


# --- messages --------------------------------------------------------------------------------


def _message(item: Mapping[str, Any], path: str, kind: str) -> Item:
    role = enum(required(item, "role", path), f"{path}.role", vocabulary.ROLES)
    content = required(item, "content", path)
    cpath = f"{path}.content"
    if role == "assistant":
        parts = _assistant_content(content, cpath)
    else:
        parts = _input_content(content, cpath)
    out: dict[str, Any] = {
        "id": _item_id(item, path, kind),
        "type": "message",
        "status": _status(item, path),
        "role": role,
        "content": parts,
    }
    if item.get("phase") is not None:
        out["phase"] = enum(item["phase"], f"{path}.phase", ("commentary", "final_answer"))
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
    part = obj(raw, path)
    kind = enum(required(part, "type", path), f"{path}.type", allowed)
    breakpoint_ = part.get("prompt_cache_breakpoint")
    out: dict[str, Any]
    if kind == "input_text":
        check_keys(part, {"type", "text", "prompt_cache_breakpoint"}, path)
        out = {
            "type": "input_text",
            "text": string(required(part, "text", path), f"{path}.text"),
        }
    elif kind == "input_image":
        check_keys(
            part, {"type", "detail", "file_id", "image_url", "prompt_cache_breakpoint"}, path
        )
        detail = part.get("detail")
        if detail is not None:
            detail = enum(detail, f"{path}.detail", vocabulary.IMAGE_DETAILS)
        out = {
            "type": "input_image",
            "detail": "auto" if detail is None else detail,
            "file_id": None,
            "image_url": None,
        }
        for key in ("file_id", "image_url"):
            if part.get(key) is not None:
                out[key] = nonempty(part[key], f"{path}.{key}")
        if out["file_id"] is None and out["image_url"] is None:
            raise errors.InvalidRequest(
                f"Invalid '{path}': an input_image needs one of 'image_url' or 'file_id'.",
                param=path,
                code="missing_required_parameter",
            )
    else:
        keys = ("file_data", "file_id", "file_url", "filename")
        check_keys(part, {"type", "detail", *keys, "prompt_cache_breakpoint"}, path)
        out = {"type": "input_file"}
        for key in keys:
            if part.get(key) is not None:
                out[key] = string(part[key], f"{path}.{key}")
        if part.get("detail") is not None:
            out["detail"] = enum(part["detail"], f"{path}.detail", ("auto", "low", "high"))
        if not any(key in out for key in ("file_data", "file_id", "file_url")):
            raise errors.InvalidRequest(
                f"Invalid '{path}': an input_file needs one of 'file_data', 'file_id' or "
                "'file_url'.",
                param=path,
                code="missing_required_parameter",
            )
    if breakpoint_ is not None:
        out["prompt_cache_breakpoint"] = copy_json(
            obj(breakpoint_, f"{path}.prompt_cache_breakpoint")
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
        part = obj(raw, ppath)
        kind = enum(required(part, "type", ppath), f"{ppath}.type", ("output_text", "refusal"))
        if kind == "refusal":
            check_keys(part, {"type", "refusal"}, ppath)
            refusal = string(required(part, "refusal", ppath), f"{ppath}.refusal")
            parts.append({"type": "refusal", "refusal": refusal})
            continue
        check_keys(part, {"type", "text", "annotations", "logprobs"}, ppath)
        out = output_text(string(required(part, "text", ppath), f"{ppath}.text"))
        for key in ("annotations", "logprobs"):
            if part.get(key) is not None:
                out[key] = copy_json(array(part[key], f"{ppath}.{key}"))
        parts.append(out)
    return parts


# --- tool calls and their outputs ----------------------------------------------------------


def _function_call(item: Mapping[str, Any], path: str, kind: str) -> Item:
    out: dict[str, Any] = {
        "id": _item_id(item, path, kind),
        "type": "function_call",
        "status": _status(item, path),
        "arguments": string(required(item, "arguments", path), f"{path}.arguments"),
        "call_id": nonempty(required(item, "call_id", path), f"{path}.call_id"),
        "name": nonempty(required(item, "name", path), f"{path}.name"),
    }
    _keep(item, out, _KEPT_CALL_FIELDS)
    return out


def _call_output(value: object, path: str) -> str | list[dict[str, Any]]:
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise invalid_type(path, "one of a string or an array of content parts", value)
    return [
        _input_part(part, f"{path}[{i}]", ("input_text", "input_image", "input_file"))
        for i, part in enumerate(value)
    ]


def _function_call_output(item: Mapping[str, Any], path: str, kind: str) -> Item:
    out: dict[str, Any] = {
        "id": _item_id(item, path, kind),
        "type": "function_call_output",
        "status": _status(item, path),
        "call_id": nonempty(required(item, "call_id", path), f"{path}.call_id"),
        "output": _call_output(required(item, "output", path), f"{path}.output"),
    }
    _keep(item, out, ("name", *_KEPT_CALL_FIELDS))
    return out


def _reasoning(item: Mapping[str, Any], path: str, kind: str) -> Item:
    out: dict[str, Any] = {
        "id": nonempty(required(item, "id", path), f"{path}.id"),
        "type": "reasoning",
        "summary": _texts(required(item, "summary", path), f"{path}.summary", "summary_text"),
    }
    if item.get("content") is not None:
        out["content"] = _texts(item["content"], f"{path}.content", "reasoning_text")
    if item.get("encrypted_content") is not None:
        out["encrypted_content"] = string(item["encrypted_content"], f"{path}.encrypted_content")
    if item.get("status") is not None:
        out["status"] = enum(item["status"], f"{path}.status", vocabulary.ITEM_STATUSES)
    return out


def _texts(value: object, path: str, kind: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, raw in enumerate(array(value, path)):
        ppath = f"{path}[{i}]"
        part = obj(raw, ppath)
        check_keys(part, {"type", "text"}, ppath)
        enum(required(part, "type", ppath), f"{ppath}.type", (kind,))
        out.append(
            {
                "type": kind,
                "text": string(required(part, "text", ppath), f"{ppath}.text"),
            }
        )
    return out


def _custom_tool_call(item: Mapping[str, Any], path: str, kind: str) -> Item:
    out: dict[str, Any] = {
        "id": _item_id(item, path, kind),
        "type": "custom_tool_call",
        "status": _status(item, path),
        "call_id": nonempty(required(item, "call_id", path), f"{path}.call_id"),
        "input": string(required(item, "input", path), f"{path}.input"),
        "name": nonempty(required(item, "name", path), f"{path}.name"),
    }
    _keep(item, out, _KEPT_CALL_FIELDS)
    return out


def _custom_tool_call_output(item: Mapping[str, Any], path: str, kind: str) -> Item:
    out: dict[str, Any] = {
        "id": _item_id(item, path, kind),
        "type": "custom_tool_call_output",
        "status": _status(item, path),
        "call_id": nonempty(required(item, "call_id", path), f"{path}.call_id"),
        "output": _call_output(required(item, "output", path), f"{path}.output"),
    }
    _keep(item, out, _KEPT_CALL_FIELDS)
    return out


def _reference(item: Mapping[str, Any], path: str, kind: str) -> Item:
    if item.get("id") is None:
        raise missing(f"{path}.id")
    return {"type": "item_reference", "id": nonempty(item["id"], f"{path}.id")}


def _as_given(item: dict[str, Any], path: str, kind: str) -> Item:
    """An item of a built-in tool: stored as given, never interpreted by the gateway."""
    stored = copy_json(item)
    stored["type"] = kind
    if stored.get("id") is None:
        stored = {"id": new_id(vocabulary.ID_PREFIXES[kind]), **stored}
    else:
        nonempty(stored["id"], f"{path}.id")
    return stored


# One row per item type: the keys it may have and its normalizer. The types the gateway
# interprets first; every other type of vocabulary.ID_PREFIXES (those of built-in tools) is
# stored as given. tests/router_svc/test_inputs.py fails when a type of vocabulary.ITEM_TYPES
# has no row.
ITEMS: dict[str, ItemType] = {
    "message": ItemType(_MESSAGE_KEYS, _message),
    "function_call": ItemType(_FUNCTION_CALL_KEYS, _function_call),
    "function_call_output": ItemType(_FUNCTION_OUTPUT_KEYS, _function_call_output),
    "reasoning": ItemType(_REASONING_KEYS, _reasoning),
    "custom_tool_call": ItemType(_CUSTOM_CALL_KEYS, _custom_tool_call),
    "custom_tool_call_output": ItemType(_CUSTOM_OUTPUT_KEYS, _custom_tool_call_output),
    "item_reference": ItemType(("type", "id"), _reference),
}
ITEMS.update(
    (kind, ItemType(None, _as_given)) for kind in vocabulary.ID_PREFIXES if kind not in ITEMS
)
