"""The migration plan: catalog + mapping -> target tables, columns, types and converters.

Built again in every task from the snapshot (it is cheap and deterministic), so nothing but
plain values crosses XCom.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pbmigrate import checksum
from pbmigrate.errors import MappingError
from pbmigrate.pgsql import PG_MAX_IDENT, qi, ql_list
from pbmigrate.plan.convert import Converter, converter_for
from pbmigrate.plan.mapping import Mapping, closest, validate_mapping
from pbmigrate.source.catalog import Catalog, Collection, Field


def pg_type(f: Field) -> str:
    """PostgreSQL type for a PocketBase field (POCKETBASE.md 0.1)."""
    t = f.type
    if t == "number":
        return "bigint" if f.only_int else "double precision"
    if t == "bool":
        return "boolean"
    if t in ("date", "autodate"):
        return "timestamptz"
    if t in ("select", "file", "relation"):
        return "text[]" if f.multi else "text"
    if t == "json":
        return "jsonb"
    if t == "geoPoint":
        return "point"
    return "text"


@dataclass(frozen=True)
class Column:
    field: Field
    name: str
    type: str
    nullable: bool
    default: str | None
    check: str | None
    position: int  # index of the field in the source row tuple

    @property
    def canon(self) -> str:
        """The checksum's canonical form for this column (`checksum.canon_key`)."""
        return checksum.canon_key(self.type, pg_type(self.field))

    @property
    def ddl(self) -> str:
        collate = ' COLLATE "C"' if self.field.name == "id" or self.field.type == "relation" else ""
        parts = [qi(self.name), self.type + collate]
        if self.field.primary_key or (self.field.name == "id"):
            parts.append("NOT NULL")  # the key itself comes after the load (finalize): see ddl
        elif not self.nullable:
            parts.append("NOT NULL")
        if self.default is not None:
            parts.append(f"DEFAULT {self.default}")
        if self.check:
            parts.append(f"CHECK ({self.check})")
        return " ".join(parts)


@dataclass(frozen=True)
class Junction:
    field: Field
    table: str
    owner: str
    target: str
    position: int
    target_table: str | None  # None when the target collection is not migrated


@dataclass(frozen=True)
class ForeignKey:
    table: str
    column: str
    target_table: str
    on_delete: str
    name: str
    field: str  # the PocketBase field, for reports


@dataclass(frozen=True)
class Index:
    name: str
    table: str
    unique: bool
    sql: str  # CREATE ... IF NOT EXISTS, schema placeholder {schema}
    columns: tuple[str, ...]
    exprs: tuple[str, ...]  # quoted columns, lower(...) for NOCASE
    where: str | None


@dataclass
class Table:
    collection: Collection
    name: str
    columns: list[Column]
    junctions: list[Junction] = field(default_factory=list)
    foreign_keys: list[ForeignKey] = field(default_factory=list)
    indexes: list[Index] = field(default_factory=list)

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    def converters(self, has_secrets: bool = True) -> list[Converter]:
        return [converter_for(c.field, has_secrets=has_secrets) for c in self.columns]


@dataclass
class Plan:
    tables: list[Table]
    derived: dict[str, str]  # view name -> SELECT (with {schema})
    skipped: list[tuple[str, str]]  # (collection, reason)
    warnings: list[str]
    has_secrets: bool = True

    def table_for(self, collection: str) -> Table:
        for t in self.tables:
            if t.collection.name == collection:
                return t
        raise MappingError(f"collection {collection!r} is not part of this migration")

    def table_named(self, name: str) -> Table:
        for t in self.tables:
            if t.name == name:
                return t
        raise MappingError(f"no target table {name!r}")


def _default(f: Field, ptype: str) -> str | None:
    if ptype == "text" and f.type not in ("select", "file", "relation"):
        return "''"
    if ptype == "text[]":
        return "'{}'"
    if ptype in ("bigint", "double precision"):
        return "0"
    if ptype == "boolean":
        return "false"
    if ptype == "point":
        return "'(0,0)'"
    return None


def _nullable(f: Field, ptype: str, has_secrets: bool) -> bool:
    if f.name == "id":
        return False
    if f.secret and not has_secrets:
        return True
    if ptype in ("timestamptz", "jsonb") or (ptype == "text" and f.type in ("select", "file", "relation")):
        return not f.required
    return False


def _check(f: Field, col: str) -> str | None:
    if f.type != "select" or not f.values:
        return None
    values = ql_list(f.values)
    if f.multi:
        return f"{qi(col)} <@ ARRAY[{values}]::text[]"
    return f"{qi(col)} IN ({values})"


