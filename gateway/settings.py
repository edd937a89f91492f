"""Settings that are both command-line flags and environment variables.

Each service declares its settings once as a frozen dataclass whose fields carry an :func:`option`
(flag help and environment variable). :func:`add_arguments` turns them into argparse flags whose
defaults come from the environment, and :func:`from_namespace` builds the dataclass back. A flag
wins over its environment variable, which wins over the built-in default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, TypeVar

T = TypeVar("T")

ENV_PREFIX = "RESPGW_"


def option(default: Any, help: str, *, env: str) -> Any:
    """A settings field: ``env`` is the environment variable, ``help`` the flag's help text."""
    return dataclasses.field(default=default, metadata={"help": help, "env": env})


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
    hints = {f.name: f for f in dataclasses.fields(cls)}
    for name, f in hints.items():
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
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    return cls(**{n: getattr(ns, n) for n in names})


def env_names(cls: type[Any]) -> list[str]:
    """Every environment variable a settings dataclass reads (the deploy tests check these)."""
    return [f.metadata["env"] for f in dataclasses.fields(cls)]
