"""Ids: unique across the blocks of random bytes they are cut from, and in a forked child."""

from __future__ import annotations

import os
import re

import pytest

from router_svc import ids
from router_svc.ids import new_id


def test_ids_stay_unique_across_many_blocks() -> None:
    ids = [new_id("resp") for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"resp_[0-9a-f]{48}", i) for i in ids)


def test_a_forked_child_does_not_repeat_its_parents_ids() -> None:
    new_id("msg")  # the parent holds a block now
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: write one id and leave at once
        os.write(write, new_id("msg").encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 100).decode()
    os.close(read)
    os.waitpid(pid, 0)
    parent = new_id("msg")
    assert child != parent and len(child) == len(parent)


def test_random_hex_comes_from_the_blocks_not_a_system_call_each(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reads: list[int] = []
    real = os.urandom

    def counted(n: int) -> bytes:
        reads.append(n)
        return real(n)

    monkeypatch.setattr(os, "urandom", counted)
    ids._reset()
    made = [ids.random_hex(16) for _ in range(1000)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", h) for h in made)
    assert len(set(made)) == len(made)
    assert len(reads) == -(-1000 * 16 // ids._BLOCK)  # one read per block used
