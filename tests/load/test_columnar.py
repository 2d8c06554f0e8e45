"""The columnar path gives exactly what the per-row converters and canonical forms give, on the
real rows of the 0.22 fixture and on hostile values in every column: the same values, the same
checksum, the same rejects (record, field and reason). Read both ways: from SQLite (ADBC, where
the storage classes are SQLite's own) and from tuples (API pages)."""

from __future__ import annotations

import shutil
import sqlite3
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pbmigrate import checksum
from pbmigrate.load.columnar.batch import TableConverter, reject_all
from pbmigrate.load.columnar.read import sqlite_chunks, tuple_chunks
from pbmigrate.plan.convert import Reject, multi
from pbmigrate.plan.mapping import load_mapping
from pbmigrate.plan.model import Table, build_plan
from pbmigrate.source.sqlite import SqliteSource, qi

HOSTILE = [
    None, "", "x", "\x00", "a\x00b", 0, 1, 2, -1, 1.5, float("inf"), float("nan"), 2**63, -(2**63), True, False,
    "2024-05-06 07:08:09.123Z", "2024-13-45 99:00:00.000Z", "0000-01-01 00:00:00.000Z", "9999-12-31 23:59:59.999Z",
    "2024-05-06T07:08:09.123Z", "2024-06-30T10:00:00+02:00", "2024-06-30", "1", "true", '["a","b"]', "[]",
    '{"k": 1}', "null", b"bytes", b"\xff",
    # beyond the row-function test: values one column check could get wrong
    "2024-02-30 00:00:00.000Z", "2024-01-01 24:00:00.000Z", "2024-01-01 00:00:60.000Z", '[""]', '["a", "b"]',
    '["a\\"b"]', '["é","\x7f"]', '{"lon":1.5,"lat":-2}', '{"lat":0,"lon":0}', '{"lon":1e400,"lat":0}',
    '{"b":1,"a":[1.50,2e3]}', "123", 9007199254740993, 0.1, '"hello"', "1e400",
    # genuine values equal to the read's sentinels ("\x00", -(2**63) and 2 are above): per-row, still exact
    -float(2**60), -(2**60),
]


def _norm(values: list) -> list:
    """Datetimes as their UTC instant (Arrow gives zoneinfo UTC, the converters datetime.UTC)."""
    return [v.astimezone(UTC).isoformat() if isinstance(v, datetime) else v for v in values]


def _generic(table: Table, rows: list[tuple]) -> tuple[Counter, int, Counter]:
    """(converted rows, checksum, rejects) the per-row way."""
    convs = table.converters()
    canons = [checksum.PY_CANON[c.canon] for c in table.columns]
    good, rejects, total = Counter(), Counter(), 0
    for row in rows:
        try:
            out = [conv(row[c.position]) for conv, c in zip(convs, table.columns)]
            lists = [multi(j.field)(row[j.position]) for j in table.junctions]
        except Reject:
            rejects.update((str(row[0]), f, r) for f, r in reject_all(row, table, convs))
            continue
        total += checksum.digest(checksum.row_canon(canons, out))
        for j, ids in zip(table.junctions, lists):
            if ids:
                total += checksum.junction_digest(j.table, out[0], ids)
        good[repr((_norm(out), lists))] += 1
    return good, checksum.fold(total), rejects


VECTOR_ROWS = Counter()  # rows converted without the per-row path, per test


def _columnar(table: Table, chunks) -> tuple[Counter, int, Counter]:
    work = TableConverter(table, True)
    good, rejects, total = Counter(), Counter(), 0
    for chunk in chunks:
        part = work.part(chunk)
        VECTOR_ROWS[table.name] += part.read - part.per_row
        rejects.update(part.rejects)
        if not part.rows:
            continue
        total += work.part_sum(part)
        cols = [a.to_pylist() for a in part.columns]
        jls = [t.to_pylist() for t, _ in part.junctions]
        for i in range(part.rows):
            out = [(v["lon"], v["lat"]) if isinstance(v, dict) else v for v in (c[i] for c in cols)]
            good[repr((_norm(out), [j[i] for j in jls]))] += 1
    return good, checksum.fold(total), rejects


