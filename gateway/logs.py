"""Structured logging: one JSON object per line, with the request id of the current request.

The request id lives in a context variable; the router sets it per HTTP request and sends it on in
the ``x-request-id`` gRPC metadata and HTTP header, and the gRPC services set it from that metadata,
so one id follows a turn through every service.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import threading
import time
from typing import Any

import orjson

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")

REQUEST_ID_HEADER = "x-request-id"

#: The logger of the router's one line per request.
ACCESS_LOGGER = "respgw.access"

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


class BatchingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that writes the access log's lines in batches: at most ``flush_s``
    seconds late, or as soon as ``max_bytes`` wait, and always before any other line (so the
    log keeps its order) and at exit (``logging.shutdown``). Every other record is written at
    once, as by a plain StreamHandler.

    One write to stderr per request cost the router about 5% of its CPU under load (a system
    call each); batched, it is one write per ``flush_s`` or ``max_bytes``, as nginx's
    ``access_log ... buffer= flush=`` does. What a crash (SIGKILL) loses is at most the last
    ``flush_s`` of access lines; ``flush_s`` 0 writes every line at once."""

    def __init__(self, stream: Any, flush_s: float, max_bytes: int = 64 * 1024) -> None:
        super().__init__(stream)
        self.flush_s = flush_s
        self.max_bytes = max_bytes
        self._pending: list[str] = []
        self._pending_chars = 0
        self._flusher: threading.Thread | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.flush_s <= 0 or record.name != ACCESS_LOGGER:
            if self._pending:
                self._write_pending()
            super().emit(record)
            return
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self._pending.append(line)
        self._pending_chars += len(line) + 1
        if self._pending_chars >= self.max_bytes:
            self._write_pending()
        elif self._flusher is None:
            self._flusher = threading.Thread(
                target=self._flush_every, name="access-log-flush", daemon=True
            )
            self._flusher.start()

    def _write_pending(self) -> None:
        """Writes what waits (the caller holds the handler's lock)."""
        lines, self._pending = self._pending, []
        self._pending_chars = 0
        try:
            self.stream.write("\n".join(lines) + "\n")
            self.stream.flush()
        except Exception:
            # As StreamHandler.emit: a log that cannot be written must not fail the request.
            self.handleError(logging.makeLogRecord({"msg": "access log write failed"}))

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            if self._pending:
                self._write_pending()
        super().flush()

    def _flush_every(self) -> None:
        while True:
            time.sleep(self.flush_s)
            if self._pending:
                with self.lock:  # type: ignore[union-attr]
                    if self._pending:
                        self._write_pending()


def setup(level: str = "info", fmt: str = "json", *, access_flush_s: float = 0.0) -> None:
    """Configures the root logger once per process. ``access_flush_s`` > 0 writes the access
    log (:data:`ACCESS_LOGGER`) in batches at most that late (:class:`BatchingHandler`)."""
    # No formatter here shows the caller's file and line, thread or process: skip collecting
    # them for every record (the logging HOWTO's "Optimization"; the access log writes a record
    # per request).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = BatchingHandler(sys.stderr, access_flush_s)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def flush() -> None:
    """Writes what the root logger's handlers hold (the access log's batch)."""
    for handler in logging.getLogger().handlers:
        handler.flush()
