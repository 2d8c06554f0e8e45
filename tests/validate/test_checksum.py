"""The loader's checksum (Python, over converted values) equals PostgreSQL's (SQL, over the stored
rows) for values chosen to break naive canonical forms."""

from __future__ import annotations

from datetime import UTC, datetime

from pbmigrate import checksum
from pbmigrate.load import pgcopy
from pbmigrate.plan.convert import converter_for
from pbmigrate.source.catalog import Field

TYPES = ["text", "bigint", "double precision", "boolean", "timestamptz", "text[]", "jsonb", "point"]
JSON = ['{"b":1,"aa":[1.50,2e3,-0.0,1E-7],"a":"x\\u00e9\\n\\"\\u001f","a":"dup"}', 123, '"hello"', "true", "[]",
        None, '{"k": [1, 2, {"z": null}], "s": "x"}', "[\r\n  1,\r\n  2\r\n]", "1e400", 1.5, "null",
        '{"ü": 1, "zz": 2, "é": 3}']
FLOATS = [0.1, 123456.0, 1e15, 1e-5, -0.0, 3.14, 9007199254740992.0, 1e308, 5e-324, 2.5, 0.0, 42.0]


def _rows() -> list[list]:
    jconv = converter_for(Field("j", "json"))
    geo = converter_for(Field("g", "geoPoint"))
    rows = []
    for i, j in enumerate(JSON):
        rows.append([f"t\x01é\t\n{i}", -(2**63) + i, FLOATS[i], i % 2 == 0,
                     datetime(2024, 1, 2, 3, 4, 5, 123000 + i, tzinfo=UTC) if i != 5 else None,
                     ["a", 'b"c', "ü", "x\ny"][: i % 4], jconv(j), geo('{"lon": 23.32, "lat": -42.69}')])
    return rows


def test_python_and_postgresql_checksums_agree_through_binary_copy(pg):
    pg.execute("CREATE TEMP TABLE t (a text, b bigint, c double precision, d boolean, e timestamptz, "
               "f text[], g jsonb, h point)")
    pgcopy.register(pg)
    rows = _rows()
    with pg.cursor() as cur, cur.copy("COPY t FROM STDIN (FORMAT BINARY)") as cp:
        cp.set_types(TYPES)
        for r in rows:
            cp.write_row(r)
    canons = [checksum.PY_CANON[t] for t in TYPES]
    python = sum(checksum.digest(checksum.row_canon(canons, r)) for r in rows)
    sql = checksum.sql_row_digest(list(zip("abcdefgh", TYPES)))
    (stored,) = pg.execute(f"SELECT sum({sql})::text FROM t").fetchone()
    assert checksum.fold(python) == checksum.fold(int(stored))


def test_one_changed_value_changes_the_checksum(pg):
    pg.execute("CREATE TEMP TABLE u (a text, c double precision)")
    pg.execute("INSERT INTO u VALUES ('x', 1.0), ('y', 2.0)")
    sql = checksum.sql_row_digest([("a", "text"), ("c", "double precision")])
    before = pg.execute(f"SELECT sum({sql})::text FROM u").fetchone()[0]
    pg.execute("UPDATE u SET c = 2.0000000000000004 WHERE a = 'y'")
    assert pg.execute(f"SELECT sum({sql})::text FROM u").fetchone()[0] != before


def test_jsonb_text_matches_postgresql_output(pg):
    for raw in ['{"b":1,"aa":[1.50,2e3,-0.0]}', '{"ü": 1, "zz": 2, "é": 3}', '"\\u001fx"', "1e2", "[]"]:
        (expected,) = pg.execute("SELECT %s::jsonb::text", (raw,)).fetchone()
        assert checksum.jsonb_text(raw) == expected


def test_checksum_does_not_depend_on_row_order():
    canons = [checksum.PY_CANON["text"], checksum.PY_CANON["bigint"]]
    rows = [["a", 1], ["b", 2], ["c", 3]]
    forward = sum(checksum.digest(checksum.row_canon(canons, r)) for r in rows)
    backward = sum(checksum.digest(checksum.row_canon(canons, r)) for r in reversed(rows))
    assert checksum.fold(forward) == checksum.fold(backward)


def test_timestamptz_canonical_form_is_its_binary_form_on_either_side_of_both_epochs(pg):
    values = [datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), datetime(1970, 1, 1, tzinfo=UTC),
              datetime(1999, 12, 31, 23, 59, 59, 1, tzinfo=UTC), datetime(2000, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
              datetime(1, 1, 1, tzinfo=UTC), datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), None]
    sql = checksum.SQL_CANON["timestamptz"].format(c="v")
    for v in values:
        (stored,) = pg.execute(f"SELECT {sql} FROM (SELECT %s::timestamptz AS v) t", (v,)).fetchone()
        assert stored == checksum.PY_CANON["timestamptz"](v)
