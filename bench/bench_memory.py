"""Memory benchmark: what a turn with a long answer costs the router and the state service.

Starts a model server of its own (in this process, on loopback) that answers every chat
completion with one large answer: streamed as a model streams tokens, in small deltas
(``--delta`` bytes each, a ``--delta-answer-mb`` answer: the router spends tens of µs on each
delta), in large chunks (``--chunk`` bytes, an ``--answer-mb`` answer), or whole (not
streamed); and the same as conversation turns (``--conversation-turns``, each in a
conversation of its own: a conversation turn's stream is held until the turn is stored).
For each case it starts a fresh state service (SQLite, ``synchronous=FULL``; or PostgreSQL with
``--backend postgres``, in a schema of its own) and router, each as its own process, runs a few
small turns to warm them up, resets their peak resident memory (``VmHWM`` in /proc, through
``clear_refs``), then drives N stored turns at once
(POST /v1/responses, ``store: true``; ``--delta-turns`` and ``--turns``) and reads each answer to
its end, checking it is whole. Printed per process:

- (peak RSS during the turns - RSS before) / N / answer size: what one turn of that many at once
  costs, in answer sizes;
- ``held``: RSS 2 s after the turns ended minus RSS before, in MB;
- for a streamed case, ``replay``: what the router's and the state service's peak RSS grew by
  while one of those responses was replayed (GET ?stream=true) and read to its end, in answer
  sizes;
- ``get``: the same for a plain GET of it (the response object, not streamed), after the replay.

The router's history cache (``--history-cache-mb``, 64 MB in a router by default) keeps the items
of the chains it stored, up to its bound; it is off here (0) so that ``held`` shows what no bound
governs: pass ``--history-cache-mb 64`` to see its share.

Run: ``python -m bench.bench_memory`` (about a minute).
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
from aiohttp import web

from tests.support import POSTGRES_DSN, ROUTER_READY, STATE_READY, Process

MB = 1024 * 1024


def _status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} for {pid}")


def rss_bytes(pid: int) -> int:
    return _status(pid, "VmRSS:")


def reset_peak(pid: int) -> None:
    """Starts a new high-water mark of the process's RSS (Linux: clear_refs 5)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def peak_bytes(pid: int) -> int:
    """The process's peak RSS since :func:`reset_peak` (VmHWM): no sample misses it."""
    return _status(pid, "VmHWM:")


def answer_text(size: int) -> str:
    """``size`` bytes of ASCII text that no two deltas share (no interned one-letter strings)."""
    words = []
    n = 0
    i = 0
    while n < size:
        word = f"w{i:x} "
        words.append(word)
        n += len(word)
        i += 1
    return "".join(words)[:size]


class BigHub:
    """A chat completions server whose every answer is ``text``: streamed in pieces of
    ``delta`` characters, or whole."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.delta = 4
        self._bodies: dict[tuple[int, int], bytes] = {}
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()
        self._ready.wait(10)

    def _stream_body(self, delta: int) -> bytes:
        key = (delta, len(self.text))
        if key not in self._bodies:
            head = b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"big","choices":[{"index":0,"delta":{"content":'
            tail = b'},"finish_reason":null}]}\n\n'
            out = bytearray(
                b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,'
                b'"model":"big","choices":[{"index":0,"delta":{"role":"assistant"},'
                b'"finish_reason":null}]}\n\n'
            )
            for i in range(0, len(self.text), delta):
                out += head + orjson.dumps(self.text[i : i + delta]) + tail
            out += (
                b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,'
                b'"model":"big","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],'
                b'"usage":{"prompt_tokens":5,"completion_tokens":1000,"total_tokens":1005}}\n\n'
                b"data: [DONE]\n\n"
            )
            self._bodies.clear()  # one answer at a time
            self._bodies[key] = bytes(out)
        return self._bodies[key]

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        first = body["messages"][-1]["content"]
        if not body.get("stream"):
            # The warm-up turns are small (a large one would leave the allocator memory that
            # the measured turns then reuse unseen).
            text = "hi" if first == "warm up" else self.text
            return web.json_response(
                {
                    "id": "chatcmpl-1",
                    "object": "chat.completion",
                    "created": 1,
                    "model": "big",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": text},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 1000, "total_tokens": 1005},
                },
                dumps=lambda o: orjson.dumps(o).decode(),
            )
        delta = 4 if first == "warm up" else self.delta
        data = self._stream_body(delta) if first != "warm up" else self._warm_body()
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        view = memoryview(data)
        for i in range(0, len(view), 64 * 1024):
            await resp.write(view[i : i + 64 * 1024])
        await resp.write_eof()
        return resp

    def _warm_body(self) -> bytes:
        return (
            b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"big",'
            b'"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":"stop"}]}\n\n'
            b"data: [DONE]\n\n"
        )

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application(client_max_size=64 * MB)
        app.router.add_post("/v1/chat/completions", self._chat)
        runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = int(runner.addresses[0][1])
        self._ready.set()
        self._loop.run_forever()


async def one_turn(
    session: aiohttp.ClientSession,
    url: str,
    stream: bool,
    text: str,
    size: int = 0,
    *,
    conversation: bool = False,
) -> tuple[int, str]:
    """Runs one stored turn to its end (with ``conversation``, in a conversation of its own,
    made first: its stream is held until the turn is stored); returns the answer's length as
    the client got it, and the response's id."""
    keep = 4 * size + 64 * 1024  # the terminal event holds the answer, and the [DONE] after it
    body: dict[str, object] = {"model": "big", "input": text, "store": True, "stream": stream}
    if conversation:
        async with session.post(f"{url}/conversations", json={}) as resp:
            if resp.status != 200:
                raise RuntimeError(f"no conversation: {resp.status} {(await resp.read())[:300]!r}")
            body["conversation"] = (await resp.json())["id"]
    async with session.post(f"{url}/responses", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"turn failed: {resp.status} {(await resp.read())[:300]!r}")
        if not stream:
            data = orjson.loads(await resp.read())
            if data["status"] != "completed":
                raise RuntimeError(f"turn not completed: {data['status']}")
            return len(data["output"][0]["content"][0]["text"]), str(data["id"])
        # The stream is read to its end, without keeping it; only its last events are parsed.
        tail = bytearray()
        async for chunk in resp.content.iter_any():
            tail += chunk
            if len(tail) > 2 * keep:
                del tail[:-keep]
        events = [line[6:] for line in bytes(tail).split(b"\n") if line.startswith(b"data: {")]
        terminal = orjson.loads(events[-1]) if events else {}
        if terminal.get("type") != "response.completed":
            raise RuntimeError(f"stream did not complete: {str(terminal)[:300]}")
        return len(terminal["response"]["output"][0]["content"][0]["text"]), str(
            terminal["response"]["id"]
        )


