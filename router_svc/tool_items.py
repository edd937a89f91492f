"""The stateful tools' items: code_interpreter and shell as the client sees them, and as a chat
model knew them.

The tool loop (:mod:`router_svc.tool_loop`) offers each tool to a chat model as a function tool:
a ``python`` tool taking ``{"code"}`` and a ``shell`` tool taking ``{"commands", "timeout_ms",
"max_output_length"}`` (other names when the caller's tools already use these: :class:`Names`).
What the client sees is OpenAI's: a ``code_interpreter_call`` item (code, container_id, status,
and ``outputs`` -- logs and images -- when ``include`` asks for
``code_interpreter_call.outputs``: they are always stored, see :mod:`router_svc.include`), or a
``shell_call`` and its ``shell_call_output`` (a local shell's ``shell_call`` is returned to the
client, which sends the output). This module builds those items from a call's arguments and its
result, and the text the model reads of a result. The items are stored whole;
a later turn replays them to the hub as the function calls and outputs they were
(:func:`replayable`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import orjson

from router_svc import execution
from router_svc.dialects import chat
from router_svc.ids import new_id
from router_svc.shapes import Item

CODE_INTERPRETER = "code_interpreter"
SHELL = "shell"
STATEFUL = (CODE_INTERPRETER, SHELL)

PYTHON_DESCRIPTION = (
    "Runs Python code in a stateful sandbox, like a notebook: variables, imports and files "
    "persist from one call to the next. The working directory is /mnt/data; files written there "
    "are kept and shown to the user. There is no internet access. Returns what the code printed "
    "(stdout and stderr); the value of a last bare expression is printed too. A call that runs "
    "too long or uses too much memory is stopped."
)
PYTHON_PARAMETERS: Mapping[str, Any] = {
    "type": "object",
    "properties": {"code": {"type": "string", "description": "The Python code to run."}},
    "required": ["code"],
    "additionalProperties": False,
}
SHELL_DESCRIPTION = (
    "Runs shell commands (/bin/sh) one after the other in a sandbox whose working directory, "
    "/mnt/data, keeps its files from one call to the next. There is no internet access. Returns "
    "each command's stdout, stderr and exit code."
)
SHELL_PARAMETERS: Mapping[str, Any] = {
    "type": "object",
    "properties": {
        "commands": {
            "type": "array",
            "items": {"type": "string"},
            "description": "The commands to run, in order.",
        },
        "timeout_ms": {"type": "integer", "description": "A time limit for each command."},
        "max_output_length": {
            "type": "integer",
            "description": "The most characters of stdout and of stderr to return per command.",
        },
    },
    "required": ["commands"],
    "additionalProperties": False,
}
# A local shell (environment "local" or none): the client runs the commands, on its own machine.
LOCAL_SHELL_DESCRIPTION = (
    "Runs shell commands one after the other on the user's computer, in the user's own shell "
    "environment. Returns each command's stdout, stderr and exit code."
)
# The environment a local shell_call shows (ResponseLocalEnvironment).
LOCAL_ENVIRONMENT: Mapping[str, Any] = MappingProxyType({"type": "local"})


# --- names, and the history as a chat model knows it ---------------------------------------


@dataclass(frozen=True)
class Names:
    """The function names the stateful tools go by, clear of the caller's tool names."""

    python: str = "python"
    shell: str = "shell"

    @classmethod
    def avoiding(cls, tools: Iterable[Mapping[str, Any]]) -> Names:
        taken = {f.chat_name for f in chat.ChatToolset(tools).functions}
        return cls(python=_free("python", taken), shell=_free("shell", taken))


def _free(name: str, taken: set[str]) -> str:
    candidate, n = name, 1
    while candidate in taken:
        candidate = f"{name}_tool" if n == 1 else f"{name}_tool_{n}"
        n += 1
    return candidate


def replayable(
    items: Iterable[Mapping[str, Any]],
    names: Names,
    limit: int = 0,
    answered_later: Iterable[str] = (),
) -> list[Item]:
    """Items with every stateful tool call turned into the function call and output a chat
    model made and read (a call whose output is missing, here and in ``answered_later`` -- the
    shell calls the new input answers -- gets a placeholder, since chat hubs want an answer to
    every call); a python call's logs are cut to ``limit`` characters (0: not cut), as the model
    read them."""
    items = list(items)
    answered = {str(i.get("call_id")) for i in items if i.get("type") == "shell_call_output"}
    answered.update(answered_later)
    out: list[Item] = []
    for item in items:
        kind = item.get("type")
        if kind == "code_interpreter_call":
            call_id = str(item.get("id", ""))
            out.append(_function_call(call_id, names.python, {"code": item.get("code") or ""}))
            out.append(_function_output(call_id, _logs_of(item, limit)))
        elif kind == "shell_call":
            call_id = str(item.get("call_id", ""))
            action = item.get("action") if isinstance(item.get("action"), dict) else {}
            arguments = {k: v for k, v in (action or {}).items() if v is not None}
            out.append(_function_call(call_id, names.shell, arguments))
            if call_id not in answered:
                out.append(_function_output(call_id, "(This call was not run.)"))
        elif kind == "shell_call_output":
            out.append(_function_output(str(item.get("call_id", "")), _shell_output_text(item)))
        else:
            out.append(dict(item))
    return out


