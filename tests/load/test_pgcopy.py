"""The loader's own binary COPY dumpers, round-tripped through a real PostgreSQL."""

from __future__ import annotations

import psycopg
from psycopg.pq import Format

from pbmigrate.load import pgcopy

HOSTILE_LISTS = [
    [],
    [""],
    ["a"],
    ["NULL", "null", "", "{}", "{a,b}", 'quo"te', "back\\slash", "com,ma", " spaced "],
    ["ünïcødé", "日本語", "emoji 🎲", "tab\tnew\nline", "x" * 5000],
]


def test_text_arrays_and_jsonb_survive_binary_copy(pg: psycopg.Connection) -> None:
    pg.execute("CREATE TEMP TABLE t (n int, a text[], j jsonb, p point)")
    pgcopy.register(pg)
    text_array = psycopg.adapters.types.get("text").array_oid
    assert issubclass(pg.adapters.get_dumper_by_oid(text_array, Format.BINARY), pgcopy.TextArrayBinaryDumper)
    rows = [(i, items, '{"k": [1, "é"]}', (1.5, -2.25)) for i, items in enumerate(HOSTILE_LISTS)]
    with pg.cursor() as cur, cur.copy("COPY t (n, a, j, p) FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types(["int4", "text[]", "jsonb", "point"])
        for row in rows:
            copy.write_row(row)
    got = pg.execute("SELECT a, j, p[0], p[1], cardinality(a), array_ndims(a) FROM t ORDER BY n").fetchall()
    assert [r[0] for r in got] == HOSTILE_LISTS
    assert all(r[1] == {"k": [1, "é"]} and (r[2], r[3]) == (1.5, -2.25) for r in got)
    assert [r[4] for r in got] == [len(items) for items in HOSTILE_LISTS]
    assert got[0][5] is None and all(r[5] == 1 for r in got[1:])  # '{}' has no dimensions, like PocketBase's []
