"""Value conversion from PocketBase's SQLite storage form to PostgreSQL values.

Each converter takes one stored value and returns the value to COPY, or raises `Reject` with a
reason of the form "kind: detail" (reports group by the kind). Reasons never quote a secret value
(password hashes, token keys); other values are quoted short, so a person can find the record.

Policy for PocketBase's empty sentinels (POCKETBASE.md 0.2 #4): text-like fields keep '' (their
unique indexes are partial on `!= ''`); dates, single selects, single files and single relations
map '' to NULL, so timestamps and foreign keys stay honest; multi fields map '[]' to an empty
array; numbers and bools keep 0/false (PocketBase cannot tell them from "empty" either).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from pbmigrate.checksum import jsonb_dump
from pbmigrate.source.catalog import Field

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

Converter = Callable[[Any], Any]


class Reject(Exception):
    """A value that cannot be loaded; the row goes to pbm_meta.rejects with this reason."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def show(value: Any, secret: bool = False) -> str:
    """A short, safe rendering of a bad value for a reject reason."""
    if secret:
        return "<secret value withheld>"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _as_text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    return value if isinstance(value, str) else str(value)


def text(f: Field) -> Converter:
    name, secret = f.name, f.secret

    def conv(v: Any) -> Any:
        if type(v) is str and "\x00" not in v:  # the common case, first
            return v
        if v is None:
            return ""
        try:
            s = _as_text(v)
        except UnicodeDecodeError:
            raise Reject(name, "bytes that are not UTF-8 text") from None
        if "\x00" in s:
            raise Reject(name, f"NUL byte in text (PostgreSQL text cannot hold it): {show(s, secret)}")
        return s

    return conv


def secret_text(f: Field) -> Converter:
    """Password hashes and token keys; None when the source cannot export them (API mode)."""
    inner = text(f)
    return lambda v: None if v is None else inner(v)


def number(f: Field) -> Converter:
    name = f.name

    def conv(v: Any) -> float:
        if v is None or v == "":
            return 0.0
        if isinstance(v, bool):
            return float(v)
        try:
            out = float(v)
        except (TypeError, ValueError):
            raise Reject(name, f"not a number: {show(v)}") from None
        if math.isnan(out):
            raise Reject(name, "NaN is not a PocketBase number")
        return out

    return conv


def integer(f: Field) -> Converter:
    """onlyInt / noDecimal numbers: bigint, and a fraction is a reject, not a silent rounding."""
    name, as_float = f.name, number(f)

    def conv(v: Any) -> int:
        if type(v) is int:
            if INT64_MIN <= v <= INT64_MAX:
                return v
            raise Reject(name, f"outside bigint's range: {show(v)}")
        x = as_float(v)
        if not math.isfinite(x) or not x.is_integer():
            raise Reject(name, f"fraction in an integer-only number: {show(v)}")
        if not INT64_MIN <= x <= INT64_MAX:
            raise Reject(name, f"outside bigint's range: {show(v)}")
        return int(x)

    return conv


_TRUE = {1, "1", "true", "TRUE", "True"}
_FALSE = {0, "0", "false", "FALSE", "False", "", None}


def boolean(f: Field) -> Converter:
    name = f.name

    def conv(v: Any) -> bool:
        if v in _TRUE:
            return True
        if v in _FALSE:
            return False
        if isinstance(v, float) and v in (0.0, 1.0):
            return v == 1.0
        raise Reject(name, f"not a boolean: {show(v)}")

    return conv


def parse_datetime(s: str) -> datetime:
    """PocketBase writes `YYYY-MM-DD HH:MM:SS.sssZ` (UTC); raw SQL writes may differ, so be lenient."""
    if len(s) == 24 and s[-1] == "Z":  # PocketBase's own format: already UTC
        return datetime.fromisoformat(s)
    s = s.strip()
    if len(s) == 10:  # a bare date
        s += " 00:00:00Z"
    dt = datetime.fromisoformat(s)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC)


def date(f: Field) -> Converter:
    name, required = f.name, f.required

    def conv(v: Any) -> datetime | None:
        if v is None or v == "":
            if required:
                raise Reject(name, "required date is empty")
            return None
        try:
            dt = parse_datetime(v if type(v) is str else _as_text(v))
        except (ValueError, TypeError, UnicodeDecodeError):
            raise Reject(name, f"not a date: {show(v)}") from None
        if not 1 <= dt.year <= 9999:
            raise Reject(name, f"date out of range: {show(v)}")
        return dt

    return conv


def single(f: Field) -> Converter:
    """Single select, file or relation: '' means no value (NULL)."""
    name, required, allowed = f.name, f.required, frozenset(f.values) if f.type == "select" else None
    check_text = text(f)

    def conv(v: Any) -> str | None:
        if v is None or v == "":
            if required:
                raise Reject(name, f"required {f.type} is empty")
            return None
        s = check_text(v)
        if allowed is not None and s not in allowed:
            raise Reject(name, f"not one of the select values: {show(s)}")
        return s

    return conv