def _function_call(call_id: str, name: str, arguments: Mapping[str, Any]) -> Item:
    return {
        "type": "function_call",
        "call_id": call_id,
        "name": name,
        "arguments": orjson.dumps(arguments).decode(),
    }


def _function_output(call_id: str, text: str) -> Item:
    return {"type": "function_call_output", "call_id": call_id, "output": text}


def _logs_of(item: Mapping[str, Any], limit: int = 0) -> str:
    outputs = item.get("outputs")
    if not isinstance(outputs, list):
        # Stored before outputs were always kept.
        return "(The output of this call was not kept.)"
    logs = [
        str(o.get("logs", "")) for o in outputs if isinstance(o, dict) and o.get("type") == "logs"
    ]
    images = sum(1 for o in outputs if isinstance(o, dict) and o.get("type") == "image")
    text = "\n".join(logs)
    if images:
        text += f"\n[{images} image(s) shown to the user]"
    text = text.strip() or "(no output)"
    return _clip(text, limit) if limit else text


def _shell_output_text(item: Mapping[str, Any]) -> str:
    parts: list[str] = []
    for entry in item.get("output") or []:
        if not isinstance(entry, dict):
            continue
        parts += [str(entry.get("stdout") or ""), str(entry.get("stderr") or "")]
        outcome = entry.get("outcome") or {}
        if outcome.get("type") == "timeout":
            parts.append("[timed out]")
        elif outcome.get("type") == "exit":
            parts.append(f"[exit code {outcome.get('exit_code')}]")
    return "\n".join(p.rstrip("\n") for p in parts if p) or "(no output)"


# --- one call ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Offer:
    """A stateful tool offered to the model: its kind, the function name, and the session; or
    a local shell (``local``), whose calls go back to the client (no session, no state)."""

    kind: str
    chat_name: str
    session_id: str
    state: bytes
    local: bool = False
    description: str = ""  # a local shell's: its skills named

    @classmethod
    def local_shell(cls, chat_name: str, tool: Mapping[str, Any]) -> Offer:
        """The offer of a local shell tool, the skills of its environment described."""
        environment = tool.get("environment") or {}
        skills = [s for s in environment.get("skills") or [] if isinstance(s, Mapping)]
        description = LOCAL_SHELL_DESCRIPTION
        if skills:
            listed = "\n".join(
                f"- {s.get('name')}: {s.get('description')} (in {s.get('path')})" for s in skills
            )
            description += f"\n\nSkills available on the user's computer:\n{listed}"
        return cls(SHELL, chat_name, "", b"", local=True, description=description)

    def chat_tool(self) -> dict[str, Any]:
        if self.kind == CODE_INTERPRETER:
            description, parameters = PYTHON_DESCRIPTION, PYTHON_PARAMETERS
        else:
            description, parameters = self.description or SHELL_DESCRIPTION, SHELL_PARAMETERS
        return {
            "type": "function",
            "function": {
                "name": self.chat_name,
                "description": description,
                "parameters": copy.deepcopy(dict(parameters)),
            },
        }


def parse_python(arguments: str) -> tuple[str, str]:
    """(code, problem): the code of a python call; its raw arguments when they are not JSON (a
    model that sends bare code)."""
    try:
        parsed = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        return (arguments, "") if arguments.strip() else ("", "The call had no code.")
    if isinstance(parsed, dict) and isinstance(parsed.get("code"), str) and parsed["code"].strip():
        return parsed["code"], ""
    return "", 'The python tool takes {"code": "<the Python code>"}; nothing ran.'