async def read_through(
    session: aiohttp.ClientSession, url: str, response_id: str, *, stream: bool
) -> None:
    """GET of a stored response (``?stream=true``: its replay), read to its end unkept."""
    params = {"stream": "true"} if stream else {}
    async with session.get(f"{url}/responses/{response_id}", params=params) as resp:
        if resp.status != 200:
            raise RuntimeError(f"GET failed: {resp.status} {(await resp.read())[:300]!r}")
        async for _ in resp.content.iter_any():
            pass


@dataclass
class Case:
    name: str
    stream: bool
    delta: int
    turns: int
    size: int
    conversation: bool = False


def run_case(case: Case, hub: BigHub, args: argparse.Namespace, work: Path) -> None:
    hub.delta = case.delta
    if len(hub.text) != case.size:
        hub.text = answer_text(case.size)
    size = case.size
    db = work / f"state-{case.name.replace(' ', '-')}-{case.turns}.db"
    schema = f"bench_memory_{secrets.token_hex(6)}"
    if args.backend == "sqlite":
        store = ["--sqlite-path", str(db), "--sqlite-synchronous", "full"]
    else:
        store = ["--postgres-dsn", args.postgres_dsn, "--postgres-schema", schema]
    state = Process(
        [
            "state",
            "--backend",
            args.backend,
            *store,
            "--listen",
            "127.0.0.1:0",
            "--metrics-port",
            "0",
        ]
    )
    router = Process(
        [
            "router",
            "--port",
            "0",
            "--hub-url",
            f"http://127.0.0.1:{hub.port}/v1",
            "--history-cache-mb",
            str(args.history_cache_mb),
            "--state-timeout-s",
            str(args.state_timeout_s),
        ]
    )
    try:
        state_port = state.start(STATE_READY)
        router.args += ["--state-address", f"127.0.0.1:{state_port}"]
        router_port = router.start(ROUTER_READY)
        assert state.proc is not None and router.proc is not None
        pids = {"router": router.proc.pid, "state": state.proc.pid}
        url = f"http://127.0.0.1:{router_port}/v1"

        async def drive() -> float:
            timeout = aiohttp.ClientTimeout(total=600)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                for _ in range(3):
                    _, warm = await one_turn(session, url, True, "warm up")
                    await one_turn(session, url, False, "warm up")
                    if case.conversation:
                        await one_turn(session, url, True, "warm up", conversation=True)
                    # The read-back routes too (what they import or cache the first time).
                    await read_through(session, url, warm, stream=True)
                    await read_through(session, url, warm, stream=False)
                await asyncio.sleep(0.5)
                baseline.update({name: rss_bytes(pid) for name, pid in pids.items()})
                for pid in pids.values():
                    reset_peak(pid)
                start = time.perf_counter()
                got = await asyncio.gather(
                    *(
                        one_turn(
                            session, url, case.stream, "go", size, conversation=case.conversation
                        )
                        for _ in range(case.turns)
                    )
                )
                peaks.update({name: peak_bytes(pid) for name, pid in pids.items()})
                if any(n != size for n, _ in got):
                    raise RuntimeError(f"answers of {got} characters, not {size}")
                ids.append(got[0][1])
                return time.perf_counter() - start

        async def read_back(stream: bool) -> tuple[float, float]:
            """One of the responses read back (GET, ``?stream=true`` for a replay) to its end:
            what the router's and the state service's peak RSS grew by meanwhile, in answer
            sizes."""
            async with aiohttp.ClientSession() as session:
                base = {name: rss_bytes(pid) for name, pid in pids.items()}
                for pid in pids.values():
                    reset_peak(pid)
                await read_through(session, url, ids[0], stream=stream)
                router, state = ((peak_bytes(pids[n]) - base[n]) / size for n in pids)
                return router, state

        baseline: dict[str, int] = {}
        peaks: dict[str, int] = {}
        ids: list[str] = []
        seconds = asyncio.run(drive())
        time.sleep(args.pause)
        after = {name: rss_bytes(pid) for name, pid in pids.items()}
        replayed = None
        if case.stream:
            replayed = asyncio.run(read_back(True))
            time.sleep(args.pause)
        got = asyncio.run(read_back(False))
        cols = []
        for name in ("router", "state"):
            per_turn = (peaks[name] - baseline[name]) / case.turns / size
            held = (after[name] - baseline[name]) / MB
            cols.append(f"{name} {per_turn:6.2f}x  held {held:7.1f} MB")
        cols.append(f"get: router {got[0]:5.2f}x state {got[1]:5.2f}x")
        if replayed is not None:
            cols.append(f"replay: router {replayed[0]:5.2f}x state {replayed[1]:5.2f}x")
        print(
            f"{case.name:<22} {size / MB:4.1f} MB {case.turns:>3} turns {seconds:6.1f} s   "
            + "   ".join(cols),
            flush=True,
        )
    finally:
        router.stop()
        state.stop()
        if args.backend == "postgres":
            asyncio.run(_drop_schema(args.postgres_dsn, schema))


