"""Tool benchmark: what running code_interpreter and shell calls costs, measured in one run.

Starts the echo hub, a state service (memory backend), the reference bootstrap service (which
serves the ExecutionService, with bubblewrap sandboxes) and a router, each as its own process on
loopback, then measures sequential requests (one at a time, so the numbers are latencies, not
throughput):

1. a turn that declares code_interpreter and is answered without a call (one hub call, the
   bootstrap call) against the same turn whose model calls the python tool once (two hub calls
   and one call in the session's interpreter): the difference is **the added latency of one tool
   round**, with the session warm (each turn is chained on the last, so its interpreter lives);
2. the same for shell (each command runs in a sandbox of its own, so every call starts one);
3. at the execution service directly: one Python call in a warm interpreter, one shell command,
   and a session created **cold** (CreateSession, then its first Python call, which starts the
   sandboxed interpreter);
4. what the session memory bound costs: the same Python call and shell command, and a call that
   runs one second, at this service (which watches each session's processes while a call runs)
   and at a second one started with ``--session-memory-mb 0`` (no watch; the interpreter is still
   frozen between calls): the latency and the service's CPU time per call (utime + stime from
   /proc, in ticks of 10 ms: compare the 1 s rows); then, in this process against a sandboxed
   interpreter at rest, the parts: one sample of the watch (every 50 ms while a call runs) and
   the freeze, thaw and last check every Python call pays.

The echo hub calls the tool when the input holds a fenced ```python (or ```sh) block, so no model
is needed. Run: ``python -m bench.bench_tools [--turns 60]``. Numbers drift on a shared machine;
compare the rows of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import httpx

from bench.bench_router import ECHO_READY, cpu_meter, free_port, pct
from bootstrap_svc import memwatch
from bootstrap_svc.sandbox import Child, Limits, Sandbox
from respgw.bootstrap.v1 import execution_service_pb2 as pb
from respgw.bootstrap.v1 import execution_service_pb2_grpc
from tests.support import ROUTER_READY, STATE_READY, Process

CODE_INTERPRETER = {"type": "code_interpreter", "container": {"type": "auto"}}
SHELL = {"type": "shell"}


async def timed(n: int, call: Callable[[int], Awaitable[Any]]) -> list[float]:
    """Milliseconds of each of ``n`` sequential calls (after two unmeasured ones)."""
    for i in range(2):
        await call(-1 - i)
    out: list[float] = []
    for i in range(n):
        start = time.perf_counter()
        await call(i)
        out.append((time.perf_counter() - start) * 1000)
    return out


def row(name: str, values: list[float]) -> float:
    p50 = statistics.median(values)
    print(f"{name:<58} p50 {p50:8.2f} ms   p90 {pct(values, 0.9):8.2f} ms   n={len(values)}")
    return p50


async def turns(base: str, turns_n: int) -> None:
    async with httpx.AsyncClient(base_url=base, timeout=60) as http:
        last: dict[str, str] = {}

        async def turn(tool: dict[str, Any], text: str, chain: str) -> None:
            body: dict[str, Any] = {"model": "echo", "input": text, "tools": [tool]}
            if chain in last:
                body["previous_response_id"] = last[chain]
            r = await http.post("/responses", json=body)
            r.raise_for_status()
            answered = r.json()
            last[chain] = answered["id"]
            kinds = [i["type"] for i in answered["output"]]
            if "```" in text:
                assert kinds[0] in ("code_interpreter_call", "shell_call"), kinds

        plain = await timed(turns_n, lambda i: turn(CODE_INTERPRETER, "no code here", "ci_plain"))
        tooled = await timed(
            turns_n, lambda i: turn(CODE_INTERPRETER, f"```python\nx = {i}\nx * 2\n```", "ci")
        )
        a = row("turn with code_interpreter declared, no call", plain)
        b = row("turn with one python call (interpreter warm)", tooled)
        print(f"  added by one python tool round: {b - a:.2f} ms (p50)")
        plain_sh = await timed(turns_n, lambda i: turn(SHELL, "no command here", "sh_plain"))
        tooled_sh = await timed(turns_n, lambda i: turn(SHELL, f"```sh\necho {i}\n```", "sh"))
        a = row("turn with shell declared, no call", plain_sh)
        b = row("turn with one shell call (a sandbox per command)", tooled_sh)
        print(f"  added by one shell tool round: {b - a:.2f} ms (p50)")


async def direct(address: str, n: int) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = execution_service_pb2_grpc.ExecutionServiceStub(channel)

        async def execute(session_id: str, code: str | None = None, command: str = "") -> None:
            request = pb.ExecuteRequest(tenant="bench", session_id=session_id)
            if code is not None:
                request.python.code = code
            else:
                request.commands.commands.append(command)
            async for _ in stub.Execute(request, timeout=60):
                pass

        async def create(i: int) -> str:
            made = await stub.CreateSession(
                pb.CreateSessionRequest(
                    request_id=f"bench-{i}-{time.monotonic_ns()}", tenant="bench"
                )
            )
            return made.session.session_id

        warm = await create(0)
        python_warm = await timed(n, lambda i: execute(warm, "1 + 1"))
        shell = await timed(n, lambda i: execute(warm, command="true"))
        created: list[str] = []

        async def cold(i: int) -> None:
            session_id = await create(i + 1000)
            created.append(session_id)
            await execute(session_id, "1 + 1")
            await stub.DeleteSession(pb.DeleteSessionRequest(tenant="bench", session_id=session_id))

        cold_times = await timed(min(n, 30), cold)
        print()
        row("Execute: one Python call, interpreter warm", python_warm)
        row("Execute: one shell command (a new sandbox)", shell)
        row("cold session: CreateSession + first Python call", cold_times)


async def _drain(
    stub: execution_service_pb2_grpc.ExecutionServiceAsyncStub, request: pb.ExecuteRequest, _: int
) -> None:
    async for _message in stub.Execute(request, timeout=60):
        pass


async def memory_watch(services: dict[str, tuple[str, int]], n: int) -> None:
    """Rows of :func:`direct`'s calls at a service with the session memory bound and one
    without, with the service's CPU time per call."""
    print()
    for kind, code, command, calls in (
        ("Python call", "1 + 1", "", n),
        ("shell command", None, "true", n),
        ("Python call of 1 s", "import time; time.sleep(1)", "", 5),
    ):
        for name, (address, pid) in services.items():
            async with grpc.aio.insecure_channel(address) as channel:
                stub = execution_service_pb2_grpc.ExecutionServiceStub(channel)
                made = await stub.CreateSession(
                    pb.CreateSessionRequest(
                        request_id=f"bench-watch-{time.monotonic_ns()}", tenant="bench"
                    )
                )
                request = pb.ExecuteRequest(tenant="bench", session_id=made.session.session_id)
                if code is not None:
                    request.python.code = code
                else:
                    request.commands.commands.append(command)
                execute = functools.partial(_drain, stub, request)
                with cpu_meter({"bootstrap": pid}) as spent:
                    times = await timed(calls, execute)
                cpu_us = spent["bootstrap"] / (calls + 2) * 1e6
                row(f"{kind}, {name}", times)
                print(f"{'':<58} bootstrap CPU {cpu_us:8.0f} us per call")


