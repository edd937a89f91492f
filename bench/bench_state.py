"""State service benchmark: stored turns per second and history resolution latency, per backend.

For each backend (memory, SQLite, PostgreSQL) it starts a state service as its own process on
loopback and measures, through real gRPC calls from this process:

1. PutTurn throughput at concurrency 1 and 32 (independent turns of two small items), and at
   concurrency 32 into ONE conversation (appends serialize on the conversation);
2. GetHistory latency (p50, p99) for previous_response_id chains of 1, 20 and 200 turns, at
   concurrency 1 and 32, and the ratio of the 200-turn to the 1-turn p50: the server resolves a
   chain in one query, so the ratio grows with the bytes returned, not with one round trip per turn.

3. Flat in stored data: GetHistory of a 10-turn chain and PutTurn of a turn chained on one, p50
   at concurrency 1, on a store of 10,000 turns against a large one (``--flat-turns``, 200,000 by
   default), and their ratio (the target is within 1.2x). Both stores are preloaded fast, in
   chains of ten turns of two items: SQLite through the backend's own PutTurn, whose writer
   commits concurrent calls in groups; PostgreSQL by INSERT ... SELECT in large transactions,
   then VACUUM ANALYZE as autovacuum would; memory in a helper process that preloads its own
   backend before it serves. Then a state service serves each store (the same file or schema)
   and the two are measured in alternating rounds, chains picked at random over the store.

Numbers drift on a shared machine; compare rows of the same run. Run:
``python -m bench.bench_state [--seconds 1.5] [--backends memory,sqlite,postgres]
[--sections calls,flat] [--flat-turns 200000]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import json
import random
import re
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

from respgw.state.v1 import resources_pb2, state_service_pb2, state_service_pb2_grpc
from state_svc.backends import base
from state_svc.backends.base import Backend
from tests.support import POSTGRES_DSN, REPO, STATE_READY, Process

TENANT = "bench"
CHAINS = (1, 20, 200)
CHANNELS = 4


QUESTION = "What is the weather like?"
ANSWER = "Sunny, 21 degrees. " * 4


def message_json(item_id: str, role: str, text: str) -> bytes:
    body = {
        "id": item_id,
        "type": "message",
        "role": role,
        "status": "completed",
        "content": [{"type": "input_text" if role == "user" else "output_text", "text": text}],
    }
    return json.dumps(body).encode()


def message(item_id: str, role: str, text: str) -> resources_pb2.Item:
    return resources_pb2.Item(id=item_id, json=message_json(item_id, role, text))


def response_json(response_id: str) -> bytes:
    response = {"id": response_id, "object": "response", "status": "completed", "model": "m"}
    return json.dumps(response).encode()


def stored_turn(
    response_id: str, previous: str = "", conversation: str = ""
) -> resources_pb2.StoredResponse:
    return resources_pb2.StoredResponse(
        id=response_id,
        previous_response_id=previous,
        conversation_id=conversation,
        input_items=[message(f"msg_{response_id}_in", "user", QUESTION)],
        output_items=[message(f"msg_{response_id}_out", "assistant", ANSWER)],
        response_json=response_json(response_id),
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
    parser.add_argument(
        "--sections", default="calls,flat", help="calls (sections 1 and 2), flat (section 3)."
    )
    parser.add_argument(
        "--flat-turns",
        type=int,
        default=200_000,
        help=f"Turns in the large store of the flat section (the small one holds {FLAT_SMALL:,}).",
    )
    parser.add_argument("--serve-memory", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--seed", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_memory is not None:
        await serve_memory(args.serve_memory, args.seed)
        return
    sections = set(args.sections.split(","))
    backends = args.backends.split(",")

    rows: list[dict[str, object]] = []
    flat: list[FlatRow] = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend in backends if "calls" in sections else []:
            print(f"{backend}: calls", file=sys.stderr, flush=True)
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
        for backend in backends if "flat" in sections else []:
            flat.extend(await bench_flat(backend, Path(tmp), args.flat_turns))
    if rows:
        report(rows)
    if flat:
        report_flat(flat, args.flat_turns)


# --- 3. flat in stored data ------------------------------------------------------------------

FLAT_SMALL = 10_000
CHAIN_TURNS = 10
FLAT_ROUNDS = 5
FLAT_CALLS = 300  # per operation, store and round
PRELOAD_WINDOW = 64 * CHAIN_TURNS  # concurrent PutTurn calls of the backend preload


def flat_id(seed: str, n: int) -> str:
    """The id of the n-th preloaded turn (the PostgreSQL preload computes the same in SQL)."""
    return "resp_" + hashlib.sha256(f"{seed}:{n}".encode()).hexdigest()[:24]


def flat_turn(seed: str, n: int) -> base.Turn:
    """The n-th preloaded turn: chains of CHAIN_TURNS turns, each with two messages."""
    response_id = flat_id(seed, n)
    previous = flat_id(seed, n - 1) if n % CHAIN_TURNS else ""
    in_id, out_id = f"msg_{response_id}_in", f"msg_{response_id}_out"
    return base.Turn(
        id=response_id,
        response_json=response_json(response_id),
        previous_response_id=previous,
        input_items=(base.Item(in_id, message_json(in_id, "user", QUESTION)),),
        output_items=(base.Item(out_id, message_json(out_id, "assistant", ANSWER)),),
    )


class Progress:
    """Prints how far a preload got, about every 10%."""

    def __init__(self, label: str, total: int) -> None:
        self.label, self.total, self.began, self.next = label, total, time.perf_counter(), 0

    def __call__(self, done: int) -> None:
        if done >= self.next or done == self.total:
            rate = done / max(time.perf_counter() - self.began, 1e-9)
            print(
                f"  {self.label}: {done:,} of {self.total:,} turns stored ({rate:,.0f}/s)",
                file=sys.stderr,
                flush=True,
            )
            self.next = done + max(self.total // 10, 1)


async def preload_backend(backend: Backend, seed: str, turns: int, progress: Progress) -> None:
    """Stores turns 0..turns-1 through the backend's own PutTurn, PRELOAD_WINDOW calls at a
    time: a chain's turns are started in order, so each finds its previous one stored."""
    for low in range(0, turns, PRELOAD_WINDOW):
        high = min(low + PRELOAD_WINDOW, turns)
        await asyncio.gather(
            *(
                backend.put_turn(TENANT, flat_turn(seed, n), expected_conversation_version=None)
                for n in range(low, high)
            )
        )
        progress(high)


