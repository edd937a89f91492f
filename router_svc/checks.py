"""The JSON checker: a request's values checked the way OpenAI checks them, in OpenAI's words.

Each check takes the value and ``param``, the dotted path that names it in the error
(``input[2].content[0].text``), and returns the value as its type or raises
:class:`errors.InvalidRequest` with OpenAI's message and code (``invalid_type``,
``invalid_value``, ``unknown_parameter``, ``missing_required_parameter``, ``empty_string``,
``integer_below_min_value``, ...). Null means absent everywhere, as in OpenAI's API: callers test
``is not None`` before checking an optional field, and :func:`required` refuses a null.

Also here: ``metadata`` (OpenAI's limits, shared by responses and conversations) and the copy of
a JSON value that keeps what is stored apart from the caller's body.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Collection, Mapping
from typing import Any, TypeVar

import orjson

from router_svc import errors

_T = TypeVar("_T")

MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512

_NAME_PATTERN = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


def copy_json(value: _T) -> _T:
    """A deep copy of a JSON value; orjson's round trip is several times faster than deepcopy."""
    try:
        copied: _T = orjson.loads(orjson.dumps(value))
        return copied
    except TypeError:  # not JSON-serializable by orjson (an integer above 64 bits, ...)
        return copy.deepcopy(value)


# --- errors ----------------------------------------------------------------------------------


def kind(value: object) -> str:
    """What ``value`` is, in the words of OpenAI's ``invalid_type`` messages."""
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
        f"Invalid type for '{param}': expected {expected}, but got {kind(value)} instead.",
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


def quoted_list(values: Collection[str]) -> str:
    quoted = [f"'{v}'" for v in values]
    if len(quoted) <= 2:
        return " and ".join(quoted)
    return ", ".join(quoted[:-1]) + ", and " + quoted[-1]


def invalid_value(param: str, value: object, supported: Collection[str]) -> errors.InvalidRequest:
    return errors.InvalidRequest(
        f"Invalid value: '{value}'. Supported values are: {quoted_list(supported)}.",
        param=param,
        code="invalid_value",
    )


# --- typed getters (null means absent everywhere, as in OpenAI's API) ------------------------


def check_keys(value: Mapping[str, Any], allowed: Collection[str], path: str) -> None:
    """Refuses the first key of ``value`` not in ``allowed`` (``unknown_parameter``)."""
    for key in value:
        if key not in allowed:
            raise unknown(f"{path}.{key}" if path else key)


def obj(value: object, param: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise invalid_type(param, "an object", value)
    return value


def array(value: object, param: str) -> list[Any]:
    if not isinstance(value, list):
        raise invalid_type(param, "an array", value)
    return value


def string(value: object, param: str, *, max_length: int | None = None) -> str:
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


def nonempty(value: object, param: str) -> str:
    text = string(value, param)
    if not text:
        raise errors.InvalidRequest(
            f"Invalid '{param}': empty string. Expected a string with minimum length 1, but got "
            "an empty string instead.",
            param=param,
            code="empty_string",
        )
    return text


def boolean(value: object, param: str) -> bool:
    if not isinstance(value, bool):
        raise invalid_type(param, "a boolean", value)
    return value


def integer(
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


def decimal(value: object, param: str, *, minimum: float, maximum: float) -> float:
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


def enum(value: object, param: str, allowed: Collection[str]) -> str:
    text = string(value, param)
    if text not in allowed:
        raise invalid_value(param, text, allowed)
    return text


def required(parent: Mapping[str, Any], key: str, path: str) -> Any:
    """``parent[key]``, refused as missing when absent or null."""
    value = parent.get(key)
    if value is None:
        raise missing(f"{path}.{key}" if path else key)
    return value


def prefixed_id(value: object, param: str, prefix: str) -> str:
    text = nonempty(value, param)
    if not text.startswith(prefix):
        raise errors.InvalidRequest(
            f"Invalid '{param}': '{text}'. Expected an ID that begins with '{prefix}'.",
            param=param,
            code="invalid_value",
        )
    return text


# --- names and metadata ----------------------------------------------------------------------


def name(value: object, param: str) -> str:
    """A name of a function or schema (OpenAI's pattern: letters, digits, ``_`` and ``-``)."""
    text = string(value, param)
    if not _NAME_PATTERN.match(text):
        raise errors.InvalidRequest(
            f"Invalid '{param}': string does not match pattern. Expected a string that matches "
            "the pattern '^[a-zA-Z0-9_-]{1,64}$'.",
            param=param,
            code="invalid_value",
        )
    return text


def metadata(value: object, *, param: str = "metadata") -> dict[str, str]:
    """Checks OpenAI's metadata limits: 16 pairs, keys up to 64 and values up to 512 characters."""
    if value is None:
        return {}
    pairs = obj(value, param)
    if len(pairs) > MAX_METADATA_PAIRS:
        raise errors.InvalidRequest(
            f"Invalid '{param}': too many properties. Expected an object with at most "
            f"{MAX_METADATA_PAIRS} properties, but got an object with {len(pairs)} properties "
            "instead.",
            param=param,
            code="object_above_max_properties",
        )
    out: dict[str, str] = {}
    for key, item in pairs.items():
        if len(key) > MAX_METADATA_KEY:
            raise errors.InvalidRequest(
                f"Invalid '{param}': key too long. Expected keys with maximum length "
                f"{MAX_METADATA_KEY}, but got a key with length {len(key)} instead.",
                param=param,
                code="string_above_max_length",
            )
        if not isinstance(item, str):
            raise errors.InvalidRequest(
                f"Invalid type for '{param}.{key}': expected a string, but got {kind(item)} "
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
