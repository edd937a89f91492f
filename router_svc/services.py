"""What a request handler needs, built once per process by the app's lifespan."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from router_svc.auth import Authenticator
from router_svc.bootstrap import Bootstrapper
from router_svc.config import RouterSettings
from router_svc.dialects import Dialect, dialect_for
from router_svc.execution import GrpcExecutor
from router_svc.history_cache import HistoryCache
from router_svc.hub import HubClient
from router_svc.sealing import Sealer
from router_svc.state_client import StateClient

if TYPE_CHECKING:
    from router_svc.state_client import StateStub


class Worker(Protocol):
    """What the services use of the background worker
    (:class:`router_svc.background_worker.Worker`), named here so that this module imports
    nothing above it."""

    # This router's name in the leases it holds.
    owner: str

    # Its own stub, for WatchResponseEvents (router_svc.background_log).
    @property
    def stub(self) -> StateStub: ...

    def stop_scanning(self) -> None: ...

    async def close(self) -> None: ...


@dataclass
class Services:
    settings: RouterSettings
    state: StateClient
    hub: HubClient
    bootstrapper: Bootstrapper
    auth: Authenticator
    # The ExecutionService beside the bootstrap service (None without one): the tool loop and the
    # Containers API use it.
    executor: GrpcExecutor | None = None
    # Histories of the chains this router stored turns on (None: every chained turn reads its
    # history with GetHistory).
    history_cache: HistoryCache | None = None
    # Turns that outlive their HTTP request (a streamed turn whose client went away is still read
    # to the end and stored); shutdown waits for them.
    background: set[asyncio.Task[Any]] = field(default_factory=set)
    # Background responses running in this process, by (tenant, response id), so that a cancel
    # that reaches this replica stops the hub call at once.
    running: dict[tuple[str, str], asyncio.Task[Any]] = field(default_factory=dict)
    # Runs background responses and takes over those of other routers (router_svc.background),
    # started by the app's lifespan.
    worker: Worker | None = None
    # Seals the encrypted_content the gateway mints (router_svc.sealing); None only for services
    # built without one (a random key is then made the first time one is needed).
    sealer: Sealer | None = None
    # The API the hub speaks (router_svc.dialects), chosen once from --hub-api.
    dialect: Dialect = field(init=False)

    def __post_init__(self) -> None:
        self.dialect = dialect_for(self.settings.hub_api)

    def seal_keys(self) -> Sealer:
        if self.sealer is None:
            self.sealer = Sealer.from_setting(self.settings.seal_keys)
        return self.sealer

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task

    def spawn_cancellable(
        self, key: tuple[str, str], coro: Coroutine[Any, Any, Any]
    ) -> asyncio.Task[Any]:
        """Spawns a background response's task, findable by (tenant, response id) while it runs."""
        task = self.spawn(coro)
        self.running[key] = task
        task.add_done_callback(lambda _: self.running.pop(key, None))
        return task

    # Until when (time.monotonic()) the hub is known to have no tokenizer endpoint: token counts
    # are estimated without asking it (router_svc.tokens).
    tokenizer_absent_until: float = 0.0

    # Set once the drain time is over: a background turn cancelled then stores itself as failed.
    shutting_down: bool = False

    async def drain(self, timeout_s: float) -> None:
        """Waits up to ``timeout_s`` for the turns still running, then cancels the rest (a
        background response among them is stored as failed, not left in progress)."""
        if self.worker is not None:
            self.worker.stop_scanning()  # take over nothing more
        try:
            await self._drain(timeout_s)
        finally:
            if self.worker is not None:
                await self.worker.close()

    async def _drain(self, timeout_s: float) -> None:
        if self.background:
            await asyncio.wait(set(self.background), timeout=timeout_s)
        left = set(self.background)
        if left:
            self.shutting_down = True
            for task in left:
                task.cancel()
            await asyncio.wait(left, timeout=5.0)
