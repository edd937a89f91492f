"""Router benchmark: what the gateway costs on top of the model server, measured in one run.

Starts the echo hub (the trivial model server), a state service on SQLite and a router, each as its
own process on loopback, then measures:

1. p50/p99 latency and requests/s of the hub called directly (POST /v1/chat/completions) and of
   POST /v1/responses through the router with store=true, at concurrency 1 and 32, with wrk;
2. streaming time to first byte, through the router and at the hub directly;
3. the added latency of turn 1 against turn 50 of a previous_response_id chain.

Numbers drift on a shared machine; the ratios against the hub in the same run are what matter.
Needs ``wrk`` (Debian package ``wrk``). Run: ``python -m bench.bench_router [--seconds 8]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from tests.support import POSTGRES_DSN, ROUTER_READY, STATE_READY, Process

ECHO_READY = r"echo hub listening on http://[^:]+:(\d+)"

WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = os.getenv("BENCH_BODY")
done = function(summary, latency, requests)
  io.write(string.format("RESULT {\\"p50_ms\\": %.3f, \\"p99_ms\\": %.3f, \\"rps\\": %.1f, \\"errors\\": %d, \\"requests\\": %d}\\n",
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    summary.requests / (summary.duration / 1e6),
    summary.errors.status + summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.requests))
end
"""


def wrk(
    url: str, body: dict[str, Any], connections: int, seconds: int, script: Path
) -> dict[str, float]:
    threads = 1 if connections == 1 else 2
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
        env={"BENCH_BODY": json.dumps(body), "PATH": "/usr/bin:/bin"},
    )
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            result: dict[str, float] = json.loads(line[len("RESULT ") :])
            return result
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
                per_turn[t].append((time.perf_counter() - start) * 1000)
                previous = data["id"]
    return per_turn


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=8, help="duration of each wrk run")
    parser.add_argument(
        "--chains", type=int, default=5, help="chains of 50 turns for the turn-1/turn-50 comparison"
    )
    parser.add_argument(
        "--backend",
        default="sqlite",
        choices=["sqlite", "memory", "postgres"],
        help="state backend (postgres: RESPGW_TEST_POSTGRES_DSN, schema respgw_bench)",
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (Debian: apt-get install wrk)")

    work = Path(tempfile.mkdtemp(prefix="respgw-bench-"))
    script = work / "post.lua"
    script.write_text(WRK_SCRIPT)
    procs: list[Process] = []
    try:
        hub = Process(["echo-hub", "--port", "0"])
        procs.append(hub)
        hub_port = hub.start(ECHO_READY)
        backend_args = {
            "sqlite": ["--sqlite-path", str(work / "state.db")],
            "memory": [],
            "postgres": ["--postgres-dsn", POSTGRES_DSN, "--postgres-schema", "respgw_bench"],
        }[args.backend]
        state = Process(
            [
                "state",
                "--backend",
                args.backend,
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
                f"http://127.0.0.1:{hub_port}/v1",
                "--state-address",
                f"127.0.0.1:{state_port}",
            ]
        )
        procs.append(router)
        router_port = router.start(ROUTER_READY)
        hub_url = f"http://127.0.0.1:{hub_port}/v1"
        router_url = f"http://127.0.0.1:{router_port}/v1"

        chat_body = {
            "model": "echo",
            "messages": [{"role": "user", "content": "Say hello to the benchmark."}],
        }
        resp_body = {"model": "echo", "input": "Say hello to the benchmark.", "store": True}
        print(
            f"# router benchmark: wrk {args.seconds}s per row; state backend {args.backend}; hub client in the router: aiohttp"
        )
        print(f"{'path':<42} {'conns':>5} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>9} {'errors':>6}")
        results: dict[tuple[str, int], dict[str, float]] = {}
        for conns in (1, 32):
            for name, url, body in (
                ("hub directly (chat/completions)", f"{hub_url}/chat/completions", chat_body),
                ("router POST /v1/responses store=true", f"{router_url}/responses", resp_body),
            ):
                r = wrk(url, body, conns, args.seconds, script)
                results[(name, conns)] = r
                print(
                    f"{name:<42} {conns:>5} {r['p50_ms']:>8.3f} {r['p99_ms']:>8.3f} {r['rps']:>9.1f} {int(r['errors']):>6}"
                )
        print("\n# ratios router / hub (latency: higher is slower; throughput: lower is slower)")
        for conns in (1, 32):
            h = results[("hub directly (chat/completions)", conns)]
            g = results[("router POST /v1/responses store=true", conns)]
            print(
                f"c={conns:<3} p50 x{g['p50_ms'] / h['p50_ms']:.2f}  p99 x{g['p99_ms'] / h['p99_ms']:.2f}  "
                f"req/s x{g['rps'] / h['rps']:.3f}  added p50 {g['p50_ms'] - h['p50_ms']:.3f} ms"
            )

        async def streaming() -> tuple[list[float], list[float], dict[int, list[float]]]:
            async with aiohttp.ClientSession() as session:
                direct = await ttfb(
                    session, f"{hub_url}/chat/completions", {**chat_body, "stream": True}, 200
                )
                routed = await ttfb(
                    session, f"{router_url}/responses", {**resp_body, "stream": True}, 200
                )
            chains = await chain_latency(router_url, 50, args.chains)
            return direct, routed, chains

        direct, routed, chains = asyncio.run(streaming())
        print("\n# streaming time to first byte, 200 sequential requests")
        print(f"hub directly  p50 {pct(direct, 0.5):.3f} ms  p99 {pct(direct, 0.99):.3f} ms")
        print(
            f"router        p50 {pct(routed, 0.5):.3f} ms  p99 {pct(routed, 0.99):.3f} ms  "
            f"(x{pct(routed, 0.5) / pct(direct, 0.5):.2f} at p50)"
        )
        t1 = statistics.median(chains[1])
        t50 = statistics.median(chains[50])
        hub_p50 = results[("hub directly (chat/completions)", 1)]["p50_ms"]
        print(f"\n# previous_response_id chain, {args.chains} chains of 50 turns, median per turn")
        print(f"turn 1   {t1:.3f} ms (added over the hub: {t1 - hub_p50:.3f} ms)")
        print(
            f"turn 50  {t50:.3f} ms (added over the hub: {t50 - hub_p50:.3f} ms)  x{t50 / t1:.2f} of turn 1"
        )
    finally:
        for p in reversed(procs):
            p.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
