"""The log formatters of gateway.logs: one JSON object a line, with the request id and extras."""

from __future__ import annotations

import logging
import sys
import time

import orjson

from gateway import logs


def record(created: float, **extra: object) -> logging.LogRecord:
    rec = logging.makeLogRecord({"name": "respgw.access", "levelno": 20, "levelname": "INFO"})
    rec.msg = "request"
    rec.created = created
    rec.msecs = (created - int(created)) * 1000
    rec.__dict__.update(extra)
    return rec


def test_a_json_line_holds_time_level_logger_message_request_id_and_extras() -> None:
    formatter = logs.JsonFormatter()
    token = logs.request_id_var.set("req_abc")
    try:
        line = formatter.format(record(1_800_000_000.25, method="POST", status=200, _hidden=1))
    finally:
        logs.request_id_var.reset(token)
    assert orjson.loads(line) == {
        "ts": "2027-01-15T08:00:00.250Z",
        "level": "info",
        "logger": "respgw.access",
        "msg": "request",
        "request_id": "req_abc",
        "method": "POST",
        "status": 200,
    }


def test_each_line_has_its_own_second_and_milliseconds() -> None:
    formatter = logs.JsonFormatter()
    now = time.time()
    stamps = [
        orjson.loads(formatter.format(record(at)))["ts"]
        for at in (now, now + 0.5, now + 1.0, now + 61.999, now)
    ]
    expected = [
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(int(at)))
        + f".{int((at - int(at)) * 1000):03d}Z"
        for at in (now, now + 0.5, now + 1.0, now + 61.999, now)
    ]
    assert stamps == expected


def test_a_text_line_is_the_standard_format_then_request_id_and_extras() -> None:
    formatter = logs.TextFormatter(logs.TEXT_FORMAT)
    standard = logging.Formatter(logs.TEXT_FORMAT)
    # Within one second, across seconds, at the edges of a second.
    for created in (1_800_000_000.25, 1_800_000_000.999, 1_800_000_001.0, 1_800_000_061.5):
        rec = record(created, method="POST", status=200, _hidden=1)
        token = logs.request_id_var.set("req_abc")
        try:
            line = formatter.format(rec)
        finally:
            logs.request_id_var.reset(token)
        assert line == f"{standard.format(rec)} method=POST status=200 request_id=req_abc"
    assert formatter.format(record(1_800_000_000.5)) == standard.format(record(1_800_000_000.5))


def test_a_text_line_with_an_exception_holds_its_traceback() -> None:
    formatter = logs.TextFormatter(logs.TEXT_FORMAT)
    try:
        raise ValueError("boom")
    except ValueError:
        rec = logging.makeLogRecord(
            {"name": "respgw", "levelno": 40, "levelname": "ERROR", "msg": "failed"}
        )
        rec.exc_info = sys.exc_info()
    line = formatter.format(rec)
    assert " ERROR respgw: failed\nTraceback" in line and "ValueError: boom" in line
