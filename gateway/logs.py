"""Structured logging: one JSON object per line, with the request id of the current request.

The request id lives in a context variable; the router sets it per HTTP request and sends it on in
the ``x-request-id`` gRPC metadata and HTTP header, and the gRPC services set it from that metadata,
so one id follows a turn through every service.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import time

import orjson

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")

REQUEST_ID_HEADER = "x-request-id"

# What TextFormatter writes (it writes it without the % machinery, but the same).
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# color_message is uvicorn's ANSI-coloured copy of the message: noise in a log line.
_STANDARD_ATTRS = set(vars(logging.makeLogRecord({}))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}


class JsonFormatter(logging.Formatter):
    # The last second formatted (the access log writes a line per request: strftime once a
    # second, not once a line).
    _second: tuple[int, str] = (-1, "")

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second[0]:
            self._second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
        out: dict[str, object] = {
            "ts": f"{self._second[1]}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = request_id_var.get()
        if rid:
            out["request_id"] = rid
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


class TextFormatter(logging.Formatter):
    """``<local time> <LEVEL> <logger>: <message> key=value ...``, the time as the standard
    ``%(asctime)s`` writes it. The time of day is formatted once a second (as JsonFormatter's),
    not once a line: the access log writes a line per request."""

    _second: tuple[int, str] = (-1, "")

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info:
            base = super().format(record)
        else:
            second = int(record.created)
            if second != self._second[0]:
                self._second = (
                    second,
                    time.strftime(self.default_time_format, self.converter(second)),
                )
            base = (
                f"{self._second[1]},{int(record.msecs):03d} {record.levelname} {record.name}: "
                f"{record.getMessage()}"
            )
        extras = {
            k: v
            for k, v in vars(record).items()
            if k not in _STANDARD_ATTRS and not k.startswith("_")
        }
        rid = request_id_var.get()
        if rid:
            extras["request_id"] = rid
        if extras:
            base += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        return base


def setup(level: str = "info", fmt: str = "json") -> None:
    """Configures the root logger once per process."""
    # No formatter here shows the caller's file and line, thread or process: skip collecting
    # them for every record (the logging HOWTO's "Optimization"; the access log writes a record
    # per request).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
