"""State service benchmark: stored turns per second and history resolution latency, per backend.

For each backend (memory, SQLite, PostgreSQL) it starts a state service as its own process on
loopback and measures, through real gRPC calls from this process:

1. PutTurn throughput at concurrency 1 and 32 (independent turns of two small items), and at
   concurrency 32 into ONE conversation (appends serialize on the conversation);
2. GetHistory latency (p50, p99) for previous_response_id chains of 1, 20 and 200 turns, at
   concurrency 1 and 32, and the ratio of the 200-turn to the 1-turn p50: the server resolves a
   chain in one query, so the ratio grows with the bytes returned, not with one round trip per turn.

Numbers drift on a shared machine; compare rows of the same run. Run:
``python -m bench.bench_state [--seconds 1.5] [--backends memory,sqlite,postgres]``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

from respgw.state.v1 import resources_pb2, state_service_pb2, state_service_pb2_grpc
from tests.support import POSTGRES_DSN, STATE_READY, Process

TENANT = "bench"
CHAINS = (1, 20, 200)
CHANNELS = 4


def message(item_id: str, role: str, text: str) -> resources_pb2.Item:
    body = {
        "id": item_id,
        "type": "message",
        "role": role,
        "status": "completed",
        "content": [{"type": "input_text" if role == "user" else "output_text", "text": text}],
    }
    return resources_pb2.Item(id=item_id, json=json.dumps(body).encode())


def stored_turn(
    response_id: str, previous: str = "", conversation: str = ""
) -> resources_pb2.StoredResponse:
    response = {"id": response_id, "object": "response", "status": "completed", "model": "m"}
    return resources_pb2.StoredResponse(
        id=response_id,
        previous_response_id=previous,
        conversation_id=conversation,
        input_items=[message(f"msg_{response_id}_in", "user", "What is the weather like?")],
        output_items=[message(f"msg_{response_id}_out", "assistant", "Sunny, 21 degrees. " * 4)],
        response_json=json.dumps(response).encode(),
    )


class Load:
    """A few channels to one service, shared round robin by the workers."""

    def __init__(self, port: int) -> None:
        self.channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(CHANNELS)]
        self.stubs = [state_service_pb2_grpc.StateServiceStub(c) for c in self.channels]

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()

    async def run(
        self,
        concurrency: int,
        seconds: float,
        call: Callable[[state_service_pb2_grpc.StateServiceAsyncStub, int], Awaitable[object]],
    ) -> tuple[float, list[float]]:
        """Calls ``call(stub, n)`` from ``concurrency`` workers for ``seconds``; returns the
        calls per second and each call's latency in milliseconds."""
        latencies: list[float] = []
        counter = itertools.count()
        deadline = time.perf_counter() + seconds

        async def worker(w: int) -> None:
            stub = self.stubs[w % len(self.stubs)]
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                await call(stub, next(counter))
                latencies.append((time.perf_counter() - start) * 1000)

        began = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        return len(latencies) / (time.perf_counter() - began), latencies


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