async def preload_sqlite(path: Path, seed: str, turns: int) -> None:
    from state_svc.backends.sqlite import SqliteBackend

    # synchronous=normal: the preload need not survive a power cut; the service that serves
    # the file afterwards runs with the default (full).
    backend = await SqliteBackend(str(path), synchronous="normal").open()
    try:
        await preload_backend(backend, seed, turns, Progress(f"sqlite {path.name}", turns))
    finally:
        await backend.close()
    import sqlite3

    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")


async def preload_postgres(schema: str, seed: str, turns: int) -> None:
    """Creates the schema with the backend, then writes the rows in large INSERT ... SELECT
    transactions shaped as the backend writes them (the same ids as :func:`flat_turn`)."""
    import asyncpg

    from state_svc.backends.postgres import PostgresBackend

    await (await PostgresBackend(POSTGRES_DSN, schema=schema, pool_size=1).open()).close()
    s = f'"{schema}"'
    progress = Progress(f"postgres {schema}", turns)
    conn = await asyncpg.connect(POSTGRES_DSN)
    try:
        ident = "'resp_' || left(encode(sha256(convert_to($2 || ':' || ({n}), 'UTF8')), 'hex'), 24)"
        for low in range(0, turns, 100_000):
            high = min(low + 100_000, turns)
            await conn.execute(
                f"""WITH r AS (
                    INSERT INTO {s}.responses (tenant, id, previous_response_id, conversation_id,
                        idempotency_key, response_json, digest, conversation_version,
                        create_time_us, expire_time_us)
                    SELECT $1, {ident.format(n="n")},
                        CASE WHEN n % {CHAIN_TURNS} = 0 THEN '' ELSE {ident.format(n="n - 1")} END,
                        '', '', convert_to(json_build_object('id', {ident.format(n="n")},
                            'object', 'response', 'status', 'completed', 'model', 'm')::text,
                            'UTF8'),
                        sha256(convert_to($2 || ':' || n, 'UTF8')), 0, $5, NULL
                    FROM generate_series($3::bigint, $4::bigint - 1) AS n ORDER BY n
                    RETURNING pk, id
                )
                INSERT INTO {s}.response_items (response_pk, kind, position, item_id, json)
                SELECT r.pk, k.kind, 1, 'msg_' || r.id || k.suffix, convert_to(
                    json_build_object('id', 'msg_' || r.id || k.suffix, 'type', 'message',
                        'role', k.role, 'status', 'completed', 'content',
                        json_build_array(json_build_object('type', k.type, 'text', k.text)))::text,
                    'UTF8')
                FROM r, (VALUES (0::smallint, '_in', 'user', 'input_text', $6),
                    (1::smallint, '_out', 'assistant', 'output_text', $7))
                    AS k (kind, suffix, role, type, text)""",
                TENANT,
                seed,
                low,
                high,
                base.now_us(),
                QUESTION,
                ANSWER,
            )
            progress(high)
        for table in ("responses", "response_items"):
            await conn.execute(f"VACUUM (ANALYZE) {s}.{table}")
    finally:
        await conn.close()


