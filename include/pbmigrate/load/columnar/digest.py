"""The batch checksum, column by column in DuckDB over the converted Arrow columns.

Exactly `checksum`'s canonical form (the one validation recomputes inside PostgreSQL): each
column reduced to its canonical text, a row's columns joined with \\x1f, the first 64 bits of md5,
summed modulo 2**64. DuckDB formats and hashes; numpy gives the IEEE-754 bits of floats.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pbmigrate import checksum
from pbmigrate.load.columnar.vector import duck

_MD5_64 = "('0x' || left(md5({s}), 16))::UBIGINT"
_SQL = {  # canonical key -> expression over the prepared column k
    "text": "coalesce({k}, '\\N')",
    "jsonb": "coalesce({k}, '\\N')",
    "bigint": "CAST({k} AS VARCHAR)",
    "double precision": "printf('%016x', {k})",
    "boolean": "CASE WHEN {k} THEN 't' ELSE 'f' END",
    "timestamptz": "coalesce(CAST({k} AS VARCHAR), '\\N')",
    "text[]": "{k}",
    "point": "printf('%016x%016x', {k}.lon, {k}.lat)",
    "python": "{k}",
}


def _bits(values: pa.Array) -> pa.Array:
    return pa.array(values.fill_null(0.0).to_numpy(zero_copy_only=False).astype(np.float64).view(np.uint64))


def prepare(values: pa.Array, key: str, natural: str, canon: pa.Array | None) -> tuple[pa.Array, str]:
    """(a column DuckDB can format, the form's name) for a column whose canonical form is `key`."""
    if key == "text[]" and canon is not None:
        return canon, "text[]"
    if key != natural or key not in _SQL:  # uuid, inet, other, or an override hashed apart
        fn = checksum.PY_CANON[key]
        return pa.array([fn(v) for v in values.to_pylist()], pa.string()), "python"
    if key == "double precision":
        return _bits(values), key
    if key == "timestamptz":
        return values.cast(pa.int64()), key
    if key == "point":
        return pa.StructArray.from_arrays([_bits(values.field("lon")), _bits(values.field("lat"))],
                                          names=["lon", "lat"]), key
    if key == "text[]":
        return pa.array([checksum.PY_CANON[key](v) for v in values.to_pylist()], pa.string()), "python"
    return values, key


def _run(sql: str, table: pa.Table, params: list | None = None) -> int:
    con = duck()
    con.register("pbm_sum", table)
    try:
        ((total,),) = con.execute(sql, params or []).fetchall()
    finally:
        con.unregister("pbm_sum")
    return int(total or 0)


def rows_sum(columns: list[tuple[pa.Array, str]]) -> int:
    """Sum of row digests; columns are (prepared column, form name) from `prepare`."""
    if not columns or len(columns[0][0]) == 0:
        return 0
    table = pa.table({f"k{i}": a for i, (a, _) in enumerate(columns)})
    parts = ", ".join(_SQL[form].format(k=f"k{i}") for i, (_, form) in enumerate(columns))
    return _run(f"SELECT sum({_MD5_64.format(s=f'concat_ws(chr(31), {parts})')})::VARCHAR FROM pbm_sum", table)


def _rows(sql: str, table: pa.Table, params: list | None = None) -> np.ndarray:
    con = duck()
    con.register("pbm_sum", table)
    try:
        values = con.sql(sql, params=params or None).to_arrow_table().column(0)
    finally:
        con.unregister("pbm_sum")
    return values.to_numpy().astype(np.uint64, copy=False)  # through Arrow: fetchnumpy imports pandas


def row_digests(columns: list[tuple[pa.Array, str]]) -> np.ndarray:
    """Each row's digest (uint64, in row order): what `rows_sum` adds up, for the re-sync's
    row-by-row comparison with the target."""
    if not columns or len(columns[0][0]) == 0:
        return np.zeros(0, dtype=np.uint64)
    table = pa.table({f"k{i}": a for i, (a, _) in enumerate(columns)})
    parts = ", ".join(_SQL[form].format(k=f"k{i}") for i, (_, form) in enumerate(columns))
    return _rows(f"SELECT {_MD5_64.format(s=f'concat_ws(chr(31), {parts})')} FROM pbm_sum", table)


def junction_digests(name: str, owners: pa.Array, canon: pa.Array, counts: pa.Array) -> np.ndarray:
    """Each owner's `checksum.junction_digest` (0 for an owner without targets), in row order."""
    if len(owners) == 0:
        return np.zeros(0, dtype=np.uint64)
    table = pa.table({"o": owners, "c": canon, "n": counts})
    md5 = _MD5_64.format(s="(? || o || chr(31) || c)")
    return _rows(f"SELECT CASE WHEN n > 0 THEN {md5} ELSE 0::UBIGINT END FROM pbm_sum", table,
                 [name + checksum.SEP])


def junction_sum(name: str, owners: pa.Array, canon: pa.Array, counts: pa.Array) -> int:
    """Sum of `checksum.junction_digest` over owners with at least one target."""
    if len(owners) == 0:
        return 0
    table = pa.table({"o": owners, "c": canon, "n": counts})
    md5 = _MD5_64.format(s="(? || o || chr(31) || c)")
    return _run(f"SELECT sum({md5})::VARCHAR FROM pbm_sum WHERE n > 0", table, [name + checksum.SEP])
