"""Batch ranges by keyset on a real PocketBase SQLite file: the same inclusive ranges as streaming
every id, covering each row exactly once, whatever the ids look like."""

from __future__ import annotations

import sqlite3
from itertools import pairwise
from pathlib import Path

import pytest

from pbmigrate.source import plan_ranges, split_ids
from pbmigrate.source.sqlite import SqliteSource, id_range_where, qi

# Ids a PocketBase import can hold besides its 15 [a-z0-9]: mixed case and lengths, punctuation,
# non-ASCII (byte order, as PostgreSQL's COLLATE "C"), prefixes of one another.
ODD_IDS = ["A", "Z", "a", "aa", "aaa", "a-b", "a_b", "a.b", "0", "00", "09", "9", "~tilde", " space",
           "ümlaut", "日本", "x" * 40, "xy", "AbC", "abc", "ab", "b", "é", "e", "E", "zzz", "z"]


@pytest.fixture
def odd(fixture_022: Path) -> Path:
    with sqlite3.connect(fixture_022 / "data.db") as raw:
        raw.executemany("INSERT INTO demo1 (id) VALUES (?)", [(i,) for i in ODD_IDS])
    return fixture_022


@pytest.mark.parametrize("batch_size", [1, 2, 3, 7, 29, 30, 31, 1000])
def test_keyset_ranges_equal_the_streamed_split_and_cover_every_row_once(odd, batch_size):
    src = SqliteSource(odd)
    try:
        coll = src.catalog().get("demo1")
        planned = plan_ranges(src, coll, batch_size)  # SqliteSource's keyset
        assert planned == split_ids(src.ids(coll), batch_size)  # every id streamed once, as other sources do
        total = src.count(coll)
        assert total == 3 + len(ODD_IDS) and sum(r.rows for r in planned) == total
        seen: list[str] = []
        for r in planned:
            where, args = id_range_where(r.lo, r.hi)
            ids = [row[0] for row in src.query(f"SELECT id FROM {qi(coll.name)}{where} ORDER BY id", args)]
            assert len(ids) == r.rows and ids[0] == r.lo and ids[-1] == r.hi
            seen += ids
        assert sorted(seen) == sorted({row[0] for row in src.query("SELECT id FROM demo1")})
        assert len(seen) == len(set(seen))  # no row in two ranges
        assert all(a.hi < b.lo for a, b in pairwise(planned))
    finally:
        src.close()


def test_an_empty_collection_has_no_ranges(fixture_022):
    with sqlite3.connect(fixture_022 / "data.db") as raw:
        raw.execute("DELETE FROM demo1")
    src = SqliteSource(fixture_022)
    try:
        assert plan_ranges(src, src.catalog().get("demo1"), 5) == []
    finally:
        src.close()