def build_plan(catalog: Catalog, mapping: Mapping, *, collections: list[str] | None = None,
               has_secrets: bool = True) -> Plan:
    """Decide every target table, column, type, junction, foreign key and index."""
    validate_mapping(mapping, catalog)
    wanted = set(collections or ())
    unknown = wanted - {c.name for c in catalog.collections}
    if unknown:
        name = sorted(unknown)[0]
        raise MappingError(f"param collections: unknown collection {name!r}"
                           + closest(name, [c.name for c in catalog.collections]))
    skipped: list[tuple[str, str]] = []
    derived = dict(mapping.derive)
    chosen: list[Collection] = []
    for coll in catalog.collections:
        cmap = mapping.for_collection(coll.name)
        view = next((n for n in (coll.name, cmap.table or coll.name) if n in derived), None)
        if coll.is_view:
            skipped.append((coll.name, "view collection: reported, not copied"))
        elif coll.is_internal:
            skipped.append((coll.name, "PocketBase system collection"))
        elif coll.name in mapping.skip:
            skipped.append((coll.name, "skipped by the mapping"))
        elif view is not None:  # the view replaces the collection of its name
            skipped.append((coll.name, f"derived as view {view!r}, not copied"))
        elif wanted and coll.name not in wanted:
            skipped.append((coll.name, "not in the param collections"))
        else:
            chosen.append(coll)
    table_of = {c.id: mapping.for_collection(c.name).table or c.name for c in chosen}
    table_of.update({c.name: table_of[c.id] for c in chosen})
    warnings: list[str] = []
    tables = [_table(c, mapping, table_of, has_secrets, warnings) for c in chosen]
    _check_unique_names(tables, derived)
    return Plan(tables, derived, skipped, warnings, has_secrets)


def _table(coll: Collection, mapping: Mapping, table_of: dict[str, str], has_secrets: bool,
           warnings: list[str]) -> Table:
    cmap = mapping.for_collection(coll.name)
    tname = table_of[coll.id]
    columns: list[Column] = []
    junctions: list[Junction] = []
    fks: list[ForeignKey] = []
    for pos, f in enumerate(coll.fields):
        if f.name in cmap.skip_fields:
            continue
        if f.type == "relation" and f.multi:
            spec = cmap.junctions.get(f.name)
            jt = (spec.table if spec and spec.table else f"{tname}_{f.name}")
            target_table = table_of.get(f.target or "")
            if target_table is None:
                warnings.append(f"{coll.name}.{f.name}: target collection {f.target!r} is not migrated; "
                                "junction rows keep ids without a foreign key")
            junctions.append(Junction(f, jt, spec.owner if spec else "owner_id",
                                      spec.target if spec else "target_id", pos, target_table))
            continue
        name = cmap.rename.get(f.name, f.name)
        ptype = cmap.types.get(f.name) or pg_type(f)
        columns.append(Column(f, name, ptype, _nullable(f, ptype, has_secrets), _default(f, ptype),
                              _check(f, name), pos))
        if f.type == "relation":
            target_table = table_of.get(f.target or "")
            if target_table is None:
                warnings.append(f"{coll.name}.{f.name}: target collection {f.target!r} is not migrated; "
                                "no foreign key")
            else:
                on_delete = "CASCADE" if f.cascade_delete else ("RESTRICT" if f.required else "SET NULL")
                fks.append(ForeignKey(tname, name, target_table, on_delete, f"fk_{tname}_{name}"[:63], f.name))
    table = Table(coll, tname, columns, junctions, fks)
    table.indexes = translate_indexes(coll, table, warnings)
    return table


def _check_unique_names(tables: list[Table], views: dict[str, str]) -> None:
    seen: dict[str, str] = {name: f"the derived view {name!r}" for name in views}
    for t in tables:
        for name in [t.name, *(j.table for j in t.junctions)]:
            if name in seen:
                raise MappingError(f"target table {name!r} is used twice ({seen[name]} and {t.collection.name})")
            seen[name] = t.collection.name
        cols = t.column_names
        dup = {c for c in cols if cols.count(c) > 1}
        if dup:
            raise MappingError(f"table {t.name!r}: column {sorted(dup)[0]!r} appears twice after renames")


# --- SQLite index -> PostgreSQL index ---------------------------------------------------------

