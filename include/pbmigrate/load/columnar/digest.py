"""The batch checksum, column by column over the converted Arrow columns.

Exactly `checksum`'s canonical form (the one validation recomputes inside PostgreSQL): each
column reduced to its canonical text, a row's columns joined with \\x1f, the first 64 bits of md5,
summed modulo 2**64. Arrow's kernels build the text (numpy gives the IEEE-754 bits of floats, as
hex); DuckDB only hashes and sums it.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pbmigrate import checksum
from pbmigrate.load.columnar.pgbinary import PG_EPOCH_US
from pbmigrate.load.columnar.vector import duck

NULL = pa.scalar(checksum.NULL, pa.string())
FORMS = frozenset({"text", "jsonb", "bigint", "double precision", "boolean", "timestamptz", "text[]", "point",
                   "python"})


def _bits(values: pa.Array) -> np.ndarray:
    return values.fill_null(0.0).to_numpy(zero_copy_only=False).astype(np.float64).view(np.uint64)


def _hex16(bits: np.ndarray) -> pa.Array:
    """`%016x` of each uint64: the hex of its big-endian bytes, 16 characters a value."""
    text = bits.astype(">u8").tobytes().hex().encode("ascii")
    fixed = pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), len(bits), [None, pa.py_buffer(text)])
    return fixed.cast(pa.binary()).cast(pa.string())


def prepare(values: pa.Array, key: str, natural: str, canon: pa.Array | None) -> tuple[pa.Array, str]:
    """(a column Arrow can format, the form's name) for a column whose canonical form is `key`."""
    if key == "text[]" and canon is not None:
        return canon, "text[]"
    if key != natural or key not in FORMS:  # uuid, inet, other, or an override hashed apart
        fn = checksum.PY_CANON[key]
        return pa.array([fn(v) for v in values.to_pylist()], pa.string()), "python"
    if key == "double precision":
        return pa.array(_bits(values)), key
    if key == "timestamptz":  # microseconds since 2000-01-01, as timestamptz_send gives them
        return pc.subtract(values.cast(pa.int64()), PG_EPOCH_US), key
    if key == "point":
        return pa.StructArray.from_arrays([pa.array(_bits(values.field("lon"))), pa.array(_bits(values.field("lat")))],
                                          names=["lon", "lat"]), key
    if key == "text[]":
        return pa.array([checksum.PY_CANON[key](v) for v in values.to_pylist()], pa.string()), "python"
    return values, key


def canonical(k: pa.Array, form: str) -> pa.Array:
    """A prepared column as its canonical text (`checksum.PY_CANON` / `SQL_CANON`), NULL-free
    where those print \\N; a NULL left (text[] and python forms never give one) is skipped
    when the row is joined, as concat_ws does on both sides."""
    if isinstance(k, pa.ChunkedArray):
        k = k.combine_chunks()
    if form in ("text", "jsonb"):
        return k.fill_null(NULL)
    if form == "bigint":
        return k.cast(pa.string()).fill_null(NULL)
    if form == "timestamptz":  # the hex of the big-endian int64
        text = _hex16(k.fill_null(0).to_numpy(zero_copy_only=False).view(np.uint64))
        return pc.if_else(k.is_null(), NULL, text) if k.null_count else text
    if form == "double precision":
        return _hex16(k.to_numpy(zero_copy_only=False))
    if form == "boolean":
        return pc.if_else(k.fill_null(False), "t", "f")
    if form == "point":
        return pc.binary_join_element_wise(_hex16(k.field("lon").to_numpy(zero_copy_only=False)),
                                           _hex16(k.field("lat").to_numpy(zero_copy_only=False)), "")
    return k  # text[], python: already canonical text


def _row_text(columns: list[tuple[pa.Array, str]]) -> pa.Array:
    texts = [canonical(a, form) for a, form in columns]
    if len(texts) == 1:
        return texts[0].fill_null("")
    return pc.binary_join_element_wise(*texts, checksum.SEP, null_handling="skip")


_MD5_64 = "('0x' || left(md5(s), 16))::UBIGINT"  # 2.5x faster here than DuckDB's md5_number_upper


def _duck(sql: str, text: pa.Array) -> pa.ChunkedArray:
    con = duck()
    con.register("pbm_sum", pa.table({"s": text}))
    try:
        return con.sql(sql).to_arrow_table().column(0)
    finally:
        con.unregister("pbm_sum")


def md5_64(text: pa.Array) -> np.ndarray:
    """The first 64 bits of each text's md5 as a uint64 (`checksum.digest`, unsigned)."""
    # through Arrow: fetchnumpy imports pandas
    return _duck(f"SELECT {_MD5_64} FROM pbm_sum", text).to_numpy().astype(np.uint64, copy=False)


def md5_sum(text: pa.Array) -> int:
    """The sum of `md5_64` over the texts (not yet folded modulo 2**64)."""
    return int(_duck(f"SELECT sum({_MD5_64})::VARCHAR FROM pbm_sum", text)[0].as_py() or 0)


def rows_sum(columns: list[tuple[pa.Array, str]]) -> int:
    """Sum of row digests; columns are (prepared column, form name) from `prepare`."""
    if not columns or len(columns[0][0]) == 0:
        return 0
    return md5_sum(_row_text(columns))


def row_digests(columns: list[tuple[pa.Array, str]]) -> np.ndarray:
    """Each row's digest (uint64, in row order): what `rows_sum` adds up, for the re-sync's
    row-by-row comparison with the target."""
    if not columns or len(columns[0][0]) == 0:
        return np.zeros(0, dtype=np.uint64)
    return md5_64(_row_text(columns))


def _junction_text(name: str, owners: pa.Array, canon: pa.Array) -> pa.Array:
    return pc.binary_join_element_wise(pa.scalar(name, pa.string()), owners, canon, checksum.SEP)


def junction_digests(name: str, owners: pa.Array, canon: pa.Array, counts: pa.Array) -> np.ndarray:
    """Each owner's `checksum.junction_digest` (0 for an owner without targets), in row order."""
    if len(owners) == 0:
        return np.zeros(0, dtype=np.uint64)
    digests = md5_64(_junction_text(name, owners, canon))
    return np.where(counts.to_numpy(zero_copy_only=False) > 0, digests, np.uint64(0))


def junction_sum(name: str, owners: pa.Array, canon: pa.Array, counts: pa.Array) -> int:
    """Sum of `checksum.junction_digest` over owners with at least one target."""
    if len(owners) == 0:
        return 0
    some = pc.greater(counts, 0)
    owners, canon = owners.filter(some), canon.filter(some)
    return md5_sum(_junction_text(name, owners, canon)) if len(owners) else 0