async def serve_memory(turns: int, seed: str) -> None:
    """The helper process of the memory store: a state service whose own backend is preloaded
    before it says it is ready; it serves until SIGTERM."""
    from state_svc import server
    from state_svc.config import StateSettings

    settings = StateSettings(
        listen="127.0.0.1:0",
        backend="memory",
        metrics_port=0,
        sweep_interval_s=0,
        max_connection_age_s=0,
        log_format="text",
    )
    running = await server.start(settings)
    await preload_backend(running.backend, seed, turns, Progress(f"memory {turns:,}", turns))
    print(f"bench memory store ready port={running.port}", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await running.stop(0)


class MemoryHelper:
    """``python -m bench.bench_state --serve-memory N`` as a child process."""

    def __init__(self, turns: int, seed: str) -> None:
        seed_args = ["--seed", seed]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.bench_state", "--serve-memory", str(turns), *seed_args],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.port: int | None = None
        self.ready = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            found = re.search(r"bench memory store ready port=(\d+)", line)
            if found:
                self.port = int(found.group(1))
                self.ready.set()
            elif "turns stored" in line:
                print(line, end="", file=sys.stderr, flush=True)
        self.ready.set()

    def wait(self, timeout: float) -> int:
        if not self.ready.wait(timeout) or self.port is None:
            self.stop()
            raise TimeoutError("the memory store helper did not start")
        return self.port

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.reader.join(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@contextlib.contextmanager
def flat_services(backend: str, stores: dict[int, str]) -> Iterator[dict[int, int]]:
    """A state service per preloaded store (keyed by size; the value is the SQLite file or the
    PostgreSQL schema); yields their ports."""
    procs: list[Process] = []
    try:
        ports = {}
        for size, where in stores.items():
            args = ["state", "--backend", backend, "--listen", "127.0.0.1:0"]
            args += ["--metrics-port", "0", "--sweep-interval-s", "0"]
            if backend == "sqlite":
                args += ["--sqlite-path", where]
            else:
                args += ["--postgres-dsn", POSTGRES_DSN, "--postgres-schema", where]
            proc = Process(args)
            procs.append(proc)
            ports[size] = proc.start(STATE_READY, timeout=60)
        yield ports
    finally:
        for proc in procs:
            proc.stop()


async def bench_flat(backend: str, workdir: Path, large: int) -> list[FlatRow]:
    """Section 3 for one backend: preloads a small and a large store, serves both and measures
    them in alternating rounds."""
    sizes = [FLAT_SMALL, max(large, FLAT_SMALL)]
    seed = secrets.token_hex(4)
    print(f"{backend}: flat in stored data, {sizes[0]:,} and {sizes[1]:,} turns", file=sys.stderr)
    began = time.perf_counter()
    helpers: list[MemoryHelper] = []
    schemas: list[str] = []
    try:
        if backend == "memory":
            helpers = [MemoryHelper(size, seed) for size in sizes]
            ports = {size: h.wait(timeout=3600) for size, h in zip(sizes, helpers, strict=True)}
            preloaded = time.perf_counter() - began
            return await measure_flat(backend, ports, seed, preloaded)
        stores: dict[int, str] = {}
        for size in sizes:
            if backend == "sqlite":
                path = workdir / f"flat-{size}.db"
                await preload_sqlite(path, seed, size)
                stores[size] = str(path)
            elif backend == "postgres":
                schema = f"bench_flat_{size}_{seed}"
                schemas.append(schema)
                await preload_postgres(schema, seed, size)
                stores[size] = schema
            else:
                raise ValueError(f"unknown backend {backend!r}")
        preloaded = time.perf_counter() - began
        with flat_services(backend, stores) as ports:
            return await measure_flat(backend, ports, seed, preloaded)
    except Exception as exc:
        print(f"{backend}: flat section failed ({exc!r}); skipped", file=sys.stderr)
        return []
    finally:
        for helper in helpers:
            helper.stop()
        for schema in schemas:
            await drop_schema(schema)
        for size in sizes:
            for suffix in ("", "-wal", "-shm"):
                (workdir / f"flat-{size}.db{suffix}").unlink(missing_ok=True)


async def measure_flat(
    backend: str, ports: dict[int, int], seed: str, preloaded: float
) -> list[FlatRow]:
    """GetHistory of a random preloaded chain and PutTurn chained on one, at concurrency 1,
    FLAT_ROUNDS rounds alternating the stores; returns one row per store and operation."""
    rng = random.Random(seed)
    loads = {size: Load(port) for size, port in ports.items()}
    latencies: dict[tuple[int, str], list[float]] = {
        (size, op): [] for size in ports for op in ("GetHistory", "PutTurn")
    }
    written = itertools.count()

    def tail(size: int) -> str:
        return flat_id(seed, rng.randrange(size // CHAIN_TURNS) * CHAIN_TURNS + CHAIN_TURNS - 1)

    async def history(stub: state_service_pb2_grpc.StateServiceAsyncStub, size: int) -> None:
        request = state_service_pb2.GetHistoryRequest(tenant=TENANT, response_id=tail(size))
        reply = await stub.GetHistory(request)
        assert len(reply.items) == 2 * CHAIN_TURNS, len(reply.items)

    async def put(stub: state_service_pb2_grpc.StateServiceAsyncStub, size: int) -> None:
        response = stored_turn(f"resp_flat_{seed}_{next(written)}", previous=tail(size))
        await stub.PutTurn(state_service_pb2.PutTurnRequest(tenant=TENANT, response=response))

    calls = {"GetHistory": history, "PutTurn": put}
    try:
        # Warm-up: connections, and the first pages of each store.
        for size, load in loads.items():
            for call in calls.values():
                for _ in range(50):
                    await call(load.stubs[0], size)
        for round_ in range(FLAT_ROUNDS):
            order = list(loads) if round_ % 2 == 0 else list(reversed(loads))
            for size in order:
                stub = loads[size].stubs[0]
                for op, call in calls.items():
                    for _ in range(FLAT_CALLS):
                        start = time.perf_counter()
                        await call(stub, size)
                        latencies[(size, op)].append((time.perf_counter() - start) * 1000)
    finally:
        for load in loads.values():
            await load.close()
    return [
        FlatRow(backend, op, size, percentile(lat, 50), percentile(lat, 99), preloaded)
        for (size, op), lat in latencies.items()
    ]


@dataclass(frozen=True)
class FlatRow:
    backend: str
    op: str
    size: int
    p50: float
    p99: float
    preload_s: float

    def cell(self) -> str:
        return f"{self.p50:.2f} ({self.p99:.2f})"


def report_flat(rows: list[FlatRow], large: int) -> None:
    print()
    print(
        f"Flat in stored data: p50 (p99) in ms at concurrency 1, {FLAT_SMALL:,} against "
        f"{large:,} stored turns (target: within 1.2x):"
    )
    print(f"{'backend':9} {'operation':11} {'10k store':>16} {'large store':>16} {'ratio':>7}")
    for backend in dict.fromkeys(r.backend for r in rows):
        mine = [r for r in rows if r.backend == backend]
        for op in ("GetHistory", "PutTurn"):
            by_size = {r.size: r for r in mine if r.op == op}
            small, big = by_size.get(FLAT_SMALL), by_size.get(max(large, FLAT_SMALL))
            if small is None or big is None:
                continue
            ratio = big.p50 / small.p50
            verdict = "ok" if ratio <= 1.2 else "OVER"
            print(
                f"{backend:9} {op:11} {small.cell():>16} {big.cell():>16} {ratio:>6.2f}x {verdict}"
            )
        print(f"{'':9} (both stores preloaded in {mine[0].preload_s:.0f} s)")


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