INDEX_RE = re.compile(
    r"^\s*CREATE\s+(?P<unique>UNIQUE\s+)?INDEX\s+(?:IF\s+NOT\s+EXISTS\s+)?(?P<name>\S+)\s+ON\s+"
    r"(?P<table>\S+)\s*\((?P<cols>.*?)\)\s*(?:WHERE\s+(?P<where>.+?))?\s*;?\s*$",
    re.IGNORECASE | re.DOTALL,
)
_IDENT = r'(?:`([^`]+)`|"((?:[^"]|"")+)"|\[([^\]]+)\]|([A-Za-z_][A-Za-z0-9_]*))'
_COL_RE = re.compile(rf"^\s*{_IDENT}\s*(COLLATE\s+(\w+))?\s*(ASC|DESC)?\s*$", re.IGNORECASE)
_TOKEN_RE = re.compile(rf"\s*(?:{_IDENT}|('(?:[^']|'')*')|(-?\d+(?:\.\d+)?)|(!=|<>|<=|>=|=|<|>|\(|\)))", re.I)
_WHERE_WORDS = {"and", "or", "not", "is", "null", "true", "false"}


def _unquote(m: re.Match) -> str:
    quoted = m.group(2)
    return m.group(1) or (quoted.replace('""', '"') if quoted else None) or m.group(3) or m.group(4)


def translate_indexes(coll: Collection, table: Table, warnings: list[str]) -> list[Index]:
    out: list[Index] = []
    colname = {c.field.name: c.name for c in table.columns}
    for sql in coll.indexes:
        idx = _translate(sql, table.name, colname)
        if isinstance(idx, str):
            warnings.append(f"{coll.name}: index not carried over ({idx}): {' '.join(sql.split())}")
        else:
            out.append(idx)
    return out


def _translate(sql: str, table: str, colname: dict[str, str]) -> Index | str:
    m = INDEX_RE.match(sql)
    if not m:
        return "not a simple CREATE INDEX"
    name = m.group("name").strip('`"[]')
    parts, cols, exprs = [], [], []
    for raw in _split_columns(m.group("cols")):
        cm = _COL_RE.match(raw)
        if not cm:
            return f"expression {raw.strip()!r} is not a plain column"
        field = _unquote(cm)
        if field not in colname:
            return f"column {field!r} is not a column of the target table"
        expr = qi(colname[field])
        if cm.group(6) and cm.group(6).lower() == "nocase":
            expr = f"lower({expr})"
        exprs.append(expr)
        parts.append(expr + (f" {cm.group(7).upper()}" if cm.group(7) else ""))
        cols.append(colname[field])
    where = None
    if m.group("where"):
        where = _translate_where(m.group("where"), colname)
        if where is None:
            return f"WHERE clause {m.group('where').strip()!r} is not simple enough to translate"
    unique = bool(m.group("unique"))
    pg_name = name[:PG_MAX_IDENT]
    ddl = (f"CREATE {'UNIQUE ' if unique else ''}INDEX IF NOT EXISTS {qi(pg_name)} ON {{schema}}.{qi(table)} "
           f"({', '.join(parts)})" + (f" WHERE {where}" if where else ""))
    return Index(pg_name, table, unique, ddl, tuple(cols), tuple(exprs), where)


def _split_columns(text: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def _translate_where(where: str, colname: dict[str, str]) -> str | None:
    """Only identifiers, literals, comparisons and AND/OR/NOT/IS NULL: anything else is refused."""
    out, pos = [], 0
    while pos < len(where.rstrip()):
        m = _TOKEN_RE.match(where, pos)
        if not m or m.end() == pos:
            return None
        pos = m.end()
        ident = _unquote(m) if any(m.group(i) for i in (1, 2, 3, 4)) else None
        if ident is not None:
            if ident.lower() in _WHERE_WORDS and not m.group(1) and not m.group(2):
                out.append(ident.upper())
            elif ident in colname:
                out.append(qi(colname[ident]))
            else:
                return None
        else:
            out.append(m.group(5) or m.group(6) or m.group(7))
    return " ".join(out)


DANGLING = "dangling relation"  # the reject reasons' common start (reports count them by it)


def dangling_reason(field: str, target: str, *, junction: bool = False) -> str:
    """Why a row whose relation points at no record is rejected: one wording for finalize, the
    re-sync and the reports. `target` is the table (a single relation's collection table)."""
    if junction:
        return f"{DANGLING}: {field} holds an id missing from {target}"
    return f"{DANGLING}: {field} points at a missing {target} record"