async def bench_backend(name: str, port: int, seconds: float) -> list[dict[str, object]]:
    load = Load(port)
    rows: list[dict[str, object]] = []
    run_id = secrets.token_hex(4)
    try:
        stub = load.stubs[0]
        for concurrency in (1, 32):

            async def put(
                s: state_service_pb2_grpc.StateServiceAsyncStub, n: int, c: int = concurrency
            ) -> object:
                response_id = f"resp_{run_id}_c{c}_{n}"
                return await s.PutTurn(
                    state_service_pb2.PutTurnRequest(
                        tenant=TENANT, response=stored_turn(response_id)
                    )
                )

            rate, lat = await load.run(concurrency, seconds, put)
            rows.append(row(name, "PutTurn", concurrency, rate, lat))

        created = await stub.CreateConversation(
            state_service_pb2.CreateConversationRequest(tenant=TENANT)
        )
        conversation = created.conversation.id

        async def put_conv(s: state_service_pb2_grpc.StateServiceAsyncStub, n: int) -> object:
            return await s.PutTurn(
                state_service_pb2.PutTurnRequest(
                    tenant=TENANT,
                    response=stored_turn(f"resp_{run_id}_conv_{n}", conversation=conversation),
                )
            )

        rate, lat = await load.run(32, seconds, put_conv)
        rows.append(row(name, "PutTurn, one conversation", 32, rate, lat))

        for turns in CHAINS:
            previous = ""
            for n in range(turns):
                response_id = f"resp_{run_id}_chain{turns}_{n}"
                await stub.PutTurn(
                    state_service_pb2.PutTurnRequest(
                        tenant=TENANT, response=stored_turn(response_id, previous=previous)
                    )
                )
                previous = response_id
            request = state_service_pb2.GetHistoryRequest(tenant=TENANT, response_id=previous)
            check = await stub.GetHistory(request)
            assert len(check.items) == 2 * turns and not check.truncated

            async def history(
                s: state_service_pb2_grpc.StateServiceAsyncStub,
                n: int,
                request: state_service_pb2.GetHistoryRequest = request,
            ) -> object:
                return await s.GetHistory(request)

            for concurrency in (1, 32):
                rate, lat = await load.run(concurrency, seconds, history)
                rows.append(row(name, f"GetHistory, chain of {turns}", concurrency, rate, lat))
    finally:
        await load.close()
    return rows


def row(
    backend: str, op: str, concurrency: int, rate: float, lat: list[float]
) -> dict[str, object]:
    return {
        "backend": backend,
        "op": op,
        "conc": concurrency,
        "rate": rate,
        "p50": percentile(lat, 50),
        "p99": percentile(lat, 99),
    }


def start_service(backend: str, workdir: Path, schema: str) -> Process:
    args = [
        "state",
        "--backend", backend,
        "--listen", "127.0.0.1:0",
        "--metrics-port", "0",
        "--sqlite-path", str(workdir / "bench-state.db"),
        "--postgres-dsn", POSTGRES_DSN,
        "--postgres-schema", schema,
    ]  # fmt: skip
    return Process(args)


async def drop_schema(schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(POSTGRES_DSN)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.5, help="Duration of each measurement.")
    parser.add_argument("--backends", default="memory,sqlite,postgres")
    args = parser.parse_args()

    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends.split(","):
            schema = "bench_" + secrets.token_hex(4)
            proc = start_service(backend, Path(tmp), schema)
            try:
                port = proc.start(STATE_READY)
            except TimeoutError as exc:
                print(f"{backend}: could not start ({exc}); skipped", file=sys.stderr)
                continue
            try:
                rows.extend(await bench_backend(backend, port, args.seconds))
            finally:
                proc.stop()
                if backend == "postgres":
                    await drop_schema(schema)
    report(rows)


def report(rows: list[dict[str, object]]) -> None:
    print(f"{'backend':9} {'operation':27} {'conc':>4} {'calls/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for r in rows:
        print(
            f"{r['backend']!s:9} {r['op']!s:27} {r['conc']!s:>4} {r['rate']:>9.0f} "
            f"{r['p50']:>8.2f} {r['p99']:>8.2f}"
        )
    print()
    print("GetHistory p50, 200-turn chain / 1-turn chain (one query either way):")
    for backend in dict.fromkeys(str(r["backend"]) for r in rows):
        for conc in (1, 32):
            p50 = {
                str(r["op"]): float(r["p50"])  # type: ignore[arg-type]
                for r in rows
                if r["backend"] == backend and r["conc"] == conc
            }
            one, many = p50.get("GetHistory, chain of 1"), p50.get("GetHistory, chain of 200")
            if one and many:
                print(
                    f"  {backend:9} conc {conc:>2}: {many / one:5.1f}x ({one:.2f} -> {many:.2f} ms)"
                )


if __name__ == "__main__":
    asyncio.run(main())
