"""Router benchmark: what the gateway costs on top of the model server, measured in one run.

Starts the echo hub (the trivial model server), then for each state backend asked for (SQLite
with ``synchronous=FULL`` and the memory backend by default) a state service and a router, each
as its own process on loopback, and measures with wrk:

1. the hub called directly (POST /v1/chat/completions), at 1 and 32 connections;
2. a fresh stored turn (POST /v1/responses, store=true) at 1 and 32 connections;
3. a chained turn (previous_response_id: each wrk thread chains on the response it got last,
   starting a new chain every 10 turns) at 1 and 32 connections;
4. for every row, the CPU time each process spent per request (utime + stime from /proc around
   the run), which survives a noisy machine far better than wall-clock numbers;
5. streaming time to first byte, through the router and at the hub directly;
6. turn 1 against turn 50 of a previous_response_id chain.

SMG (the Rust gateway, ``pip install smg``) is measured the same way when ``smg`` is on PATH.
Numbers drift on a shared machine; the ratios against the hub in the same run are what matter.
Needs ``wrk`` (Debian package ``wrk``). Run: ``python -m bench.bench_router [--seconds 6]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from tests.support import POSTGRES_DSN, ROUTER_READY, STATE_READY, Process

ECHO_READY = r"echo hub listening on http://[^:]+:(\d+)"

RESULT = """
done = function(summary, latency, requests)
  io.write(string.format("RESULT {\\"p50_ms\\": %.3f, \\"p99_ms\\": %.3f, \\"rps\\": %.1f, \\"errors\\": %d, \\"requests\\": %d}\\n",
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    summary.requests / (summary.duration / 1e6),
    summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.requests))
end
"""

POST_SCRIPT = (
    """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = os.getenv("BENCH_BODY")
"""
    + RESULT
)

# Each wrk thread chains on the last response it was answered, and starts over every 10 turns,
# so chains stay 1 to 10 turns deep (and branch under concurrency, which the API allows).
CHAIN_SCRIPT = (
    """
local previous = nil
local depth = 0
request = function()
  local body
  if previous then
    body = string.format('{"model":"echo","input":"And then?","previous_response_id":"%s"}', previous)
  else
    body = '{"model":"echo","input":"Say hello to the benchmark."}'
  end
  return wrk.format("POST", nil, {["Content-Type"] = "application/json"}, body)
end
response = function(status, headers, body)
  if status ~= 200 then
    previous = nil
    return
  end
  depth = depth + 1
  if depth >= 10 then
    previous = nil
    depth = 0
  else
    previous = string.match(body, '"id":"(resp_[%w_]+)"')
  end
