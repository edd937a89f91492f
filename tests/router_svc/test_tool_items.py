"""The stateful tools' items (router_svc.tool_items): the names offered to a chat model, a call's
arguments read, its items and the model's text of its result, and stored items replayed to a chat
hub. Pure functions: no service is involved (the loop's tests run them against real ones)."""

from __future__ import annotations

import orjson

from router_svc import tool_items
from router_svc.execution import CommandOutput, ExecResult, FileInfo

OFFER = tool_items.Offer(tool_items.SHELL, "shell", "cntr_1", b"")


def test_the_offered_names_avoid_the_callers_function_names() -> None:
    assert tool_items.Names.avoiding([]) == tool_items.Names("python", "shell")
    caller = [
        {"type": "function", "name": "python", "parameters": {}},
        {"type": "function", "name": "python_tool", "parameters": {}},
        {"type": "function", "name": "shell", "parameters": {}},
    ]
    assert tool_items.Names.avoiding(caller) == tool_items.Names("python_tool_2", "shell_tool")


def test_an_offer_is_a_function_tool_with_a_copy_of_its_schema() -> None:
    tool = tool_items.Offer(tool_items.CODE_INTERPRETER, "py", "cntr_1", b"").chat_tool()
    assert tool["function"]["name"] == "py"
    assert tool["function"]["parameters"]["required"] == ["code"]
    tool["function"]["parameters"]["required"].append("x")
    assert tool_items.PYTHON_PARAMETERS["required"] == ["code"]
    assert OFFER.chat_tool()["function"]["parameters"]["required"] == ["commands"]


def test_a_python_calls_arguments() -> None:
    assert tool_items.parse_python('{"code": "print(1)"}') == ("print(1)", "")
    assert tool_items.parse_python("print(2)") == ("print(2)", "")  # bare code, not JSON
    assert tool_items.parse_python("  ")[0] == "" and tool_items.parse_python("  ")[1]
    code, problem = tool_items.parse_python('{"source": "x"}')
    assert code == "" and "nothing ran" in problem


def test_a_shell_calls_arguments() -> None:
    action, problem = tool_items.parse_shell(
        '{"commands": "ls", "timeout_ms": 500, "max_output_length": true}'
    )
    assert problem == ""
    assert action == {"commands": ["ls"], "timeout_ms": 500, "max_output_length": None}
    for bad in ('{"commands": []}', '{"commands": [" "]}', "ls", "[]"):
        action, problem = tool_items.parse_shell(bad)
        assert action["commands"] == [] and "nothing ran" in problem


def test_a_shell_results_entries_and_text() -> None:
    action = {"commands": ["echo hi", "sleep 9", "never"], "max_output_length": 2}
    result = ExecResult(
        commands=[
            CommandOutput(index=0, outcome="exited", stdout="hi\n", stderr=""),
            CommandOutput(index=1, outcome="timed_out", message="stopped"),
        ],
        files=[FileInfo("cfile_1", "/mnt/data/a.txt", 3, 0, "assistant", "text/plain")],
        error="the session expired",
    )
    entries = tool_items.shell_entries(action, result)
    assert entries == [
        {"stdout": "hi", "stderr": "", "outcome": {"type": "exit", "exit_code": 0}},
        {"stdout": "", "stderr": "stopped", "outcome": {"type": "timeout"}},
        {
            "stdout": "",
            "stderr": "the session expired",
            "outcome": {"type": "exit", "exit_code": 1},
        },
    ]
    text = tool_items.shell_text(action, entries, result, 1000)
    assert text.splitlines() == [
        "$ echo hi",
        "hi",
        "[exit code 0]",
        "$ sleep 9",
        "stopped",
        "[timed out]",
        "$ never",
        "the session expired",
        "[exit code 1]",
        "[files written: /mnt/data/a.txt]",
    ]


def test_a_python_results_text_is_clipped_in_the_middle() -> None:
    result = ExecResult(
        commands=[CommandOutput(index=0, outcome="exited", stdout="a" * 600 + "z" * 600)]
    )
    text = tool_items.python_text(result, 300)
    assert text.startswith("a" * 200) and text.endswith("z" * 100)
    assert "[... 900 characters left out ...]" in text
    assert tool_items.python_text(ExecResult(), 300) == "(no output)"
    assert tool_items.python_logs(ExecResult(error="unreachable")) == "[unreachable]"


def test_stored_items_replay_as_the_function_calls_and_outputs_they_were() -> None:
    names = tool_items.Names("python", "sh")
    ci = tool_items.ci_item(OFFER, item_id="ci_1", code="print(1)")
    ci["outputs"] = [{"type": "logs", "logs": "1\n" * 10}, {"type": "image", "url": "data:"}]
    answered = tool_items.shell_call_item(OFFER, "call_a", {"commands": ["ls"]})
    output = tool_items.shell_output_item("call_a", {"commands": ["ls"]})
    output["output"] = [
        {"stdout": "f\n", "stderr": "", "outcome": {"type": "exit", "exit_code": 0}}
    ]
    unanswered = tool_items.shell_call_item(OFFER, "call_b", {"commands": ["pwd"]})
    message = {"type": "message", "role": "user", "content": "hi"}
    replayed = tool_items.replayable([message, ci, answered, output, unanswered], names, limit=8)
    assert [(i["type"], i.get("call_id"), i.get("name")) for i in replayed] == [
        ("message", None, None),
        ("function_call", "ci_1", "python"),
        ("function_call_output", "ci_1", None),
        ("function_call", "call_a", "sh"),
        ("function_call_output", "call_a", None),
        ("function_call", "call_b", "sh"),
        ("function_call_output", "call_b", None),
    ]
    assert orjson.loads(replayed[1]["arguments"]) == {"code": "print(1)"}
    assert "characters left out" in replayed[2]["output"]  # cut to the limit
    assert orjson.loads(replayed[3]["arguments"]) == {"commands": ["ls"]}
    assert replayed[4]["output"] == "f\n[exit code 0]"
    assert replayed[6]["output"] == "(This call was not run.)"
    assert replayed[0] == message and replayed[0] is not message
