"""The generated row functions give exactly what the per-column converters and canonical forms give:
the same values, the same checksum text, the same reject (field and reason)."""

from __future__ import annotations

from pathlib import Path

from pbmigrate import checksum, fused
from pbmigrate.convert import Reject
from pbmigrate.mapping import load_mapping
from pbmigrate.plan import Table, build_plan
from pbmigrate.sources.sqlite import SqliteSource

HOSTILE = [
    None, "", "x", "\x00", "a\x00b", 0, 1, 2, -1, 1.5, float("inf"), float("nan"), 2**63, -(2**63), True, False,
    "2024-05-06 07:08:09.123Z", "2024-13-45 99:00:00.000Z", "0000-01-01 00:00:00.000Z", "9999-12-31 23:59:59.999Z",
    "2024-05-06T07:08:09.123Z", "2024-06-30T10:00:00+02:00", "2024-06-30", "1", "true", '["a","b"]', "[]",
    '{"k": 1}', "null", b"bytes", b"\xff",
]


def _generic(table: Table):
    convs = table.converters()
    canons = [checksum.PY_CANON[c.canon] for c in table.columns]

    def row_fn(row: tuple) -> tuple[list, str]:
        out = [conv(row[c.position]) for conv, c in zip(convs, table.columns)]
        return out, checksum.row_canon(canons, out)

    return row_fn


def _outcome(fn, row: tuple) -> tuple:
    try:
        out, canon = fn(row)
    except Reject as r:
        return ("reject", r.field, r.reason)
    return ("ok", repr(out), canon)  # repr: NaN compares equal to itself


def test_row_functions_agree_with_the_converters_on_real_and_hostile_rows(fixture_022: Path) -> None:
    source = SqliteSource(fixture_022 / "data.db")
    plan = build_plan(source.catalog(), load_mapping(""), collections=None)
    compared = fast_columns = 0
    for table in plan.tables:
        generic, generated = _generic(table), fused.row_function(table, table.converters())
        fast_columns += fused.source(table).count("\n    if ") + fused.source(table).count("try:")
        rows = list(source.rows(table.collection))
        assert rows, table.name
        for row in rows:
            assert _outcome(generated, row) == _outcome(generic, row), (table.name, row[0])
            for col in table.columns:
                for value in HOSTILE:
                    bad = (*row[:col.position], value, *row[col.position + 1:])
                    assert _outcome(generated, bad) == _outcome(generic, bad), (table.name, col.name, value)
                    compared += 1
    assert compared > 5000 and fast_columns > 10  # the fast paths were really taken