async def memory_watch_parts(n: int = 500) -> None:
    """Wall and CPU time of the memory watch's parts, against a sandboxed interpreter at rest."""
    sandbox = Sandbox()
    await sandbox.check()
    if not sandbox.ready:
        print(f"memory watch parts: no sandbox ({sandbox.problem})")
        return
    folder = tempfile.mkdtemp(prefix="respgw-bench-watch-")
    uid = sandbox.session_uid(0) if sandbox.as_root else os.getuid()
    os.chown(folder, uid, uid)
    idle = "import socket; a, b = socket.socketpair(); a.recv(1)"
    limits = Limits(cpu_s=60, memory_bytes=1 << 30, processes=16, file_bytes=1 << 20)
    child = Child(
        sandbox.command(folder, uid, limits, [sandbox.python, "-I", "-c", idle]),
        stdout=False,
        stderr=False,
    )
    try:
        await asyncio.sleep(1.0)
        root = child.popen.pid
        runner = memwatch.tree(root)[-1]
        runner_fd = os.pidfd_open(runner)
        watch = memwatch.Watch(root, 1 << 30)

        async def sample() -> None:
            watch.quick()

        async def pause() -> None:
            memwatch.thaw(runner, runner_fd)
            left = await memwatch.freeze(root, runner, runner_fd)
            memwatch.resident(left or [])

        print()
        for name, part in (
            ("memory watch: one sample (tree and resident sizes)", sample),
            ("memory watch: thaw, freeze and last check of a call", pause),
        ):
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(n):
                await part()
            wall_us = (time.perf_counter() - wall) / n * 1e6
            cpu_us = (time.process_time() - cpu) / n * 1e6
            print(f"{name:<58} {wall_us:8.0f} us wall {cpu_us:8.0f} us CPU   n={n}")
        os.close(runner_fd)
    finally:
        child.kill()
        await child.wait()
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--turns", type=int, default=60, help="measured requests per row")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="respgw-bench-tools-"))
    echo = Process(["echo-hub", "--port", "0"])
    state = Process(
        ["state", "--backend", "memory", "--listen", "127.0.0.1:0", "--metrics-port", "0"]
    )
    boot = Process(
        [
            "bootstrap",
            "--listen",
            "127.0.0.1:0",
            "--metrics-port",
            "0",
            "--workdir",
            str(work / "sessions"),
            "--max-sessions-per-tenant",
            "200",
        ]
    )
    unwatched = Process(
        [
            "bootstrap",
            "--listen",
            "127.0.0.1:0",
            "--metrics-port",
            "0",
            "--workdir",
            str(work / "unwatched"),
            "--session-memory-mb",
            "0",
        ]
    )
    router: Process | None = None
    try:
        echo_port = echo.start(ECHO_READY)
        state_port = state.start(STATE_READY)
        boot_port = boot.start(STATE_READY)
        unwatched_port = unwatched.start(STATE_READY)
        router = Process(
            [
                "router",
                "--port",
                str(free_port()),
                "--hub-url",
                f"http://127.0.0.1:{echo_port}/v1",
                "--state-address",
                f"127.0.0.1:{state_port}",
                "--bootstrap-address",
                f"127.0.0.1:{boot_port}",
                "--default-model",
                "echo",
            ]
        )
        router_port = router.start(ROUTER_READY)
        print(f"{'what':<58} (sequential requests on loopback, {args.turns} per row)")
        asyncio.run(turns(f"http://127.0.0.1:{router_port}/v1", args.turns))
        asyncio.run(direct(f"127.0.0.1:{boot_port}", args.turns))
        assert boot.proc is not None and unwatched.proc is not None
        asyncio.run(
            memory_watch(
                {
                    "memory watched": (f"127.0.0.1:{boot_port}", boot.proc.pid),
                    "--session-memory-mb 0": (
                        f"127.0.0.1:{unwatched_port}",
                        unwatched.proc.pid,
                    ),
                },
                args.turns,
            )
        )
        asyncio.run(memory_watch_parts())
    finally:
        for process in (router, unwatched, boot, state, echo):
            if process is not None:
                process.stop()


if __name__ == "__main__":
    main()
