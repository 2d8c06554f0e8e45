"""PostgreSQL's binary COPY format, assembled by Arrow kernels instead of a per-row dumper.

Every field is encoded column by column as one Arrow binary array (a big-endian length, then the
value's bytes); `binary_join_element_wise` concatenates a row's fields, and the joined array's data
buffer is the COPY stream. Fixed-width values (bigint, float8, bool, timestamptz, point) are
packed with numpy record dtypes, a run of adjacent ones (without NULLs) and the row's field count
in one record; text[] items are length-prefixed and joined per list.
"""

from __future__ import annotations

import struct

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
TRAILER = struct.pack(">h", -1)
_NULL = struct.pack(">i", -1)
_TEXT_OID = 25
PG_EPOCH_US = 946_684_800_000_000  # 2000-01-01 in Unix microseconds
ENCODABLE = frozenset({"text", "bigint", "double precision", "boolean", "timestamptz", "text[]", "jsonb", "point",
                       "integer"})


def _fixed(n: int, itemsize: int, data: bytes) -> pa.Array:
    """`n` values of `itemsize` bytes each, as an Arrow binary array."""
    arr = pa.FixedSizeBinaryArray.from_buffers(pa.binary(itemsize), n, [None, pa.py_buffer(data)])
    return arr.cast(pa.binary())


def _be32(values: np.ndarray) -> pa.Array:
    return _fixed(len(values), 4, values.astype(">i4").tobytes())


def _lengths(arr: pa.Array) -> np.ndarray:
    return pc.binary_length(arr).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)


def _with_nulls(field: pa.Array, valid: pa.Array) -> pa.Array:
    """NULL fields are the length -1 and no bytes."""
    if valid.null_count == 0 and pc.all(valid).as_py():
        return field
    return pc.if_else(valid, field, pa.scalar(_NULL, pa.binary()))


def text(arr: pa.Array) -> pa.Array:
    data = arr.cast(pa.binary())
    field = pc.binary_join_element_wise(_be32(_lengths(data)), data.fill_null(b""), b"")
    return _with_nulls(field, pc.is_valid(arr))


def jsonb(arr: pa.Array) -> pa.Array:
    """jsonb from canonical JSON text: version byte 1, then the text."""
    data = arr.cast(pa.binary())
    version = pa.scalar(b"\x01", pa.binary())
    field = pc.binary_join_element_wise(_be32(_lengths(data) + 1), version, data.fill_null(b""), b"")
    return _with_nulls(field, pc.is_valid(arr))


# The wire type and size of each fixed-width type's value (after its 4-byte length).
_FIXED = {"bigint": (">i8", 8), "integer": (">i4", 4), "double precision": (">f8", 8), "boolean": ("u1", 1),
          "timestamptz": (">i8", 8)}


def _record(n: int, parts: list[tuple[str, np.ndarray | int]]) -> pa.Array:
    """Adjacent fixed-width parts (lengths, values, a row's field count), packed by one numpy
    record array: one Arrow column for all of them instead of one per part to join."""
    rec = np.empty(n, dtype=[(f"f{i}", code) for i, (code, _) in enumerate(parts)])
    for i, (_, value) in enumerate(parts):
        rec[f"f{i}"] = value
    return _fixed(n, rec.dtype.itemsize, rec.tobytes())


def _fixed_parts(arr: pa.Array, pg_type: str) -> list[tuple[str, np.ndarray | int]]:
    """A fixed-width field's length and value(s) for `_record`; a NULL is packed as zero (and then
    replaced by the length -1)."""
    if pg_type == "point":
        return [(">i4", 16), (">f8", arr.field("lon").to_numpy(zero_copy_only=False)),
                (">f8", arr.field("lat").to_numpy(zero_copy_only=False))]
    code, size = _FIXED[pg_type]
    if pg_type == "timestamptz":
        arr = arr.cast(pa.int64())
    if arr.null_count:
        arr = arr.fill_null(pa.scalar(False if pg_type == "boolean" else 0, arr.type))
    values = arr.to_numpy(zero_copy_only=False)
    if pg_type == "timestamptz":
        values = values - PG_EPOCH_US
    return [(">i4", size), (code, values.astype(np.uint8) if pg_type == "boolean" else values)]


def fixed(arr: pa.Array, pg_type: str) -> pa.Array:
    if pg_type not in _FIXED:
        raise ValueError(pg_type)
    return _with_nulls(_record(len(arr), _fixed_parts(arr, pg_type)), pc.is_valid(arr))


def point(arr: pa.StructArray) -> pa.Array:
    """point from a struct<lon, lat> (never NULL: geoPoints default to the origin)."""
    return _record(len(arr), _fixed_parts(arr, "point"))


def text_array(arr: pa.ListArray) -> pa.Array:
    """text[] from list<string> without NULL items: one dimension, lower bound 1."""
    arr = arr.fill_null(pa.scalar([], arr.type))
    items = arr.flatten().cast(pa.binary())
    item_fields = pc.binary_join_element_wise(_be32(_lengths(items)), items, b"")
    offsets = arr.offsets.to_numpy() - arr.offsets[0].as_py()
    per_row = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), item_fields)
    body = pc.binary_join(per_row, b"")
    counts = np.diff(offsets)
    body_len = _lengths(body)
    head = np.empty(len(arr), dtype=[("n", ">i4"), ("ndim", ">i4"), ("nulls", ">i4"), ("oid", ">i4"),
                                      ("dim", ">i4"), ("lb", ">i4")])
    empty = counts == 0
    head["n"] = np.where(empty, 12, 20 + body_len)
    head["ndim"] = np.where(empty, 0, 1)
    head["nulls"] = 0
    head["oid"] = _TEXT_OID
    head["dim"] = counts
    head["lb"] = 1
    full = _fixed(len(arr), 24, head.tobytes())
    short = pc.binary_slice(full, 0, 16)  # length and three header words: '{}'
    header = pc.if_else(pa.array(empty), short, full)
    return pc.binary_join_element_wise(header, body, b"")


def encode_column(arr: pa.Array, pg_type: str) -> pa.Array:
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pg_type == "text":
        return text(arr)
    if pg_type == "jsonb":
        return jsonb(arr)
    if pg_type == "text[]":
        return text_array(arr)
    if pg_type == "point":
        return point(arr)
    return fixed(arr, pg_type)


def rows(columns: list[pa.Array], pg_types: list[str]) -> pa.Buffer | bytes:
    """The COPY rows (no header, no trailer) for equally long columns."""
    n = len(columns[0]) if columns else 0
    if n == 0:
        return b""
    fields: list[pa.Array] = []
    run: list[tuple[str, np.ndarray | int]] = [(">i2", len(columns))]
    for arr, t in zip(columns, pg_types):
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        if t == "point" or (t in _FIXED and arr.null_count == 0):  # a point is never NULL
            run += _fixed_parts(arr, t)
        else:
            if run:
                fields.append(_record(n, run))
                run = []
            fields.append(encode_column(arr, t))
    if run:
        fields.append(_record(n, run))
    joined = pc.binary_join_element_wise(*fields, b"") if len(fields) > 1 else fields[0]
    if isinstance(joined, pa.ChunkedArray):
        joined = joined.combine_chunks()
    offsets = np.frombuffer(joined.buffers()[1], dtype=np.int32)[joined.offset:joined.offset + n + 1]
    start, end = int(offsets[0]), int(offsets[-1])
    return joined.buffers()[2].slice(start, end - start)
