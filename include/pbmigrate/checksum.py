"""Order-independent checksums over canonical values, computable on both sides.

The loader computes a batch's checksum in Python from the converted values it sends; validation
computes it again inside PostgreSQL from what the tables hold. Both reduce every column to the
same canonical text (floats as their IEEE-754 bits, timestamps as the hex of their binary form,
jsonb in PostgreSQL's own output form), join a row's columns with \\x1f, take the first 64 bits of md5 as a
signed integer and add them up modulo 2**64. Addition makes the result independent of row order,
so batches and retries can load in any order.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from hashlib import md5
from ipaddress import ip_interface
from json.encoder import encode_basestring as _encode_str
from typing import Any
from uuid import UUID

from pbmigrate.pgsql import ql

MOD = 2**64
SEP = "\x1f"
NULL = "\\N"
PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)  # timestamptz's binary form counts from here
MICROSECOND = timedelta(microseconds=1)
pack_float8 = struct.Struct(">d").pack
pack_int8 = struct.Struct(">q").pack


def _text(v: Any) -> str:
    return NULL if v is None else v


def _bigint(v: Any) -> str:
    return str(v)


def _float8(v: Any) -> str:
    return pack_float8(v).hex()


def _bool(v: Any) -> str:
    return "t" if v else "f"


def _timestamptz(v: Any) -> str:
    """`timestamptz_send`'s bytes as hex: microseconds since 2000-01-01 UTC, a big-endian int64."""
    return NULL if v is None else pack_int8((v - PG_EPOCH) // MICROSECOND).hex()


def _text_array(v: Any) -> str:
    """`array_to_json(text[])`: what json.dumps(v, ensure_ascii=False, separators=(",", ":"))
    gives, at a third of its cost (it builds an encoder per call)."""
    return "[" + ",".join(map(_encode_str, v)) + "]"


def _point(v: Any) -> str:
    return pack_float8(v[0]).hex() + pack_float8(v[1]).hex()


def _jsonb(v: Any) -> str:
    """The loader sends jsonb already in canonical text (convert.json_value), so no work here."""
    return NULL if v is None else v


def _other(v: Any) -> str:
    return NULL if v is None else str(v)


def _uuid(v: Any) -> str:
    """uuid as PostgreSQL prints it: lower case, hyphenated (a source may hold 'A0EEBC99-...')."""
    return NULL if v is None else str(UUID(str(v)))


def _inet(v: Any) -> str:
    """inet as PostgreSQL prints it: the address compressed, the mask only when not a host's."""
    if v is None:
        return NULL
    iface = ip_interface(str(v).strip())
    prefix = iface.network.prefixlen
    return str(iface.ip) if prefix == iface.max_prefixlen else f"{iface.ip}/{prefix}"


PY_CANON: dict[str, Callable[[Any], str]] = {
    "text": _text,
    "bigint": _bigint,
    "double precision": _float8,
    "boolean": _bool,
    "timestamptz": _timestamptz,
    "text[]": _text_array,
    "jsonb": _jsonb,
    "point": _point,
    "uuid": _uuid,  # mapping overrides PostgreSQL normalises: hashed as it prints them
    "inet": _inet,
    "other": _other,  # a type with no canonical form of its own and no natural type to fall back on
}

_NULLSAFE = "coalesce({e}, '\\N')"
# A timestamptz as the hex of its binary form, not as epoch microseconds in decimal: reading the
# integer back out of those bytes (or extract(epoch ...), in numeric) cost 12-20 % of the checksums
# of a table with three timestamps on the 2M sample.
SQL_CANON: dict[str, str] = {
    "text": _NULLSAFE.format(e="{c}"),
    "bigint": "{c}::text",
    "double precision": "encode(float8send({c}), 'hex')",
    "boolean": "CASE WHEN {c} THEN 't' ELSE 'f' END",
    "timestamptz": _NULLSAFE.format(e="encode(timestamptz_send({c}), 'hex')"),
    "text[]": "array_to_json({c})::text",
    "jsonb": _NULLSAFE.format(e="{c}::text"),
    "point": "encode(float8send({c}[0]), 'hex') || encode(float8send({c}[1]), 'hex')",
    "uuid": _NULLSAFE.format(e="{c}::text"),
    "inet": "CASE WHEN {c} IS NULL THEN '\\N' ELSE concat({c}) END",  # a cast to text adds '/32'
    "other": _NULLSAFE.format(e="{c}::text"),
}


def canon_key(pg_type: str, natural: str | None = None) -> str:
    """The canonical form a column is hashed in: its own type's (uuid and inet included); for a
    mapping type override that has none (numeric, varchar, citext...), that of `natural`, the type its PocketBase field
    would have had. The loader's values are of the natural type, and validation casts the column
    back to it (`sql_value`), so both sides agree exactly where the override kept the value."""
    if pg_type in PY_CANON:
        return pg_type
    return natural if natural in PY_CANON else "other"


def sql_value(expr: str, pg_type: str, key: str) -> str:
    """A column expression as canonical form `key` (from `canon_key`) reads it: cast back to the
    natural type; text through the type's output function (`concat`: a cast to text gives
    '10.0.0.1/32' for the inet '10.0.0.1')."""
    if key in (pg_type, "other"):
        return expr
    if key == "text":
        return f"CASE WHEN {expr} IS NULL THEN NULL ELSE concat({expr}) END"
    return f"({expr})::{key}"


# The first 64 bits of md5 as a signed bigint: an explicit cast to bit(64) keeps the leftmost 64
# of the 128 bits, so no left(..., 16) (5-10 % of a table's checksum inside PostgreSQL).
_MD5_64 = "('x' || md5({s}))::bit(64)::bigint"


def digest(canonical: str) -> int:
    """First 64 bits of md5, signed: what `('x'||md5(s))::bit(64)::bigint` gives."""
    return int.from_bytes(md5(canonical.encode("utf-8", "surrogatepass")).digest()[:8], "big", signed=True)


def row_canon(canons: Sequence[Callable[[Any], str]], row: Sequence[Any]) -> str:
    return SEP.join([c(v) for c, v in zip(canons, row)])


def sql_row_digest(columns: Sequence[tuple[str, str]]) -> str:
    """SQL for one row's digest; columns are (quoted column expression, pg type)."""
    parts = ", ".join(SQL_CANON[t].format(c=c) for c, t in columns)
    return _MD5_64.format(s=f"concat_ws(E'\\x1f', {parts})")


def junction_digest(table: str, owner: str, targets: list[str]) -> int:
    """One digest per owner over its ordered targets (an owner without targets adds nothing)."""
    return digest(f"{table}{SEP}{owner}{SEP}" + _text_array(targets))


def sql_junction_digest(table: str, owner_col: str, target_col: str) -> str:
    """SQL twin of `junction_digest`, an aggregate: use it with GROUP BY the owner column."""
    lit = ql(table)
    return _MD5_64.format(s=f"concat_ws(E'\\x1f', {lit}, {owner_col}, "
                            f"array_to_json(array_agg({target_col} ORDER BY position))::text)")


def fold(total: int) -> int:
    return total % MOD


def as_hex(total: int) -> str:
    return f"{fold(total):016x}"


# --- jsonb's text output, reproduced ---------------------------------------------------------

_DECODER = json.JSONDecoder(parse_float=Decimal)


def jsonb_text(raw: str) -> str:
    """The text PostgreSQL prints for `raw::jsonb`: keys sorted by (byte length, bytes), last
    duplicate wins, ', ' and ': ' separators, numbers as numeric prints them."""
    return jsonb_dump(_DECODER.decode(raw))


def _numeric(d: Decimal) -> str:
    if d == 0:
        d = abs(d)
    return format(d, "f")


def _key(k: str) -> tuple[int, bytes]:
    b = k.encode("utf-8")
    return (len(b), b)


def jsonb_dump(o: Any) -> str:
    """Serialise a value decoded with Decimal floats the way jsonb prints it."""
    t = type(o)
    if t is str:
        return _encode_str(o)
    if t is dict:
        if not o:
            return "{}"
        keys = sorted(o, key=_key)
        return "{" + ", ".join(_encode_str(k) + ": " + jsonb_dump(o[k]) for k in keys) + "}"
    if t is list:
        return "[" + ", ".join([jsonb_dump(x) for x in o]) + "]"
    if o is True:
        return "true"
    if o is False:
        return "false"
    if o is None:
        return "null"
    if t is int:
        return str(o)
    if t is Decimal:
        return _numeric(o)
    raise TypeError(f"not JSON: {t.__name__}")
