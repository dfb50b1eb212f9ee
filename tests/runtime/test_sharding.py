"""Layers split across the processes of a Fabric run (the two-process run itself: tests/test_llm.py)."""

from __future__ import annotations

from fusion_bench_tsv.runtime.sharding import split_by_size



def test_split_by_size_balances_and_is_deterministic():
    sizes = {"a": 10, "b": 9, "c": 5, "d": 4, "e": 1}
    shares = split_by_size(sizes, 2)
    assert shares == split_by_size(dict(sizes), 2)
    assert sorted(k for s in shares for k in s) == sorted(sizes)
    loads = [sum(sizes[k] for k in s) for s in shares]
    assert max(loads) - min(loads) <= 1
    assert split_by_size(sizes, 1) == [list(sizes)]