end
"""
    + RESULT
)

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


@dataclass
class Row:
    name: str
    conns: int
    p50_ms: float
    p99_ms: float
    rps: float
    errors: int
    requests: int
    cpu_us: dict[str, float] = field(default_factory=dict)  # per process, per request

    @property
    def gateway_cpu_us(self) -> float:
        return sum(v for k, v in self.cpu_us.items() if k != "hub")


@contextmanager
def cpu_meter(pids: dict[str, int]) -> Iterator[dict[str, float]]:
    """Yields a dict that holds, after the block, the CPU seconds each process spent in it."""
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    spent: dict[str, float] = {}
    yield spent
    for name, pid in pids.items():
        spent[name] = cpu_seconds(pid) - before[name]


def wrk(
    name: str,
    url: str,
    script: Path,
    connections: int,
    seconds: int,
    pids: dict[str, int],
    body: dict[str, Any] | None = None,
) -> Row:
    threads = 1 if connections == 1 else 2
    with cpu_meter(pids) as spent:
        out = subprocess.run(
            [
                "wrk",
                f"-t{threads}",
                f"-c{connections}",
                f"-d{seconds}s",
                "--latency",
                "-s",
                str(script),
                url,
            ],
            capture_output=True,
            text=True,
            check=True,
            env={"BENCH_BODY": json.dumps(body or {}), "PATH": "/usr/bin:/bin"},
        )
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[len("RESULT ") :])
            requests = max(int(r["requests"]), 1)
            return Row(
                name,
                connections,
                r["p50_ms"],
                r["p99_ms"],
                r["rps"],
                int(r["errors"]),
                requests,
                {k: v * 1e6 / requests for k, v in spent.items()},
            )
    raise RuntimeError(f"wrk gave no result:\n{out.stdout}\n{out.stderr}")


async def ttfb(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], n: int
) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        async with session.post(url, json=body) as resp:
            await resp.content.readany()
            times.append((time.perf_counter() - start) * 1000)
            await resp.read()
    return times


async def chain_latency(base: str, turns: int, chains: int) -> dict[int, list[float]]:
    per_turn: dict[int, list[float]] = {t: [] for t in range(1, turns + 1)}
    async with aiohttp.ClientSession() as session:
        for _ in range(chains):
            previous = None
            for t in range(1, turns + 1):
                body: dict[str, Any] = {"model": "echo", "input": f"turn {t} of the chain"}
                if previous:
                    body["previous_response_id"] = previous
                start = time.perf_counter()
                async with session.post(f"{base}/responses", json=body) as resp:
                    data = await resp.json()
                    if resp.status != 200:
                        raise RuntimeError(f"turn {t} of a chain failed: {resp.status} {data}")
                per_turn[t].append((time.perf_counter() - start) * 1000)
                previous = data["id"]
    return per_turn


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def wait_answering(url: str, timeout_s: float = 30.0) -> None:
    """Waits until ``url`` answers a turn with 200."""
    body = json.dumps({"model": "echo", "input": "ready?"}).encode()
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            request = urllib.request.Request(
                url, data=body, headers={"content-type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer")
        time.sleep(0.2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


HEADER = f"{'path':<40} {'conns':>5} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>9} {'err':>4}  CPU µs per request"


def show(row: Row) -> None:
    cpu = "  ".join(f"{k} {v:,.0f}" for k, v in row.cpu_us.items())
    total = f"  (gateway {row.gateway_cpu_us:,.0f})" if "router" in row.cpu_us else ""
    print(
        f"{row.name:<40} {row.conns:>5} {row.p50_ms:>8.3f} {row.p99_ms:>8.3f} "
        f"{row.rps:>9.1f} {row.errors:>4}  {cpu}{total}",
        flush=True,
    )


def bench_gateway(
    label: str,
    router_url: str,
    pids: dict[str, int],
    args: argparse.Namespace,
    post: Path,
    chain: Path,
    hub: dict[int, Row],
) -> None:
    resp_body = {"model": "echo", "input": "Say hello to the benchmark.", "store": True}
    rows: dict[tuple[str, int], Row] = {}
    for conns in (1, 32):
        for kind, script in (("fresh", post), ("chained", chain)):
            row = wrk(
                f"{label} {kind}",
                f"{router_url}/responses",
                script,
                conns,
                args.seconds,
                pids,
                resp_body,
            )
            rows[(kind, conns)] = row
            show(row)
    for conns in (1, 32):
        h = hub[conns]
        for kind in ("fresh", "chained"):
            g = rows[(kind, conns)]
            print(
                f"  {kind:<8} c={conns:<3} added p50 {g.p50_ms - h.p50_ms:.3f} ms  "
                f"req/s x{g.rps / h.rps:.3f} of the hub  gateway CPU {g.gateway_cpu_us:,.0f} µs/turn"
            )

    if "router" not in pids:
        return  # a peer: the latency rows above are what compares

    async def streaming() -> tuple[list[float], dict[int, list[float]]]:
        async with aiohttp.ClientSession() as session:
            routed = await ttfb(
                session, f"{router_url}/responses", {**resp_body, "stream": True}, 200
            )
        chains = await chain_latency(router_url, 50, args.chains)
        return routed, chains

    routed, chains = asyncio.run(streaming())
    print(
        f"  streaming TTFB p50 {pct(routed, 0.5):.3f} ms  p99 {pct(routed, 0.99):.3f} ms  "
        f"(added over the hub's {args.hub_ttfb_p50:.3f} ms: {pct(routed, 0.5) - args.hub_ttfb_p50:.3f} ms)"
    )
    t1 = statistics.median(chains[1])
    t50 = statistics.median(chains[50])
    print(
        f"  chain of 50 ({args.chains} chains, median): turn 1 {t1:.3f} ms, turn 50 {t50:.3f} ms, "
        f"x{t50 / t1:.2f} of turn 1"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--seconds", type=int, default=6, help="duration of each wrk run")
    parser.add_argument(
        "--chains", type=int, default=5, help="chains of 50 turns for the turn-1/turn-50 comparison"
    )
    parser.add_argument(
        "--backends",
        default="sqlite,memory",
        help="state backends, comma-separated: sqlite, memory, postgres "
        "(postgres: RESPGW_TEST_POSTGRES_DSN, schema respgw_bench)",
    )
    parser.add_argument(
        "--smg",
        default=shutil.which("smg") or "",
        help="the smg command of the Rust peer, measured the same way when given (pip install smg)",
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (Debian: apt-get install wrk)")

    work = Path(tempfile.mkdtemp(prefix="respgw-bench-"))
    post = work / "post.lua"
    post.write_text(POST_SCRIPT)
    chain = work / "chain.lua"
    chain.write_text(CHAIN_SCRIPT)
    procs: list[Process] = []
    try:
        hub_proc = Process(["echo-hub", "--port", "0"])
        procs.append(hub_proc)
        hub_port = hub_proc.start(ECHO_READY)
        assert hub_proc.proc is not None
        hub_url = f"http://127.0.0.1:{hub_port}/v1"
        print(
            f"# router benchmark: wrk {args.seconds}s per row; hub client in the router: aiohttp; "
            f"{os.cpu_count()} cores"
        )
        print(HEADER)
        chat_body = {
            "model": "echo",
            "messages": [{"role": "user", "content": "Say hello to the benchmark."}],
        }
        hub_rows = {}
        for conns in (1, 32):
            hub_rows[conns] = wrk(
                "hub directly (chat/completions)",
                f"{hub_url}/chat/completions",
                post,
                conns,
                args.seconds,
                {"hub": hub_proc.proc.pid},
                chat_body,
            )
            show(hub_rows[conns])

        async def hub_ttfb() -> list[float]:
            async with aiohttp.ClientSession() as session:
                return await ttfb(
                    session, f"{hub_url}/chat/completions", {**chat_body, "stream": True}, 200
                )

        direct = asyncio.run(hub_ttfb())
        args.hub_ttfb_p50 = pct(direct, 0.5)
        print(f"hub streaming TTFB p50 {pct(direct, 0.5):.3f} ms  p99 {pct(direct, 0.99):.3f} ms")

        for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
            backend_args = {
                "sqlite": ["--sqlite-path", str(work / "state.db"), "--sqlite-synchronous", "full"],
                "memory": [],
                "postgres": ["--postgres-dsn", POSTGRES_DSN, "--postgres-schema", "respgw_bench"],
            }[backend]
            state = Process(
                [
                    "state",
                    "--backend",
                    backend,
                    *backend_args,
                    "--listen",
                    "127.0.0.1:0",
                    "--metrics-port",
                    "0",
                ]
            )
            procs.append(state)
            state_port = state.start(STATE_READY)
            router = Process(
                [
                    "router",
                    "--port",
                    "0",
                    "--hub-url",
                    hub_url,
                    "--state-address",
                    f"127.0.0.1:{state_port}",
                ]
            )
            procs.append(router)
            router_port = router.start(ROUTER_READY)
            assert state.proc is not None and router.proc is not None
            print(f"\n# gateway, state backend {backend}")
            bench_gateway(
                backend,
                f"http://127.0.0.1:{router_port}/v1",
                {"router": router.proc.pid, "state": state.proc.pid},
                args,
                post,
                chain,
                hub_rows,
            )
            router.stop()
            state.stop()

        if args.smg:
            port = free_port()
            smg = subprocess.Popen(
                [
                    args.smg,
                    "launch",
                    "--backend",
                    "openai",
                    "--history-backend",
                    "memory",
                    "--worker-urls",
                    hub_url.removesuffix("/v1"),
                    "--port",
                    str(port),
                    "--prometheus-host",
                    "127.0.0.1",
                    "--prometheus-port",
                    str(free_port()),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                wait_answering(f"http://127.0.0.1:{port}/v1/responses")
                print("\n# SMG (Rust peer), memory history")
                bench_gateway(
                    "smg",
                    f"http://127.0.0.1:{port}/v1",
                    {"smg": smg.pid},
                    args,
                    post,
                    chain,
                    hub_rows,
                )
            finally:
                smg.terminate()
                smg.wait(10)
        else:
            print("\n# SMG not installed (pip install smg): no peer rows")
    finally:
        for p in reversed(procs):
            p.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
