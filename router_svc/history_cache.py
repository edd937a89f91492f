"""The histories of the chains this router stored turns on, so that a turn chained on one of
them (``previous_response_id``) needs no GetHistory call.

A stored turn never changes (a running background turn is never remembered; its final turn is),
so a remembered history can only go stale in one way: a response of its chain is deleted or
expires. Deletes through this router forget the tenant's remembered histories at once; for
everything else (a delete through another replica, an expiry) the turn built on a remembered
history is stored with ``require_intact_chain``, and the state service refuses it when its chain
broke meanwhile. So nothing stale is ever answered as a success: at worst the hub is called for a
turn that is then refused, as GetHistory would have refused it before the hub call.

Only what a GetHistory call would have returned whole is remembered: chains whose history was
never cut (by the state service's cap), outside conversations (whose history other replicas
extend), with ``store`` true. The memory is bounded by the bytes of JSON remembered, counting
each entry's whole chain (so shared ancestors count once per entry: a safe upper bound), with
the least recently used entries forgotten first.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

from prometheus_client import Counter, Gauge

CACHE_LOOKUPS = Counter(
    "respgw_router_history_cache_lookups_total",
    "Chained turns looked up in the history cache, by result (hit or miss).",
    ["result"],
)
CACHE_BYTES = Gauge(
    "respgw_router_history_cache_bytes", "JSON bytes the history cache holds (an upper bound)."
)


@dataclass(frozen=True, slots=True)
class Chain:
    """The history up to and including one stored response, oldest first: every turn's input
    items then its output items, as the JSON the state service stored (bytes, so that the
    garbage collector never walks a full cache; a hit parses them, as a GetHistory reply is)."""

    items: tuple[bytes, ...]
    nbytes: int
    # When the first response of the chain to expire does (epoch microseconds); None: never.
    expire_us: int | None
    epoch: int
    # The id of the chain's first response (the hub session key of every turn of the chain).
    root: str = ""


class HistoryCache:
    """A bounded LRU map of (tenant, response id) to the :class:`Chain` ending there."""

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._entries: OrderedDict[tuple[str, str], Chain] = OrderedDict()
        self._bytes = 0
        # Bumped by a delete: entries of an older epoch are forgotten when next looked at.
        self._epochs: dict[str, int] = {}
        # The state service's cap on history items (PutTurnResponse.history_max_items).
        self.max_items = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, tenant: str, response_id: str) -> Chain | None:
        key = (tenant, response_id)
        chain = self._entries.get(key)
        if chain is not None and (
            chain.epoch != self._epochs.get(tenant, 0)
            or (chain.expire_us is not None and chain.expire_us <= time.time_ns() // 1000)
        ):
            self._forget(key)
            chain = None
        if chain is None:
            CACHE_LOOKUPS.labels("miss").inc()
            return None
        self._entries.move_to_end(key)
        CACHE_LOOKUPS.labels("hit").inc()
        return chain

    def remember(
        self,
        tenant: str,
        response_id: str,
        parent: Chain | None,
        items: tuple[bytes, ...],
        expire_us: int | None,
        root: str = "",
    ) -> None:
        """Remembers the chain ending at ``response_id``: ``parent``'s (None for a first turn)
        followed by the turn's own ``items`` (JSON)."""
        nbytes = sum(len(item) for item in items)
        history = items
        if parent is not None:
            nbytes += parent.nbytes
            history = parent.items + items
            if parent.expire_us is not None:
                expire_us = (
                    parent.expire_us if expire_us is None else min(expire_us, parent.expire_us)
                )
        if nbytes > self._max_bytes // 4:
            return  # one huge chain would evict everything else
        key = (tenant, response_id)
        if key in self._entries:
            self._forget(key)
        root = parent.root if parent is not None else root
        self._entries[key] = Chain(history, nbytes, expire_us, self._epochs.get(tenant, 0), root)
        self._bytes += nbytes
        while self._bytes > self._max_bytes and self._entries:
            self._forget(next(iter(self._entries)))
        CACHE_BYTES.set(self._bytes)

    def forget_tenant(self, tenant: str) -> None:
        """Forgets every remembered history of ``tenant`` (after a delete through this router)."""
        self._epochs[tenant] = self._epochs.get(tenant, 0) + 1

    def _forget(self, key: tuple[str, str]) -> None:
        chain = self._entries.pop(key)
        self._bytes -= chain.nbytes
        CACHE_BYTES.set(self._bytes)
