"""The background worker: the background responses this router runs, and the scanner that
claims queued jobs and jobs whose lease ran out (another router stopped) and takes them over.

Claims go on the worker's own channel, unsampled, so that scans stay out of the request path's
traces and metrics; the same channel serves WatchResponseEvents (:mod:`router_svc.background_log`).
Each job runs in a task of its own (:class:`router_svc.background_run.Run`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import secrets
import socket
from typing import TYPE_CHECKING, Any, cast

import grpc

from gateway import grpcclient
from gateway.grpcserver import channel_options
from router_svc import errors, running, state_records, turn
from router_svc.background_log import Client
from router_svc.background_run import Run
from router_svc.background_spec import turn_of, turn_of_stored
from router_svc.services import Services
from router_svc.state_client import state_stub

if TYPE_CHECKING:
    from router_svc.state_client import StateStub

log = logging.getLogger(__name__)
# Back-off jitter from a generator of our own: the global one is the application's (and tests
# seed it).
_jitter = random.Random()

# A claim is retried on UNAVAILABLE (IDEMPOTENT with its request_id).
_CLAIM_RETRY = grpcclient.RetryPolicy(frozenset({grpc.StatusCode.UNAVAILABLE}), (0.2, 0.4))

# A W3C traceparent whose sampled flag is off: a traced state service records no span of a
# scan (scans come every few seconds whatever the traffic, like health checks, which are
# not traced either).
_UNSAMPLED = (("traceparent", f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-00"),)


class Worker:
    """The background responses this router runs, and the scanner that takes over others'."""

    def __init__(self, svc: Services) -> None:
        s = svc.settings
        if s.background_lease_s <= 0 or s.background_scan_interval_s <= 0:
            raise ValueError("--background-lease-s and --background-scan-interval-s must be > 0")
        if s.background_max_attempts < 1 or s.background_max_running < 1:
            raise ValueError("--background-max-attempts and --background-max-running must be >= 1")
        self.svc = svc
        self.owner = f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(3)}"
        self.lease = state_records.lease(s.background_lease_s)
        self.runs: dict[tuple[str, str], Run] = {}
        self._scanner: asyncio.Task[None] | None = None
        self._channel: grpc.aio.Channel | None = None
        self._stub: StateStub | None = None

    def start(self) -> None:
        self._scanner = asyncio.create_task(self._scan_forever())

    def stop_scanning(self) -> None:
        if self._scanner is not None:
            self._scanner.cancel()

    async def close(self) -> None:
        self.stop_scanning()
        if self._channel is not None:
            await self._channel.close()

    @property
    def stub(self) -> StateStub:
        """A channel of its own for WatchResponseEvents, the one streaming call (the state
        client's unary calls and Exchange streams stay as they are)."""
        if self._stub is None:
            self._channel = grpc.aio.insecure_channel(
                self.svc.settings.state_address, options=channel_options()
            )
            self._stub = state_stub(self._channel)
        return self._stub

    async def _scan_forever(self) -> None:
        interval = self.svc.settings.background_scan_interval_s
        while True:
            await asyncio.sleep(interval * _jitter.uniform(0.5, 1.5))
            try:
                await self.scan()
            except grpc.aio.AioRpcError as exc:
                log.warning("background scan failed", extra={"code": exc.code().name})
            except errors.ApiError as exc:
                log.warning("background scan failed", extra={"code": exc.code})
            except Exception:
                log.exception("background scan failed")

    async def scan(self) -> int:
        """Claims queued and expired jobs while this router has room; returns how many."""
        taken = 0
        while len(self.runs) < self.svc.settings.background_max_running:
            job = await self._claim()
            if job is None:
                break
            if running.is_foreground(job):
                # A streamed foreground turn whose router stopped: stored as failed, not run.
                await running.finish_abandoned(self.svc, job)
                taken += 1
                continue
            log.info(
                "taking over a background response",
                extra={"response_id": job.response_id, "attempt": job.lease_token},
            )
            headers: dict[str, str] | None = None
            try:
                t, headers = turn_of(self.svc, job)
            except Exception:
                log.exception("background job has a spec this router cannot read")
                t = await turn_of_stored(self.svc, job)
            self.run(t, job, start="takeover", bootstrap_headers=headers)
            taken += 1
        return taken

    async def _claim(self) -> state_records.BackgroundJob | None:
        """One claim, on the worker's own channel: scans run every few seconds whatever the
        traffic, so they stay out of the request path's traces and metrics."""
        # A claim whose answer was lost is retried with the same id and gets the same job.
        request = state_records.claim_any_background(self.owner, self.lease, secrets.token_hex(12))
        reply = await grpcclient.retrying(
            lambda timeout: self.stub.ClaimBackgroundResponse(
                request, timeout=timeout, metadata=_UNSAMPLED
            ),
            _CLAIM_RETRY,
            timeout_s=self.svc.settings.state_timeout_s,
        )
        return reply.job if reply.HasField("job") else None

    def run(
        self,
        t: turn.Turn,
        job: state_records.BackgroundJob,
        client: Client | None = None,
        *,
        start: str = "new",
        bootstrap_headers: dict[str, str] | None = None,
    ) -> bool:
        """Runs the job; False when this router runs it under that lease already (a retried
        request that found the job it had just enqueued)."""
        key = (t.tenant, t.response_id)
        running = self.runs.get(key)
        if running is not None and running.token == job.lease_token:
            return False
        run = Run(self, t, job.lease_token, job.last_sequence_number, client, start)
        run.bootstrap_headers = bootstrap_headers
        self.runs[key] = run
        task = self.svc.spawn_cancellable(key, run.execute())
        run.task = task

        def forget(_: asyncio.Task[Any]) -> None:
            if self.runs.get(key) is run:
                del self.runs[key]

        task.add_done_callback(forget)
        return True


def worker(svc: Services) -> Worker:
    if svc.worker is None:
        raise RuntimeError("the background worker was not started")
    return cast(Worker, svc.worker)  # start_worker sets it to one


def start_worker(svc: Services) -> Worker:
    """Starts the background worker of a router (from the app's lifespan)."""
    svc.worker = w = Worker(svc)
    w.start()
    return w
