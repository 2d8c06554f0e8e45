"""Which file names the migrated tables hold: one Ref per (record, field, name), read from the
target, so the copy and the proof follow what was loaded, not what the source holds now."""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

from pbmigrate.pgsql import qi, ql
from pbmigrate.plan.model import Column, Plan, Table


def file_columns(table: Table) -> list[Column]:
    return [c for c in table.columns if c.field.type == "file"]


@dataclass(frozen=True)
class Ref:
    record_id: str
    field: str  # the PocketBase field name
    name: str


def _refs_sql(schema: str, table: Table, where: str) -> str:
    parts = []
    for c in file_columns(table):
        value = f"unnest(x.{qi(c.name)})" if c.type.endswith("[]") else f"x.{qi(c.name)}"
        parts.append(f"SELECT x.id, {ql(c.field.name)} AS field, {value} AS name "
                     f"FROM {qi(schema)}.{qi(table.name)} x WHERE {where}")
    return "SELECT id, field, name FROM (" + " UNION ALL ".join(parts) + ") r WHERE name IS NOT NULL AND name <> ''"


def id_range(col: str, lo: str | None, hi: str | None) -> tuple[str, tuple]:
    clauses, args = [], []
    if lo is not None:
        clauses.append(f'{col} >= (%s::text COLLATE "C")')
        args.append(lo)
    if hi is not None:
        clauses.append(f'{col} <= (%s::text COLLATE "C")')
        args.append(hi)
    return " AND ".join(clauses) or "true", tuple(args)


def target_refs(conn: psycopg.Connection, schema: str, table: Table, lo: str | None = None,
                hi: str | None = None) -> list[Ref]:
    """Every file name the migrated table holds for ids in [lo, hi], one per (record, field, name)."""
    if not file_columns(table):
        return []
    where, args = id_range("x.id", lo, hi)
    n = len(file_columns(table))
    sql = _refs_sql(schema, table, where)
    return [Ref(r, f, name) for r, f, name in conn.execute(sql, args * n)]




def file_tables(plan: Plan) -> list[Table]:
    return [t for t in plan.tables if file_columns(t)]
