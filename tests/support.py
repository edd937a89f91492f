"""Starting the real gateway for tests: in a thread of the test process (fast), or as separate
processes exactly as Kubernetes would run them. Every server binds 127.0.0.1 with port 0."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import openai
import uvicorn

from router_svc import app as router_app
from router_svc.config import RouterSettings
from state_svc import server as state_server
from state_svc.config import StateSettings

T = TypeVar("T")
REPO = Path(__file__).resolve().parent.parent
POSTGRES_DSN = os.environ.get(
    "RESPGW_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test"
)


class ThreadLoop:
    """An event loop in a daemon thread; ``run`` executes a coroutine there and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class Stack:
    """The state service and the router, in-process, on their own event loop."""

    def __init__(
        self,
        hub_url: str,
        *,
        state: StateSettings | None = None,
        router: dict[str, Any] | None = None,
        state_port: int = 0,
    ) -> None:
        self.state_settings = state or replace(StateSettings(), backend="memory")
        self.state_settings = replace(self.state_settings, listen="127.0.0.1:0", metrics_port=0)
        self.router_overrides = {"hub_url": hub_url, **(router or {})}
        self.tl = ThreadLoop()
        self.port = 0
        self.state_port = 0
        self._clients: list[openai.OpenAI] = []
        # With state_port: a router only, on the state service of another stack (a replica).
        self.shared_state_port = state_port

    def client(self, api_key: str = "unused") -> openai.OpenAI:
        """A synchronous SDK client for this gateway, closed when the stack stops."""
        c = openai.OpenAI(base_url=self.url, api_key=api_key, max_retries=0)
        self._clients.append(c)
        return c

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> Stack:
        self.tl.run(self._start())
        return self

    async def _start(self) -> None:
        if self.shared_state_port:
            self._state_stopped = True  # not this stack's to stop
            self.state_port = self.shared_state_port
        else:
            self._state = await state_server.start(self.state_settings)
            self.state_port = self._state.port
        settings = replace(
            RouterSettings(),
            host="127.0.0.1",
            port=0,
            state_address=f"127.0.0.1:{self.state_port}",
            **self.router_overrides,
        )
        self.router_settings = settings
        # As `respgw router` serves it (the guarded protocol), in this thread's loop.
        config = router_app.server_config(
            router_app.create_app(settings), settings, loop="none", lifespan="on"
        )
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve())
        deadline = time.monotonic() + 10
        while not self._server.started:
            if self._task.done():
                self._task.result()
            if time.monotonic() > deadline:
                raise TimeoutError("router did not start")
            await asyncio.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]

    def stop(self) -> None:
        for c in self._clients:
            c.close()
        self.tl.run(self._stop())
        self.tl.close()

    def stop_state(self) -> None:
        """Stops the state service only (an outage, as the router sees it)."""
        self.tl.run(self._state.stop(0.5))
        self._state_stopped = True

    async def _stop(self) -> None:
        self._server.should_exit = True
        await self._task
        if not getattr(self, "_state_stopped", False):
            await self._state.stop(1.0)


class Process:
    """A gateway service as its own process (``python -m respgw_cli <command>``, the ``respgw`` command)."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.args = args
        self.env = {**os.environ, "RESPGW_LOG_FORMAT": "text", **(env or {})}
        self.lines: list[str] = []
        self.proc: subprocess.Popen[str] | None = None
        self.reader: threading.Thread | None = None

    def start(self, ready: str, timeout: float = 20) -> int:
        """Starts the process and waits for a log line matching ``ready`` (a regex whose group 1
        is the bound port); returns the port."""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "respgw_cli", *self.args],
            cwd=REPO,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        found = threading.Event()
        port: list[int] = []
        pattern = re.compile(ready)

        def read() -> None:
            assert self.proc is not None and self.proc.stderr is not None
            for line in self.proc.stderr:
                self.lines.append(line)
                m = pattern.search(line)
                if m and not found.is_set():
                    port.append(int(m.group(1)))
                    found.set()

        self.reader = threading.Thread(target=read, daemon=True)
        self.reader.start()
        if not found.wait(timeout):
            self.stop()
            raise TimeoutError(f"{self.args[0]} did not start:\n{''.join(self.lines[-30:])}")
        return port[0]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.reader is not None:
            self.reader.join(5)  # it reads to the end of stderr, so close the pipe only after
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        return self.proc.returncode

    def stopped_gracefully(self) -> bool:
        """Stops with SIGTERM; True when the process exited cleanly (uvicorn re-raises the
        signal after a graceful shutdown, so dying of SIGTERM itself counts)."""
        return self.stop() in (0, -signal.SIGTERM)


STATE_READY = r"gRPC server listening.*port[=:\" ]+(\d+)"
ROUTER_READY = r"Uvicorn running on http://[^:]+:(\d+)"


def state_process(*args: str) -> Process:
    """A state service as its own process on a free loopback port, without /metrics; ``args``
    choose its backend (for example ``"--backend", "sqlite", "--sqlite-path", path``)."""
    return Process(["state", "--listen", "127.0.0.1:0", "--metrics-port", "0", *args])