async def _drop_schema(dsn: str, schema: str) -> None:
    import asyncpg  # only with --backend postgres

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


def _counts(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--answer-mb", type=float, default=4.0, help="answer of large chunks")
    parser.add_argument("--chunk", type=int, default=16 * 1024, help="bytes per large chunk")
    parser.add_argument("--turns", default="1,20", help="concurrent turns, comma-separated")
    parser.add_argument(
        "--delta-answer-mb",
        type=float,
        default=0.5,
        help="answer of small deltas (the router spends tens of µs on each delta)",
    )
    parser.add_argument(
        "--delta", type=int, default=4, help="bytes per delta of a small-delta stream"
    )
    parser.add_argument("--delta-turns", default="1,4", help="concurrent small-delta turns")
    parser.add_argument(
        "--conversation-turns",
        default="1",
        help="concurrent conversation turns (each in a conversation of its own), comma-separated",
    )
    parser.add_argument("--pause", type=float, default=2.0, help="seconds before 'held' is read")
    parser.add_argument("--history-cache-mb", type=int, default=0, help="the router's cache")
    parser.add_argument(
        "--state-timeout-s",
        type=float,
        default=5.0,
        help="the router's state deadline (its default; 20 long turns at once on a busy host "
        "can take longer to store, which the bench then reports as a failed turn)",
    )
    parser.add_argument(
        "--backend",
        choices=["sqlite", "postgres"],
        default="sqlite",
        help="the state service's store (postgres: a schema of its own per case, dropped after)",
    )
    parser.add_argument(
        "--postgres-dsn",
        default=POSTGRES_DSN,
        help="the PostgreSQL server of --backend postgres (default: the tests' server)",
    )
    args = parser.parse_args()
    big = int(args.answer_mb * MB)
    small = int(args.delta_answer_mb * MB)
    hub = BigHub(answer_text(big))
    work = Path(tempfile.mkdtemp(prefix="respgw-bench-memory-"))
    print(
        "# memory per turn, in answer sizes: (peak RSS - RSS before) / turns / answer; "
        f"{'SQLite' if args.backend == 'sqlite' else 'PostgreSQL'} state; "
        f"router --history-cache-mb {args.history_cache_mb}"
    )
    cases = [
        Case(f"stream, {args.delta} B deltas", True, args.delta, turns, small)
        for turns in _counts(args.delta_turns)
    ]
    for turns in _counts(args.turns):
        cases.append(Case(f"stream, {args.chunk // 1024} KB chunks", True, args.chunk, turns, big))
        cases.append(Case("not streamed", False, args.chunk, turns, big))
    # A conversation turn's stream is held until the turn is stored (its own path).
    for turns in _counts(args.conversation_turns):
        cases.append(Case(f"conv. stream, {args.delta} B", True, args.delta, turns, small, True))
        cases.append(
            Case(f"conv. stream, {args.chunk // 1024} KB", True, args.chunk, turns, big, True)
        )
        cases.append(Case("conv. not streamed", False, args.chunk, turns, big, True))
    try:
        for case in cases:
            run_case(case, hub, args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
