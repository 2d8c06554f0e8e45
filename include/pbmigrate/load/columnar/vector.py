"""Column converters: one storage-class column in, the PostgreSQL value column and a mask of the
rows it cannot take out.

A masked row is not rejected here: it goes to the per-row converters (`fallback`), which reject
it with `convert`'s exact reason, or convert it when only the fast form was missed. So these
functions need only be exact on the values they accept; that is what the agreement tests check.
"""

from __future__ import annotations

import json as pyjson
from dataclasses import dataclass
from decimal import Decimal

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pbmigrate.plan.convert import Reject, json_value
from pbmigrate.plan.model import pg_type
from pbmigrate.source.catalog import Field

POINT = pa.struct([("lon", pa.float64()), ("lat", pa.float64())])
TEXT_LIST = pa.list_(pa.string())
NATURAL = {"text": pa.string(), "bigint": pa.int64(), "double precision": pa.float64(), "boolean": pa.bool_(),
           "timestamptz": pa.timestamp("us", tz="UTC"), "text[]": TEXT_LIST, "jsonb": pa.string(), "point": POINT}
# PocketBase's own date form, with fields in range; the calendar (30 February) is DuckDB's check.
DATE_RE = (r"^([0-9]{3}[1-9]|[0-9]{2}[1-9][0-9]|[0-9][1-9][0-9]{2}|[1-9][0-9]{3})-(0[1-9]|1[0-2])-"
           r"(0[1-9]|[12][0-9]|3[01]) ([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]\.[0-9]{3}Z$")
# A compact JSON array of strings that need no escape: its text is also array_to_json's.
LIST_RE = r'^\[("[^"\\\x00-\x1f]*"(,"[^"\\\x00-\x1f]*")*)?\]$'
_NUM = r"-?(?:0|[1-9][0-9]{0,14})(?:\.[0-9]{1,17})?"
GEO_LON_LAT = rf'^\{{"lon":(?P<lon>{_NUM}),"lat":(?P<lat>{_NUM})\}}$'
GEO_LAT_LON = rf'^\{{"lat":(?P<lat>{_NUM}),"lon":(?P<lon>{_NUM})\}}$'
TEXT_KINDS = frozenset({"text", "editor", "email", "url", "password"})


@dataclass
class Converted:
    values: pa.Array  # of NATURAL[natural type]; unspecified where `bad`
    bad: np.ndarray  # bool per row
    canon: pa.Array | None = None  # text[]: its canonical text (array_to_json)


_duck: duckdb.DuckDBPyConnection | None = None


def duck() -> duckdb.DuckDBPyConnection:
    """One DuckDB per process, on one thread: a batch task has one slot's core."""
    global _duck
    if _duck is None:
        _duck = duckdb.connect(config={"threads": 1})
    return _duck


def _np(mask: pa.Array) -> np.ndarray:
    return mask.fill_null(False).to_numpy(zero_copy_only=False).astype(bool)


def _none(n: int) -> np.ndarray:
    return np.zeros(n, dtype=bool)


def text(arr: pa.Array, f: Field, has_secrets: bool) -> Converted:
    keep_null = f.secret and not has_secrets  # API mode: PocketBase never exports them
    values = arr if keep_null else arr.fill_null("")
    return Converted(values, _np(pc.match_substring(values, "\x00")))


def number(arr: pa.Array, f: Field) -> Converted:
    if f.only_int:
        return Converted(arr.fill_null(0), _none(len(arr)))
    values = arr.fill_null(0.0)
    return Converted(values, _np(pc.is_nan(values)))


def boolean(arr: pa.Array) -> Converted:
    return Converted(pc.not_equal(arr.fill_null(0), 0), _none(len(arr)))


def date(arr: pa.Array, f: Field) -> Converted:
    """PocketBase's date text (DATE_RE's shape) to timestamptz by Arrow's own ISO-8601 cast, which
    checks the calendar too and refuses the whole column when a day does not exist (30 February):
    only then does DuckDB's TRY_CAST find which (a query per column costs more than the cast)."""
    s = arr.fill_null("")
    empty = _np(pc.equal(s, ""))
    shaped = _np(pc.match_substring_regex(s, DATE_RE))
    dated = pc.if_else(pa.array(shaped), s, pa.scalar(None, pa.string()))
    try:
        ts = dated.cast(pa.timestamp("ms", tz="UTC")).cast(NATURAL["timestamptz"])
    except pa.ArrowInvalid:
        ts = _duck_dates(dated)
    bad = (~empty & ~_np(pc.is_valid(ts))) | (empty & f.required)
    return Converted(ts, bad)


def _duck_dates(dated: pa.Array) -> pa.Array:
    con = duck()
    con.register("pbm_dates", pa.table({"s": dated}))
    try:
        ts = con.sql("SELECT TRY_CAST(left(s, 23) AS TIMESTAMP) AS t FROM pbm_dates").to_arrow_table()
    finally:
        con.unregister("pbm_dates")
    return ts.column("t").combine_chunks().cast(pa.timestamp("us")).cast(NATURAL["timestamptz"])


def single(arr: pa.Array, f: Field) -> Converted:
    s = arr.fill_null("")
    empty = _np(pc.equal(s, ""))
    bad = (empty & f.required) | _np(pc.match_substring(s, "\x00"))
    if f.type == "select":
        bad |= ~empty & ~_np(pc.is_in(s, pa.array(list(f.values), pa.string())))
    values = pc.if_else(pa.array(empty), pa.scalar(None, pa.string()), s)
    return Converted(values, bad)