def _variants(table: Table, rows: list[tuple], with_ids: bool) -> list[tuple]:
    out, n = [], 0
    for row in rows:
        for col in table.columns + table.junctions:
            if col.position == 0 and not with_ids:
                continue
            for value in HOSTILE:
                n += 1
                bad = (*row[:col.position], value, *row[col.position + 1:])
                out.append(bad if col.position == 0 else (f"h{n:07d}", *bad[1:]))
    return out


@pytest.fixture
def fixture_plan(fixture_022: Path):
    source = SqliteSource(fixture_022 / "data.db")
    plan = build_plan(source.catalog(), load_mapping(""), collections=None)
    yield source, plan
    source.close()


def test_columnar_agrees_with_the_converters_on_tuples(fixture_plan) -> None:
    source, plan = fixture_plan
    compared = 0
    for table in plan.tables:
        rows = list(source.rows(table.collection))
        assert rows, table.name
        allrows = rows + _variants(table, rows, with_ids=True)
        for chunk_rows in (500, 100_000):  # many small chunks and one large
            expected = _generic(table, allrows)
            got = _columnar(table, tuple_chunks(iter(allrows), table, chunk_rows))
            assert got[2] == expected[2], table.name
            assert got[0] == expected[0], table.name
            assert got[1] == expected[1], table.name
        compared += len(allrows)
    assert compared > 5000
    assert sum(VECTOR_ROWS.values()) > compared // 2  # hostile or not, many rows took the vector path


def test_columnar_agrees_with_the_converters_reading_sqlite(fixture_plan, tmp_path: Path) -> None:
    """Hostile values written into a copy of the fixture: SQLite's affinity decides their class."""
    source, plan = fixture_plan
    db = tmp_path / "data.db"
    shutil.copy(source.path, db)
    conn = sqlite3.connect(db)
    for table in plan.tables:
        rows = list(source.rows(table.collection))
        names = ", ".join(qi(f.name) for f in table.collection.fields)
        marks = ", ".join("?" for _ in table.collection.fields)
        conn.executemany(f"INSERT OR IGNORE INTO {qi(table.collection.name)} ({names}) VALUES ({marks})",
                         [tuple(v if not isinstance(v, int) or abs(v) < 2**63 else str(v) for v in r)
                          for r in _variants(table, rows, with_ids=False)])
    conn.commit()
    conn.close()
    hostile = SqliteSource(db)
    try:
        odd_seen = 0
        for table in plan.tables:
            rows = list(hostile.rows(table.collection))
            expected = _generic(table, rows)
            chunks = list(sqlite_chunks(hostile, table, None, None, chunk_rows=500))
            odd_seen += sum(c.batch.column("odd").to_pylist().count(True) for c in chunks)
            got = _columnar(table, iter(chunks))
            assert got[2] == expected[2], table.name
            assert got[0] == expected[0], table.name
            assert got[1] == expected[1], table.name
        assert odd_seen > 100  # the storage-class check really sent rows to the per-row path
    finally:
        hostile.close()


JSON_VALUES = [
    '{"b":1,"aa":[1.50,2e3,-0.0,1E-7],"a":"x\\u00e9\\n\\"\\u001f","a":"dup"}', '"hello"', "true", "false", "[]",
    "{}", '{"k": [1, 2, {"z": null}], "s": "x"}', "[\r\n  1,\r\n  2\r\n]", "1e400", "null", "",
    '{"ü": 1, "zz": 2, "é": 3}',
    '{"rarity":"rare","power":12,"enchant":{"name":"fire","level":3}}', "-0", "12345678901234567890123", "NaN",
    '{"a": Infinity}', '{"k":"x\\u0000y"}', '{"a":', '"\\ud83d\\ude00"', '{"":1,"a":{"":[]}}', '"tab\\there"', "[1,]",
]