def _string_list(raw: str) -> Any:
    """A JSON array of strings, parsed. PocketBase writes them compact (`["a","b"]`); without a
    backslash no item can hold a quote (JSON escapes it), so splitting is exact. Anything else,
    control characters included (invalid raw in JSON), goes to the JSON parser."""
    if raw.startswith('["') and raw.endswith('"]') and "\\" not in raw and raw.isprintable():
        items = raw[2:-2].split('","')
        if not any('"' in i for i in items):
            return items
    return json.loads(raw)


def multi(f: Field) -> Converter:
    """Multi select, file or relation: an ordered JSON array of strings."""
    name, required, allowed = f.name, f.required, frozenset(f.values) if f.type == "select" else None

    def conv(v: Any) -> list[str]:
        if v is None or v == "" or v == "[]":
            if required:
                raise Reject(name, f"required {f.type} is empty")
            return []
        try:
            raw = _as_text(v)
        except UnicodeDecodeError:
            raise Reject(name, "bytes that are not UTF-8 text") from None
        try:
            items = _string_list(raw)
        except ValueError:
            # 0.22 single->multi changes can leave a bare id behind; PocketBase reads it as [id].
            if raw and raw[0] not in "[{\"":
                items = [raw]
            else:
                raise Reject(name, f"not a JSON array: {show(raw)}") from None
        if isinstance(items, str):
            items = [items] if items else []
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise Reject(name, f"not a JSON array of strings: {show(raw)}")
        for item in items:
            if "\x00" in item:
                raise Reject(name, "NUL byte in an array item")
            if allowed is not None and item not in allowed:
                raise Reject(name, f"not one of the select values: {show(item)}")
        if required and not items:
            raise Reject(name, f"required {f.type} is empty")
        return items

    return conv


def _no_constants(token: str) -> Any:
    raise ValueError(f"{token} is not JSON")


_JSON = json.JSONDecoder(parse_float=Decimal, parse_constant=_no_constants)


def json_value(f: Field) -> Converter:
    """json fields, returned as the exact text jsonb prints (parsed once: the checksum's canonical
    form and a valid jsonb input at the same time). SQLite's NUMERIC affinity returns 123 as int
    and 1.5 as float (POCKETBASE.md 0.2 #3); SQL NULL and the text 'null' both mean null."""
    name = f.name

    def conv(v: Any) -> str | None:
        if v is None:
            return None
        if type(v) is int:
            return str(v)
        if type(v) is float:
            if not math.isfinite(v):
                raise Reject(name, f"not JSON: {v}")
            return jsonb_dump(Decimal(repr(v)))
        try:
            raw = _as_text(v)
        except UnicodeDecodeError:
            raise Reject(name, "bytes that are not UTF-8 JSON") from None
        if raw == "" or raw == "null":
            return None
        try:
            out = jsonb_dump(_JSON.decode(raw))
        except ValueError:
            raise Reject(name, f"invalid JSON: {show(raw)}") from None
        if "\\u0000" in out:
            raise Reject(name, "JSON holds a NUL character (\\u0000), which jsonb cannot store")
        return out

    return conv


def geo_point(f: Field) -> Converter:
    """geoPoint: {"lon": x, "lat": y} becomes a PostgreSQL point (x = lon, y = lat)."""
    name = f.name

    def conv(v: Any) -> tuple[float, float]:
        if v is None or v == "":
            return (0.0, 0.0)
        try:
            obj = json.loads(_as_text(v))
            lon, lat = float(obj["lon"]), float(obj["lat"])
        except (ValueError, TypeError, KeyError):
            raise Reject(name, f"not a geoPoint: {show(v)}") from None
        if not (math.isfinite(lon) and math.isfinite(lat)):
            raise Reject(name, f"not a geoPoint: {show(v)}")
        return (lon, lat)

    return conv


def converter_for(f: Field, *, has_secrets: bool = True) -> Converter:
    """The converter for one field of a collection's table (multi relations are handled apart)."""
    t = f.type
    if f.secret:
        return secret_text(f) if not has_secrets else text(f)
    if t in ("text", "editor", "email", "url", "password"):
        return text(f)
    if t == "number":
        return integer(f) if f.only_int else number(f)
    if t == "bool":
        return boolean(f)
    if t in ("date", "autodate"):
        return date(f)
    if t in ("select", "file", "relation"):
        return multi(f) if f.multi else single(f)
    if t == "json":
        return json_value(f)
    if t == "geoPoint":
        return geo_point(f)
    raise ValueError(f"no converter for field type {t!r}")