def multi(arr: pa.Array, f: Field) -> Converted:
    s = arr.fill_null("")
    empty = _np(pc.or_(pc.equal(s, ""), pc.equal(s, "[]")))
    simple = _np(pc.match_substring_regex(s, LIST_RE))
    inner = pc.if_else(pa.array(empty | ~simple), pa.scalar(None, pa.string()), pc.utf8_slice_codeunits(s, 2, -2))
    lists = pc.split_pattern(inner, '","').fill_null(pa.scalar([], TEXT_LIST))
    bad = (~empty & ~simple) | (empty & f.required)
    if f.type == "select" and len(lists):
        items = lists.flatten()
        wrong = ~_np(pc.is_in(items, pa.array(list(f.values), pa.string())))
        if wrong.any():
            parents = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False)
            bad[np.unique(parents[wrong])] = True
    canon = pc.if_else(pa.array(empty), pa.scalar("[]", pa.string()), s)
    return Converted(lists, bad, canon)


def _jsonb_key(item: tuple[str, object]) -> tuple[int, bytes]:
    b = item[0].encode("utf-8")
    return (len(b), b)


def _jsonb_object(pairs: list[tuple[str, object]]) -> dict:
    """An object in jsonb's key order (shorter keys first, then bytes); the last duplicate wins."""
    return dict(sorted(dict(pairs).items(), key=_jsonb_key))


def _no_constant(token: str) -> object:
    raise ValueError(f"{token} is not JSON")


_JSON_FAST = pyjson.JSONDecoder(object_pairs_hook=_jsonb_object, parse_float=Decimal, parse_constant=_no_constant)
_DUMP_FAST = pyjson.JSONEncoder(ensure_ascii=False, separators=(", ", ": "), allow_nan=False)


def jsonb_text(raw: str | None, conv) -> str | None:
    """jsonb's canonical text of one json field value: parsed with keys already in jsonb's order
    and printed by the C encoder. Anything unusual (numbers with a fraction or an exponent, which
    must keep their digits; values `conv` may reject) is left to `conv`, `convert.json_value`."""
    if raw is None or raw == "" or raw == "null":
        return None
    try:
        obj = _JSON_FAST.decode(raw)
        out = _DUMP_FAST.encode(obj)
    except (ValueError, TypeError):
        return conv(raw)
    if "\\u0000" in out:
        return conv(raw)
    return out


JSON_MEMO_MAX = 65_536  # entries; texts longer than JSON_MEMO_TEXT are not kept
JSON_MEMO_TEXT = 256  # so the memo holds at most ~40 MB of hostile texts
_json_memo: dict[str, str | None] = {}


def json(arr: pa.Array, f: Field) -> Converted:
    """Each distinct text once to jsonb's exact canonical text (`jsonb_text`), remembered across
    chunks and batches: game data repeats its JSON (65k distinct `attributes` in 400k rows, a chunk
    holds 16k), and parsing and printing is most of a json column's cost. The canonical text
    depends on the text alone (a field's name only names a reject, and rejects are not kept)."""
    conv = json_value(f)
    enc = arr.dictionary_encode()
    memo = _json_memo
    out, bad_codes = [], []
    for code, raw in enumerate(enc.dictionary.to_pylist()):
        hit = memo.get(raw, memo)
        if hit is not memo:
            out.append(hit)
            continue
        try:
            canon = jsonb_text(raw, conv)
        except Reject:
            out.append(None)
            bad_codes.append(code)
            continue
        out.append(canon)
        if raw is not None and len(raw) <= JSON_MEMO_TEXT:
            if len(memo) >= JSON_MEMO_MAX:
                memo.clear()
            memo[raw] = canon
    values = pc.take(pa.array(out, pa.string()), enc.indices)
    bad = _none(len(arr))
    if bad_codes:
        bad = _np(pc.is_in(enc.indices, pa.array(bad_codes, enc.indices.type)))
    return Converted(values, bad)


def geo_point(arr: pa.Array) -> Converted:
    s = arr.fill_null("")
    empty = _np(pc.equal(s, ""))
    lon = np.zeros(len(s))
    lat = np.zeros(len(s))
    found = empty.copy()
    for pattern in (GEO_LON_LAT, GEO_LAT_LON):
        m = pc.extract_regex(s, pattern)
        hit = _np(pc.is_valid(m)) & ~found
        if hit.any():
            lon[hit] = m.field("lon").filter(pa.array(hit)).cast(pa.float64()).to_numpy()
            lat[hit] = m.field("lat").filter(pa.array(hit)).cast(pa.float64()).to_numpy()
            found |= hit
    bad = ~found | ~np.isfinite(lon) | ~np.isfinite(lat)
    values = pa.StructArray.from_arrays([pa.array(lon), pa.array(lat)], fields=list(POINT))
    return Converted(values, bad)


def convert_column(arr: pa.Array, f: Field, has_secrets: bool) -> Converted:
    """The vector twin of `convert.converter_for(f)`."""
    t = f.type
    if f.secret or t in TEXT_KINDS:
        return text(arr, f, has_secrets)
    if t == "number":
        return number(arr, f)
    if t == "bool":
        return boolean(arr)
    if t in ("date", "autodate"):
        return date(arr, f)
    if t in ("select", "file", "relation"):
        return multi(arr, f) if f.multi else single(arr, f)
    if t == "json":
        return json(arr, f)
    if t == "geoPoint":
        return geo_point(arr)
    raise ValueError(f"no converter for field type {t!r}")


def natural_type(f: Field) -> pa.DataType:
    return NATURAL[pg_type(f)]
