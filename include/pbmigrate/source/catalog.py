"""The PocketBase catalog: collections and fields, for both schema generations.

Types come from the `_collections` JSON, never from SQLite's DDL: databases created years ago
keep legacy DDL (REAL, nullable columns, TEXT columns holding JSON arrays). See POCKETBASE.md.
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pbmigrate.errors import BadSource, CatalogError

KNOWN_TYPES = frozenset(
    {
        "text", "editor", "number", "bool", "email", "url", "date", "autodate", "select",
        "file", "relation", "json", "password", "geoPoint",
    }
)
MULTI_CAPABLE = frozenset({"select", "file", "relation"})

# Tables in data.db that are not collections and never migrate.
SKIPPED_TABLES = frozenset({"_collections", "_params", "_migrations", "sqlite_sequence"})
# Auth columns PocketBase 0.22 adds implicitly (not listed in `schema`), in their DDL order,
# with whether the API hides them (0.22 returns username, never tokenKey or passwordHash).
LEGACY_AUTH_FIELDS = (
    ("username", "text", False),
    ("email", "email", False),
    ("emailVisibility", "bool", False),
    ("verified", "bool", False),
    ("tokenKey", "text", True),
    ("passwordHash", "password", True),
    ("lastResetSentAt", "date", False),
    ("lastVerificationSentAt", "date", False),
    ("lastLoginAlertSentAt", "date", False),
)


@dataclass(frozen=True)
class Field:
    """One column of a collection, described by PocketBase's own catalog."""

    name: str
    type: str
    required: bool = False
    system: bool = False
    hidden: bool = False
    primary_key: bool = False
    multi: bool = False
    only_int: bool = False
    values: tuple[str, ...] = ()
    target: str | None = None  # relation: the id of the target collection
    cascade_delete: bool = False
    min_select: int | None = None
    max_select: int | None = None
    on_create: bool = True  # autodate
    on_update: bool = False  # autodate

    @property
    def secret(self) -> bool:
        """Password hashes and token keys: migrated, but never logged, cached or shown."""
        return self.type == "password" or self.name == "tokenKey"


@dataclass(frozen=True)
class Collection:
    id: str
    name: str
    type: str  # base | auth | view
    system: bool
    fields: tuple[Field, ...]
    indexes: tuple[str, ...] = ()
    view_query: str | None = None

    @property
    def is_view(self) -> bool:
        return self.type == "view"

    @property
    def is_internal(self) -> bool:
        """PocketBase's own collections (`_superusers`, `_otps`...): not application data."""
        return self.name.startswith("_")

    @property
    def migrates(self) -> bool:
        return not self.is_view and not self.is_internal

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise CatalogError(f"collection {self.name!r} has no field {name!r}")

    def has_field(self, name: str) -> bool:
        return any(f.name == name for f in self.fields)

    @property
    def updated_field(self) -> Field | None:
        """The autodate that moves on every update: what incremental re-sync keys on.

        Prefers `updated`, then one set on create *and* update: an onUpdate-only autodate stays
        '' until a record's first update, so keying on it would miss never-updated records.
        """
        candidates = [f for f in self.fields if f.type == "autodate" and f.on_update]
        for f in candidates:
            if f.name == "updated":
                return f
        for f in candidates:
            if f.on_create:
                return f
        return candidates[0] if candidates else None


@dataclass(frozen=True)
class Catalog:
    generation: int  # 22 for `schema` (<= 0.22), 23 for `fields` (>= 0.23)
    collections: tuple[Collection, ...]
    skipped_tables: tuple[str, ...] = field(default=())

    def get(self, name_or_id: str) -> Collection:
        for c in self.collections:
            if name_or_id in (c.name, c.id):
                return c
        raise CatalogError(f"no collection named {name_or_id!r} in the PocketBase catalog")

    def migrating(self) -> list[Collection]:
        return [c for c in self.collections if c.migrates]


def _int_or_none(value: Any) -> int | None:
    if value is None or value == "":
        return None
    return int(value)