def parse_shell(arguments: str) -> tuple[dict[str, Any], str]:
    """(action, problem): a shell call's action as the shell_call item shows it."""
    try:
        parsed = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        parsed = None
    action: dict[str, Any] = {"commands": [], "timeout_ms": None, "max_output_length": None}
    if not isinstance(parsed, dict):
        return action, 'The shell tool takes {"commands": ["<a command>", ...]}; nothing ran.'
    commands = parsed.get("commands")
    if isinstance(commands, str):
        commands = [commands]
    if (
        not isinstance(commands, list)
        or not commands
        or not all(isinstance(c, str) and c.strip() for c in commands)
    ):
        return action, 'The shell tool takes {"commands": ["<a command>", ...]}; nothing ran.'
    action["commands"] = commands
    for key in ("timeout_ms", "max_output_length"):
        value = parsed.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            action[key] = value
    return action, ""


def ci_item(offer: Offer, *, item_id: str = "", code: str = "") -> Item:
    return {
        "id": item_id or new_id("ci"),
        "type": "code_interpreter_call",
        "status": "in_progress",
        "code": code,
        "container_id": offer.session_id,
        "outputs": None,
    }


def shell_call_item(offer: Offer, call_id: str, action: Mapping[str, Any]) -> Item:
    environment: dict[str, Any] = (
        dict(LOCAL_ENVIRONMENT)
        if offer.local
        else {"type": "container_reference", "container_id": offer.session_id}
    )
    return {
        "id": new_id("sh"),
        "type": "shell_call",
        "status": "in_progress",
        "call_id": call_id,
        "action": dict(action),
        "environment": environment,
    }


def shell_output_item(call_id: str, action: Mapping[str, Any]) -> Item:
    return {
        "id": new_id("sho"),
        "type": "shell_call_output",
        "status": "in_progress",
        "call_id": call_id,
        "output": [],
        "max_output_length": action.get("max_output_length"),
    }


def _clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    head, tail = limit * 2 // 3, limit // 3
    left_out = len(text) - head - tail
    return f"{text[:head]}\n[... {left_out} characters left out ...]\n{text[-tail:]}"


def python_logs(result: execution.ExecResult) -> str:
    """What a python call printed, with what the sandbox said about it."""
    parts: list[str] = []
    for command in result.commands:
        parts += [command.stdout, command.stderr]
        if command.message:
            parts.append(f"[{command.message}]")
    if result.error:
        parts.append(f"[{result.error}]")
    return "\n".join(p.rstrip("\n") for p in parts if p)


def python_text(result: execution.ExecResult, limit: int) -> str:
    """The python tool's answer, as the model reads it."""
    text = python_logs(result)
    if result.files:
        written = ", ".join(f"{f.path} ({f.size_bytes} bytes)" for f in result.files)
        text += f"\n[files written: {written}]"
    return _clip(text.strip() or "(no output)", limit)


def shell_entries(action: Mapping[str, Any], result: execution.ExecResult) -> list[dict[str, Any]]:
    """The ``output`` of a shell_call_output: one entry per command."""
    cap = action.get("max_output_length")
    by_index = {c.index: c for c in result.commands}
    entries: list[dict[str, Any]] = []
    for index, _ in enumerate(action.get("commands") or []):
        command = by_index.get(index)
        if command is None:
            note = result.error or "The command did not run."
            entries.append(
                {"stdout": "", "stderr": note, "outcome": {"type": "exit", "exit_code": 1}}
            )
            continue
        stdout, stderr = command.stdout, command.stderr
        if isinstance(cap, int):
            stdout, stderr = stdout[:cap], stderr[:cap]
        if command.message:
            stderr = f"{stderr}{'' if not stderr or stderr.endswith(chr(10)) else chr(10)}{command.message}"
        if command.outcome == "timed_out":
            outcome: dict[str, Any] = {"type": "timeout"}
        elif command.outcome == "exited":
            outcome = {"type": "exit", "exit_code": command.exit_code}
        else:
            outcome = {"type": "exit", "exit_code": command.exit_code or 1}
        entries.append({"stdout": stdout, "stderr": stderr, "outcome": outcome})
    return entries


def shell_text(
    action: Mapping[str, Any],
    entries: list[dict[str, Any]],
    result: execution.ExecResult,
    limit: int,
) -> str:
    parts: list[str] = []
    for command, entry in zip(action.get("commands") or [], entries, strict=False):
        parts.append(f"$ {command}")
        parts += [entry["stdout"].rstrip("\n"), entry["stderr"].rstrip("\n")]
        outcome = entry["outcome"]
        parts.append(
            "[timed out]" if outcome["type"] == "timeout" else f"[exit code {outcome['exit_code']}]"
        )
    if result.files:
        parts.append("[files written: " + ", ".join(f.path for f in result.files) + "]")
    return _clip("\n".join(p for p in parts if p), limit)
