"""The router's history cache: bounded, least recently used first, forgotten by deletes and
expiry."""

from __future__ import annotations

import time

import orjson

from router_svc.history_cache import HistoryCache


def items(*names: str, size: int = 0) -> tuple[bytes, ...]:
    """Items as stored (JSON), each ``size`` bytes long when given."""
    out = []
    for n in names:
        raw = orjson.dumps({"id": n, "type": "message"})
        out.append(raw + b" " * max(0, size - len(raw)))
    return tuple(out)


def test_a_chain_extends_its_parent() -> None:
    cache = HistoryCache(1 << 20)
    cache.remember("t", "r1", None, items("a", "b", size=40), None)
    parent = cache.get("t", "r1")
    assert parent is not None
    cache.remember("t", "r2", parent, items("c", "d", size=40), None)
    chain = cache.get("t", "r2")
    assert chain is not None
    assert [orjson.loads(i)["id"] for i in chain.items] == ["a", "b", "c", "d"]
    assert chain.nbytes == sum(len(i) for i in chain.items) == 4 * 40
    assert cache.get("other-tenant", "r2") is None


def test_the_least_recently_used_go_first_past_the_bound() -> None:
    cache = HistoryCache(1000)
    for n in range(5):
        cache.remember("t", f"r{n}", None, items(f"i{n}", size=200), None)
    assert cache.get("t", "r0") is not None  # used: now the newest
    cache.remember("t", "r5", None, items("i5", size=200), None)
    assert cache.get("t", "r1") is None
    assert {n for n in range(6) if cache.get("t", f"r{n}")} == {0, 2, 3, 4, 5}


def test_a_chain_larger_than_a_quarter_of_the_cache_is_not_kept() -> None:
    cache = HistoryCache(1000)
    cache.remember("t", "small", None, items("a", size=100), None)
    cache.remember("t", "huge", None, items("b", size=400), None)
    assert cache.get("t", "huge") is None and cache.get("t", "small") is not None


def test_a_delete_forgets_the_tenants_chains() -> None:
    cache = HistoryCache(1 << 20)
    cache.remember("t", "r1", None, items("a", size=10), None)
    cache.remember("u", "r1", None, items("a", size=10), None)
    cache.forget_tenant("t")
    assert cache.get("t", "r1") is None
    assert cache.get("u", "r1") is not None
    cache.remember("t", "r2", None, items("b", size=10), None)  # remembered after the delete
    assert cache.get("t", "r2") is not None


def test_a_chain_expires_with_its_first_expiring_response() -> None:
    cache = HistoryCache(1 << 20)
    now = time.time_ns() // 1000
    cache.remember("t", "r1", None, items("a", size=10), now + 60_000_000)
    parent = cache.get("t", "r1")
    cache.remember("t", "r2", parent, items("b", size=10), now + 120_000_000)
    chain = cache.get("t", "r2")
    assert chain is not None and chain.expire_us == now + 60_000_000
    cache.remember("t", "gone", None, items("c", size=10), now - 1)
    assert cache.get("t", "gone") is None
