"""Target DDL: the staging schema and its tables, without indexes or constraints but NOT NULL.

Keys, unique and secondary indexes and foreign keys come after the load (finalize): that is faster
for COPY and the only order that works for PocketBase's self-references and cycles. The id
primary key too, since the columnar load: kept up during the COPY, its random-order inserts cost
PostgreSQL 6.2 s of CPU for 1.39M rows against 1.7 s without it, and building it afterwards took
1.3-1.5 s (on two cores, two loads and their backends share the CPU). A retried batch deletes its
id range by a scan then (retries are rare).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from pbmigrate.errors import MappingError
from pbmigrate.pgsql import qi, with_schema
from pbmigrate.plan.model import Junction, Plan, Table


def staging_schema(target_schema: str) -> str:
    return f"{target_schema}_staging"


def previous_schema(target_schema: str) -> str:
    return f"{target_schema}_previous"


def table_ddl(schema: str, table: Table) -> list[str]:
    cols = ",\n    ".join(c.ddl for c in table.columns)
    stmts = [f"CREATE TABLE IF NOT EXISTS {qi(schema)}.{qi(table.name)} (\n    {cols}\n)"]
    stmts.extend(junction_ddl(schema, j) for j in table.junctions)
    return stmts


def junction_ddl(schema: str, j: Junction) -> str:
    return (
        f"CREATE TABLE IF NOT EXISTS {qi(schema)}.{qi(j.table)} (\n"
        f'    {qi(j.owner)} text COLLATE "C" NOT NULL,\n'
        f'    {qi(j.target)} text COLLATE "C" NOT NULL,\n'
        f"    position integer NOT NULL\n)"
    )


def create_schema(conn: psycopg.Connection, schema: str, plan: Plan, *, fresh: bool) -> list[str]:
    """Create the staging schema and every table; `fresh` drops what an earlier run left."""
    created = []
    with conn.transaction():
        if fresh:
            conn.execute(f"DROP SCHEMA IF EXISTS {qi(schema)} CASCADE")
        conn.execute(f"CREATE SCHEMA IF NOT EXISTS {qi(schema)}")
        for table in plan.tables:
            for stmt in table_ddl(schema, table):
                conn.execute(stmt)
            created.append(table.name)
            created.extend(j.table for j in table.junctions)
    return created


def _problem(exc: psycopg.Error) -> str:
    diag = exc.diag
    return (diag.message_primary or str(exc).splitlines()[0]) + (f" ({diag.message_hint})" if diag.message_hint else "")


@contextmanager
def scratch_schema(conn: psycopg.Connection, plan: Plan, mapping_source: str) -> Iterator[str]:
    """Every planned table and derived view, created for real in a throw-away schema inside a
    transaction that is always rolled back: the mapping's type overrides and `derive` SQL are
    tried by PostgreSQL itself in the first task, and nothing is written to the target. Yields
    the schema's name, for further checks inside the same transaction (the cache section)."""
    scratch = f"pbm_check_{uuid.uuid4().hex[:12]}"
    with conn.transaction(force_rollback=True):
        conn.execute(f"CREATE SCHEMA {qi(scratch)}")
        for table in plan.tables:
            for stmt in table_ddl(scratch, table):
                try:
                    with conn.transaction():
                        conn.execute(stmt)
                except psycopg.Error as exc:
                    raise MappingError(f"mapping {mapping_source}: collections.{table.collection.name}: "
                                       f"table {table.name!r} cannot be created: {_problem(exc)}") from None
        for name, select in plan.derived.items():
            try:
                with conn.transaction():
                    conn.execute(f"CREATE VIEW {qi(scratch)}.{qi(name)} AS {with_schema(select, scratch)}")
            except psycopg.Error as exc:
                raise MappingError(f"mapping {mapping_source}: derive.{name}: the SQL fails: {_problem(exc)}") from None
        yield scratch


def schema_exists(conn: psycopg.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (name,)).fetchone() is not None