def _load_json(raw: Any, what: str) -> Any:
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8")
    if raw is None or raw == "":
        return None
    try:
        return json.loads(raw) if isinstance(raw, str) else raw
    except json.JSONDecodeError as exc:
        raise CatalogError(f"{what} is not valid JSON: {exc}") from exc


def parse_field(raw: Mapping[str, Any], generation: int, collection: str) -> Field:
    """One field of `schema` (0.22, options nested) or `fields` (0.23+, flat)."""
    ftype = raw.get("type")
    name = raw.get("name")
    if ftype not in KNOWN_TYPES:
        raise CatalogError(
            f"collection {collection!r}, field {name!r}: unknown PocketBase field type {ftype!r} "
            f"(a newer PocketBase?); supported: {', '.join(sorted(KNOWN_TYPES))}"
        )
    opts = (raw.get("options") or {}) if generation == 22 else raw
    max_select = _int_or_none(opts.get("maxSelect"))
    if ftype not in MULTI_CAPABLE:
        multi = False
    elif generation == 22 and ftype == "relation":
        multi = max_select is None or max_select > 1
    else:
        multi = max_select is not None and max_select > 1
    return Field(
        name=name,
        type=ftype,
        required=bool(raw.get("required")),
        system=bool(raw.get("system")),
        hidden=bool(raw.get("hidden")),
        primary_key=bool(raw.get("primaryKey")),
        multi=multi,
        only_int=bool(opts.get("onlyInt") or opts.get("noDecimal")),
        values=tuple(opts.get("values") or ()),
        target=opts.get("collectionId") if ftype == "relation" else None,
        cascade_delete=bool(opts.get("cascadeDelete")),
        min_select=_int_or_none(opts.get("minSelect")),
        max_select=max_select,
        on_create=bool(raw.get("onCreate", True)),
        on_update=bool(raw.get("onUpdate", False)),
    )


def _legacy_system_fields(ctype: str, columns: Iterable[str] | None) -> list[Field]:
    """0.22 leaves id/created/updated (and the auth columns) out of `schema`."""
    present = set(columns) if columns is not None else None
    fields = [Field("id", "text", required=True, system=True, primary_key=True)]
    if ctype == "view":
        # A 0.22 view exposes created/updated only when its query selects them.
        for name, on_update in (("created", False), ("updated", True)):
            if present is not None and name in present:
                fields.append(Field(name, "autodate", system=True, on_update=on_update))
        return fields
    fields.append(Field("created", "autodate", system=True, on_create=True, on_update=False))
    fields.append(Field("updated", "autodate", system=True, on_create=True, on_update=True))
    if ctype == "auth":
        for name, ftype, hidden in LEGACY_AUTH_FIELDS:
            if present is None or name in present:
                required = name in ("username", "tokenKey", "passwordHash")
                fields.append(Field(name, ftype, required=required, system=True, hidden=hidden))
    return fields


def collection_from_row(row: Mapping[str, Any], generation: int,
                        columns: Iterable[str] | None = None,
                        physical_indexes: Iterable[str] | None = None) -> Collection:
    """Build a Collection from one `_collections` row (or one API collection item)."""
    name = row["name"]
    ctype = row.get("type") or "base"
    raw_fields = _load_json(row.get("schema" if generation == 22 else "fields"), f"{name} fields") or []
    fields: list[Field] = []
    if generation == 22:
        fields.extend(_legacy_system_fields(ctype, columns))
    fields.extend(parse_field(f, generation, name) for f in raw_fields)
    if ctype != "view" and not any(f.name == "id" for f in fields):
        raise CatalogError(f"collection {name!r} has no id field")
    options = _load_json(row.get("options"), f"{name} options") or {}
    view_query = row.get("viewQuery") or options.get("viewQuery") or options.get("query")
    json_indexes = _load_json(row.get("indexes"), f"{name} indexes") or []
    indexes = _merge_indexes(physical_indexes, json_indexes)
    if generation == 22 and ctype == "auth" and physical_indexes is None:
        indexes += _legacy_auth_indexes(row.get("id", ""), name)
    return Collection(
        id=row.get("id", ""),
        name=name,
        type=ctype,
        system=bool(row.get("system")),
        fields=tuple(fields),
        indexes=indexes,
        view_query=view_query,
    )