def test_jsonb_text_fast_path_is_exactly_the_converter(pg) -> None:
    from pbmigrate.load.columnar.vector import jsonb_text
    from pbmigrate.plan.convert import json_value
    from pbmigrate.source.catalog import Field

    conv = json_value(Field("j", "json"))
    for raw in JSON_VALUES:
        try:
            expected = ("ok", conv(raw))
        except Reject as r:
            expected = ("reject", r.reason)
        try:
            got = ("ok", jsonb_text(raw, conv))
        except Reject as r:
            got = ("reject", r.reason)
        assert got == expected, raw
        if got[0] == "ok" and got[1] is not None:
            assert pg.execute("SELECT %s::jsonb::text", (raw,)).fetchone()[0] == got[1]


def test_json_column_memo_gives_the_same_text_and_stays_bounded(monkeypatch) -> None:
    """The memo of canonical JSON texts: a second pass (served from it) equals the first, rejects
    are never remembered, and a full memo starts over instead of growing."""
    import pyarrow as pa

    from pbmigrate.load.columnar import vector
    from pbmigrate.source.catalog import Field

    f = Field("j", "json")
    arr = pa.array(JSON_VALUES * 3 + [None], pa.string())
    monkeypatch.setattr(vector, "_json_memo", {})
    first = vector.json(arr, f)
    remembered = dict(vector._json_memo)
    assert remembered
    second = vector.json(arr, f)
    assert second.values.equals(first.values) and (second.bad == first.bad).all()
    assert first.bad.any()  # invalid JSON is rejected both times: not served from the memo
    assert all(not first.bad[i] for i, raw in enumerate(arr.to_pylist()) if raw in remembered)
    monkeypatch.setattr(vector, "JSON_MEMO_MAX", 4)
    monkeypatch.setattr(vector, "_json_memo", {})
    vector.json(arr, f)
    assert len(vector._json_memo) <= 4


def test_binary_copy_packs_fixed_width_runs_exactly(pg) -> None:
    """Runs of fixed-width columns packed in one record, NULLs and variable-width columns between
    them: PostgreSQL reads back exactly the values (a wrong length or byte order fails the COPY or
    the comparison)."""
    import pyarrow as pa

    from pbmigrate.load.columnar import pgbinary

    ts = pa.timestamp("us", tz="UTC")
    cols = [
        pa.array(["a", "béé", ""]), pa.array([1, -2**63, 2**63 - 1], pa.int64()), pa.array([1.5, -0.0, 1e300]),
        pa.array([True, False, True]), pa.array([0, 1_700_000_000_000_000, -1], pa.int64()).cast(ts),
        pa.array([None, 5, 6], pa.int64()), pa.array([7, 8, 9], pa.int32()),
        pa.StructArray.from_arrays([pa.array([1.0, 2.0, 3.0]), pa.array([-1.0, 0.0, 9.5])], ["lon", "lat"]),
        pa.array([["x", "y"], [], ["z"]], pa.list_(pa.string())),
        pa.array([0, None, 3], pa.int64()).cast(ts), pa.array([False, True, False]),
    ]
    types = ["text", "bigint", "double precision", "boolean", "timestamptz", "bigint", "integer", "point", "text[]",
             "timestamptz", "boolean"]
    pg.execute("DROP TABLE IF EXISTS pbm_test_packed")
    pg.execute("CREATE TABLE pbm_test_packed (" + ", ".join(f"c{i} {t}" for i, t in enumerate(types)) + ")")
    try:
        with pg.cursor() as cur, cur.copy("COPY pbm_test_packed FROM STDIN (FORMAT BINARY)") as copy:
            copy.write(pgbinary.HEADER)
            copy.write(pgbinary.rows(cols, types))
            copy.write(pgbinary.TRAILER)
        names = ", ".join(f"c{i}[0], c{i}[1]" if t == "point" else f"c{i}" for i, t in enumerate(types))
        got = pg.execute(f"SELECT {names} FROM pbm_test_packed").fetchall()
        want = [tuple(x for c in cols for x in ((c[i]["lon"].as_py(), c[i]["lat"].as_py())
                                                if isinstance(c, pa.StructArray) else (c[i].as_py(),)))
                for i in range(3)]
        assert got == want
    finally:
        pg.execute("DROP TABLE pbm_test_packed")
