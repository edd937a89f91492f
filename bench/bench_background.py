"""Background responses benchmark: how long a router's crash delays its background responses,
and what a background turn costs over a foreground one.

1. Takeover: two routers (processes) over one state service. A background response runs on
   router A against a slow hub (the test suite's fake hub, one chunk every 0.1 s); a client
   follows its stream through router B. Router A is killed with SIGKILL; measured are the time
   from the kill to the first event of the run that took over (router B claimed the expired
   lease and called the model again) and to the response's completion, against the bound the
   settings give (lease + 1.5 x scan interval). Router A is started again for the next trial.
2. Added latency: against the echo hub, one router: a foreground streamed turn (POST, stream:
   true) to its response.completed, a background streamed turn (background and stream: true) to
   its response.completed, and a background turn answered queued then followed with GET
   ?stream=true to its terminal event, each measured N times in a row.

Run: ``python -m bench.bench_background [--backend sqlite|postgres] [--lease-s 10]
[--scan-s 2] [--trials 3] [--turns 200]``. Numbers drift on a shared machine; the differences
measured in the same run are what matter.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson

from tests.fakehub import FakeHub, Reply
from tests.support import POSTGRES_DSN, ROUTER_READY, STATE_READY, Process

ECHO_READY = r"echo hub listening on http://[^:]+:(\d+)"
SLOW_WORDS = 60  # 6 s of answer at 0.1 s a chunk


def events(client: httpx.Client, method: str, url: str, **kwargs: Any) -> Iterator[dict[str, Any]]:
    """The SSE events of one request, as they arrive."""
    with client.stream(method, url, timeout=120, **kwargs) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                yield orjson.loads(line[len("data: ") :])


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


SCHEMA = f"respgw_bench_bg_{os.getpid()}"


async def drop_schema() -> None:
    import asyncpg  # the postgres extra

    conn = await asyncpg.connect(POSTGRES_DSN)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{SCHEMA}" CASCADE')
    finally:
        await conn.close()


def state_args(backend: str, work: Path) -> list[str]:
    if backend == "postgres":
        return [
            "--backend",
            "postgres",
            "--postgres-dsn",
            POSTGRES_DSN,
            "--postgres-schema",
            SCHEMA,
        ]
    return ["--backend", "sqlite", "--sqlite-path", str(work / "state.db")]


def router(hub_url: str, state_port: int, *extra: str) -> Process:
    return Process(
        [
            "router",
            "--port",
            "0",
            "--hub-url",
            hub_url,
            "--state-address",
            f"127.0.0.1:{state_port}",
            *extra,
        ]
    )


def follow_and_kill(
    client: httpx.Client, url: str, a: Process, killed: list[float], first_after: list[float]
) -> None:
    """Follows the response's stream through router B; kills router A once the first run is
    streaming; notes when the first event after the kill and the completion arrive."""
    for n, event in enumerate(events(client, "GET", f"{url}?stream=true")):
        if n == 8 and not killed:
            a.stop(signal.SIGKILL)
            killed.append(time.perf_counter())
        elif killed and not first_after:
            first_after.append(time.perf_counter())
        if event["type"] == "response.completed":
            first_after.append(time.perf_counter())


def takeover(args: argparse.Namespace, work: Path) -> None:
    hub = FakeHub().start()
    state = Process(
        ["state", *state_args(args.backend, work), "--listen", "127.0.0.1:0", "--metrics-port", "0"]
    )
    lease = [
        "--background-lease-s",
        str(args.lease_s),
        "--background-scan-interval-s",
        str(args.scan_s),
    ]
    routers: list[Process] = []
    try:
        state_port = state.start(STATE_READY)
        b = router(hub.url, state_port, *lease)
        routers.append(b)
        b_url = f"http://127.0.0.1:{b.start(ROUTER_READY)}/v1"
        to_first: list[float] = []
        to_done: list[float] = []
        text = " ".join(f"w{n}" for n in range(SLOW_WORDS))
        with httpx.Client() as client:
            for _ in range(args.trials):
                a = router(hub.url, state_port, *lease)
                routers.append(a)
                a_url = f"http://127.0.0.1:{a.start(ROUTER_READY)}/v1"
                hub.enqueue(
                    Reply(text=text, chunk_delay_s=0.1), Reply(text=text, chunk_delay_s=0.1)
                )
                created = client.post(
                    f"{a_url}/responses",
                    json={"model": "m", "input": "survive", "background": True},
                    timeout=30,
                ).json()
                killed: list[float] = []
                first_after: list[float] = []
                reader = threading.Thread(
                    target=follow_and_kill,
                    args=(client, f"{b_url}/responses/{created['id']}", a, killed, first_after),
                )
                reader.start()
                reader.join(120)
                to_first.append(first_after[0] - killed[0])
                to_done.append(first_after[-1] - killed[0])
                routers.remove(a)
        bound = args.lease_s + 1.5 * args.scan_s
        print(
            f"# takeover after SIGKILL ({args.backend}, lease {args.lease_s} s, scan every "
            f"{args.scan_s} s: bound {bound:.1f} s; {args.trials} trials)"
        )
        print(
            f"kill -> first event of the new run: median {statistics.median(to_first):.2f} s, "
            f"max {max(to_first):.2f} s"
        )
        print(
            f"kill -> response completed:         median {statistics.median(to_done):.2f} s, "
            f"max {max(to_done):.2f} s  (the new run's model call included: "
            f"{SLOW_WORDS * 0.1:.1f} s)"
        )
    finally:
        for r in routers:
            r.stop()
        state.stop()
        hub.stop()


def added_latency(args: argparse.Namespace, work: Path) -> None:
    echo = Process(["echo-hub", "--port", "0"])
    state = Process(
        ["state", *state_args(args.backend, work), "--listen", "127.0.0.1:0", "--metrics-port", "0"]
    )
    r: Process | None = None
    try:
        hub_url = f"http://127.0.0.1:{echo.start(ECHO_READY)}/v1"
        state_port = state.start(STATE_READY)
        r = router(hub_url, state_port)
        url = f"http://127.0.0.1:{r.start(ROUTER_READY)}/v1/responses"
        body = {"model": "echo", "input": "Say hello to the benchmark."}
        rows: dict[str, list[float]] = {"foreground": [], "background": [], "queued+follow": []}
        with httpx.Client() as client:

            def until_terminal(it: Iterator[dict[str, Any]]) -> float:
                start = time.perf_counter()
                for event in it:
                    if event["type"] in ("response.completed", "response.failed"):
                        assert event["type"] == "response.completed", event
                        return (time.perf_counter() - start) * 1000
                raise RuntimeError("the stream ended without a terminal event")

            for n in range(args.turns + 10):
                warm = n < 10
                fg = until_terminal(events(client, "POST", url, json={**body, "stream": True}))
                bg = until_terminal(
                    events(client, "POST", url, json={**body, "stream": True, "background": True})
                )
                start = time.perf_counter()
                queued = client.post(url, json={**body, "background": True}).json()
                until_terminal(events(client, "GET", f"{url}/{queued['id']}?stream=true"))
                qf = (time.perf_counter() - start) * 1000
                if not warm:
                    rows["foreground"].append(fg)
                    rows["background"].append(bg)
                    rows["queued+follow"].append(qf)
        print(f"\n# a turn to its response.completed ({args.backend}, echo hub, {args.turns} each)")
        fg50 = statistics.median(rows["foreground"])
        labels = {
            "foreground": "POST stream (foreground)",
            "background": "POST background + stream",
            "queued+follow": "POST background, then GET ?stream=true",
        }
        for key, values in rows.items():
            p50 = statistics.median(values)
            added = "" if key == "foreground" else f"  added p50 {p50 - fg50:+.2f} ms"
            print(f"{labels[key]:<42} p50 {p50:7.2f} ms  p99 {pct(values, 0.99):7.2f} ms{added}")
    finally:
        if r is not None:
            r.stop()
        state.stop()
        echo.stop()


def main() -> None:
    # The fake hub logs each stream the killed router leaves half-read.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--backend", default="sqlite", choices=["sqlite", "postgres"])
    parser.add_argument("--lease-s", type=float, default=10.0, help="--background-lease-s")
    parser.add_argument("--scan-s", type=float, default=2.0, help="--background-scan-interval-s")
    parser.add_argument("--trials", type=int, default=3, help="takeovers measured")
    parser.add_argument("--turns", type=int, default=200, help="turns of each kind measured")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="respgw-bench-bg-") as tmp:
        work = Path(tmp)
        try:
            takeover(args, work)
            (work / "latency").mkdir()
            added_latency(args, work / "latency")
        finally:
            if args.backend == "postgres":
                asyncio.run(drop_schema())


if __name__ == "__main__":
    main()