_INDEX_NAME = re.compile(r"INDEX\s+(?:IF\s+NOT\s+EXISTS\s+)?[`\"\[]?([^`\"\]\s(]+)", re.IGNORECASE)


def index_name(sql: str) -> str | None:
    m = _INDEX_NAME.search(sql)
    return m.group(1) if m else None


def _merge_indexes(physical: Iterable[str] | None, declared: list[str]) -> tuple[str, ...]:
    """What SQLite enforces, plus what PocketBase declares but SQLite lacks (drift after upgrades):
    the target enforces what the application believes, and finalize rejects rows that break it."""
    if physical is None:
        return tuple(declared)
    physical = tuple(physical)
    names = {index_name(sql) for sql in physical}
    return physical + tuple(sql for sql in declared if index_name(sql) not in names)


def _legacy_auth_indexes(cid: str, table: str) -> tuple[str, ...]:
    """0.22 keeps its auth indexes out of the JSON; API mode has to restore them."""
    prefix = f"_{cid}"
    return (
        f"CREATE UNIQUE INDEX {prefix}_username_idx ON `{table}` (`username`)",
        f"CREATE UNIQUE INDEX {prefix}_email_idx ON `{table}` (`email`) WHERE `email` != ''",
        f"CREATE UNIQUE INDEX {prefix}_tokenKey_idx ON `{table}` (`tokenKey`)",
    )


def detect_generation(conn: sqlite3.Connection) -> int:
    cols = {r[1] for r in conn.execute("PRAGMA table_info(_collections)")}
    if "fields" in cols:
        return 23
    if "schema" in cols:
        return 22
    raise BadSource("not a PocketBase database: _collections has neither 'schema' nor 'fields'")


def read_catalog(conn: sqlite3.Connection) -> Catalog:
    """Read the catalog of an open PocketBase data.db (read-only connection)."""
    tables = {
        r[0]: r[1]
        for r in conn.execute("SELECT name, type FROM sqlite_master WHERE type IN ('table','view')")
    }
    if "_collections" not in tables:
        raise BadSource("not a PocketBase database: no _collections table")
    generation = detect_generation(conn)
    conn_rows = conn.execute("SELECT * FROM _collections ORDER BY name")
    names = [d[0] for d in conn_rows.description]
    collections = []
    for values in conn_rows.fetchall():
        row = dict(zip(names, values, strict=True))
        name = row["name"]
        columns = [r[1] for r in conn.execute(f'PRAGMA table_info("{_q(name)}")')]
        physical = [
            r[0]
            for r in conn.execute(
                "SELECT sql FROM sqlite_master WHERE type='index' AND tbl_name=? AND sql IS NOT NULL "
                "ORDER BY name",
                (name,),
            )
        ]
        coll = collection_from_row(row, generation, columns, physical)
        if not coll.is_view:
            _check_columns(coll, columns)
        collections.append(coll)
    known = {c.name for c in collections}
    skipped = tuple(
        sorted(t for t in tables if t not in known and not t.startswith("sqlite_autoindex"))
    )
    return Catalog(generation, tuple(collections), skipped)


def _check_columns(coll: Collection, columns: list[str]) -> None:
    missing = [f.name for f in coll.fields if f.name not in columns]
    if missing:
        raise CatalogError(
            f"collection {coll.name!r}: fields {missing} are in _collections but not in the table"
        )


def _q(ident: str) -> str:
    return ident.replace('"', '""')


def catalog_from_api(items: list[Mapping[str, Any]], generation: int) -> Catalog:
    """Build the catalog from `GET /api/collections` items (API mode)."""
    return Catalog(generation, tuple(collection_from_row(i, generation) for i in items), ())
