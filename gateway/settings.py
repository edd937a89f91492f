"""Settings that are both command-line flags and environment variables.

Each service declares its settings once as a frozen dataclass whose fields carry an :func:`option`
(flag help and environment variable). :func:`add_arguments` turns them into argparse flags whose
defaults come from the environment, and :func:`from_namespace` builds the dataclass back. A flag
wins over its environment variable, which wins over the built-in default. The settings every
server shares are declared once, in :class:`ServerSettings`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

T = TypeVar("T")

ENV_PREFIX = "RESPGW_"


def option(default: Any, help: str, *, env: str) -> Any:
    """A settings field: ``env`` is the environment variable, ``help`` the flag's help text."""
    return dataclasses.field(default=default, metadata={"help": help, "env": env})


@dataclass(frozen=True)
class ServerSettings:
    """What every server of the gateway takes alike (its logs and traces): each service's
    settings dataclass derives from it and adds its own fields."""

    #: Fields of the dataclass that are not flags (a subclass that fixes them itself, as
    #: ``respgw local`` fixes the router's state address): they keep their default.
    not_flags: ClassVar[frozenset[str]] = frozenset()

    otel_endpoint: str = option(
        "",
        "OTLP/gRPC endpoint that receives OpenTelemetry traces (e.g. http://otel-collector:4317); "
        "empty turns tracing off. Needs the 'tracing' extra installed; without it the service "
        "logs an error and runs untraced.",
        env="RESPGW_OTEL_ENDPOINT",
    )
    log_level: str = option("info", "Log level.", env="RESPGW_LOG_LEVEL")
    log_format: str = option("json", "Log format: json or text.", env="RESPGW_LOG_FORMAT")


_SHARED = frozenset(f.name for f in dataclasses.fields(ServerSettings))


def _flags(cls: type[Any]) -> list[dataclasses.Field[Any]]:
    """The fields of ``cls`` that are flags: its own first, then the shared ones of
    :class:`ServerSettings` (so ``--help`` reads from the specific to the general)."""
    skip: frozenset[str] = getattr(cls, "not_flags", frozenset())
    fields = [f for f in dataclasses.fields(cls) if f.name not in skip]
    return [f for f in fields if f.name not in _SHARED] + [f for f in fields if f.name in _SHARED]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _convert(kind: type, raw: str) -> Any:
    if kind is bool:
        return _parse_bool(raw)
    return kind(raw)


def add_arguments(parser: argparse.ArgumentParser, cls: type[Any]) -> None:
    """Adds one flag per field of the settings dataclass ``cls``."""
    for f in _flags(cls):
        name = f.name
        env = f.metadata["env"]
        kind = type(f.default)
        default = f.default
        if env in os.environ:
            try:
                default = _convert(kind, os.environ[env])
            except ValueError as exc:
                parser.error(f"environment variable {env}: {exc}")
        shown = "(empty)" if f.default == "" else repr(f.default)
        help_text = f"{f.metadata['help']} Environment: {env}. Default: {shown}."
        if kind is bool:
            parser.add_argument(
                _flag(name),
                dest=name,
                default=default,
                type=_parse_bool,
                nargs="?",
                const=True,
                metavar="BOOL",
                help=help_text,
            )
        else:
            parser.add_argument(_flag(name), dest=name, default=default, type=kind, help=help_text)


def from_namespace(cls: type[T], ns: argparse.Namespace) -> T:
    """Builds the settings dataclass ``cls`` from parsed arguments."""
    return cls(**{f.name: getattr(ns, f.name) for f in _flags(cls)})


def env_names(cls: type[Any]) -> list[str]:
    """Every environment variable a settings dataclass reads (the deploy tests check these)."""
    return [f.metadata["env"] for f in _flags(cls)]
