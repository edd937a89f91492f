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


class Recorder:
    """A stream that keeps each write."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def batching(flush_s: float, max_bytes: int = 64 * 1024) -> tuple[logging.Logger, Recorder]:
    stream = Recorder()
    handler = logs.BatchingHandler(stream, flush_s, max_bytes)
    handler.setFormatter(logging.Formatter("%(name)s %(message)s"))
    root = logging.getLogger("batching-test")
    root.handlers[:] = [handler]
    root.propagate = False
    root.setLevel(logging.INFO)
    return root, stream


def access(root: logging.Logger) -> logging.Logger:
    # The access logger's name, under the test's own root (so pytest's handlers see nothing).
    child = logging.getLogger(logs.ACCESS_LOGGER)
    child.handlers[:] = root.handlers
    child.propagate = False
    child.setLevel(logging.INFO)
    return child


def test_access_lines_are_written_in_one_batch_within_flush_s() -> None:
    root, stream = batching(0.2)
    log = access(root)
    try:
        for i in range(50):
            log.info("request %d", i)
        assert stream.writes == []  # none written yet: they wait for the batch
        deadline = time.monotonic() + 5
        while not stream.writes and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(stream.writes) == 1
        assert stream.writes[0].splitlines() == [f"respgw.access request {i}" for i in range(50)]
    finally:
        log.handlers[:] = []


def test_any_other_line_writes_the_waiting_batch_first_and_itself_at_once() -> None:
    root, stream = batching(60)
    log = access(root)
    try:
        log.info("request 1")
        log.info("request 2")
        root.warning("something else")
        assert "".join(stream.writes).splitlines() == [
            "respgw.access request 1",
            "respgw.access request 2",
            "batching-test something else",
        ]
    finally:
        log.handlers[:] = []


def test_a_full_batch_is_written_at_once_and_flush_writes_the_rest() -> None:
    root, stream = batching(60, max_bytes=200)
    log = access(root)
    try:
        for i in range(10):
            log.info("request %d", i)  # 24 characters a line: a batch every 9 lines
        assert len(stream.writes) == 1 and len(stream.writes[0].splitlines()) == 9
        logs.BatchingHandler.flush(root.handlers[0])  # type: ignore[arg-type]
        assert "".join(stream.writes).splitlines()[-1] == "respgw.access request 9"
    finally:
        log.handlers[:] = []


def test_flush_s_zero_writes_every_access_line_at_once() -> None:
    root, stream = batching(0)
    log = access(root)
    try:
        log.info("request 1")
        assert stream.writes == ["respgw.access request 1\n"]
    finally:
        log.handlers[:] = []
