"""Per-batch checksums on the target side, and ledger adjustments.

`pbm_meta.batches.source_checksum` is what the batch loaded; `checksum` is what the target must
hash to for that id range. They differ only where finalize rejected a row (orphan, duplicate) or
nulled a dangling relation, and finalize records each such change here with its exact digest.
Validation recomputes `target_sums` inside PostgreSQL and compares with `checksum`.
"""

from __future__ import annotations

import psycopg

from pbmigrate import checksum
from pbmigrate.pgsql import qi
from pbmigrate.plan.model import Junction, Table

_IN_BATCH = ('JOIN pbm_meta.batches b ON b.run_id = %s AND b.collection = %s '
             'AND {id} >= (b.lo COLLATE "C") AND {id} <= (b.hi COLLATE "C")')


def row_digest_sql(table: Table, alias: str = "x") -> str:
    cols = [(checksum.sql_value(f"{alias}.{qi(c.name)}", c.type, c.canon), c.canon) for c in table.columns]
    return checksum.sql_row_digest(cols)


def junction_digest_sql(j: Junction, alias: str = "x") -> str:
    return checksum.sql_junction_digest(j.table, f"{alias}.{qi(j.owner)}", f"{alias}.{qi(j.target)}")


def _sums(conn: psycopg.Connection, sql: str, args: tuple) -> dict[str, int]:
    return {lo: int(total) for lo, total in conn.execute(sql, args) if total is not None}


def merge_sums(*parts: dict) -> dict:
    """Sums per batch start, added key by key."""
    out: dict = {}
    for part in parts:
        for lo, v in part.items():
            out[lo] = out.get(lo, 0) + v
    return out


def row_sums(conn: psycopg.Connection, schema: str, table: Table, run_id: str, ids_sql: str | None = None,
             args: tuple = ()) -> dict[str, int]:
    """Digest sums of table rows per batch (only ids from `ids_sql` when given)."""
    where = f"WHERE x.id IN ({ids_sql})" if ids_sql else ""
    sql = (f"SELECT b.lo, sum({row_digest_sql(table)})::text FROM {qi(schema)}.{qi(table.name)} x "
           f"{_IN_BATCH.format(id='x.id')} {where} GROUP BY b.lo")
    return _sums(conn, sql, (run_id, table.collection.name, *args))


def junction_sums(conn: psycopg.Connection, schema: str, table: Table, run_id: str, owners_sql: str | None = None,
                  args: tuple = (), only: Junction | None = None) -> dict[str, int]:
    """Per-owner junction digests summed per owner's batch (only owners from `owners_sql` if given)."""
    parts = []
    for j in table.junctions:
        if only is not None and j is not only:
            continue
        owner = f"x.{qi(j.owner)}"
        where = f"WHERE {owner} IN ({owners_sql})" if owners_sql else ""
        sql = (f"SELECT b.lo, sum(o.d)::text FROM (SELECT {owner} AS owner, {junction_digest_sql(j)} AS d "
               f"FROM {qi(schema)}.{qi(j.table)} x {where} GROUP BY {owner}) o "
               f"{_IN_BATCH.format(id='o.owner')} GROUP BY b.lo")
        parts.append(_sums(conn, sql, (*args, run_id, table.collection.name)))
    return merge_sums(*parts)


def target_sums(conn: psycopg.Connection, schema: str, table: Table, los: list[str]) -> dict[str | None, int]:
    """What the target holds per batch (`los`: the batch starts, sorted in "C" order), the figure
    validation compares with the ledger: the sum of `target_sum_parts`, run one after another."""
    return merge_sums(*(run_part(conn, part, los) for part in target_sum_parts(schema, table)))


def target_sum_parts(schema: str, table: Table) -> list[str]:
    """The queries behind `target_sums`, one for the table's rows and one per junction table: each
    is one aggregate, so validation can run them on connections of their own (a junction's ordered
    arrays cost more than its owner's rows). Rows are bucketed with `width_bucket` over the batch
    starts instead of a range join: a third less work on large tables. Rows below the first batch
    land under None (no batch can explain them); rows between two batches count in the earlier
    one, so they show up as a mismatch there."""
    s = qi(schema)
    parts = [f"SELECT width_bucket(x.id, %(los)s::text[]) AS b, {row_digest_sql(table)} AS d "
             f"FROM {s}.{qi(table.name)} x"]
    for j in table.junctions:
        owner = f"x.{qi(j.owner)}"
        parts.append(f"SELECT width_bucket(o.owner, %(los)s::text[]) AS b, o.d FROM (SELECT {owner} AS owner, "
                     f"{junction_digest_sql(j)} AS d FROM {s}.{qi(j.table)} x GROUP BY {owner}) o")
    return parts


def run_part(conn: psycopg.Connection, part: str, los: list[str]) -> dict[str | None, int]:
    """One of `target_sum_parts`: its sum per batch start (None: below the first batch)."""
    return {los[bucket - 1] if bucket else None: int(total)
            for bucket, total in conn.execute(f"SELECT b, sum(d)::text FROM ({part}) p GROUP BY b", {"los": los})}


def owner_sums(conn: psycopg.Connection, schema: str, table: Table, run_id: str, ids_sql: str,
               args: tuple = ()) -> dict[str, int]:
    """Rows from `ids_sql` plus their junction rows: what rejecting those rows removes."""
    return merge_sums(row_sums(conn, schema, table, run_id, ids_sql, args),
                  junction_sums(conn, schema, table, run_id, ids_sql, args))


def adjust(conn: psycopg.Connection, run_id: str, collection: str, deltas: dict[str, int]) -> None:
    """Move each batch's expected checksum by `delta` (mod 2**64)."""
    for lo, delta in deltas.items():
        if not delta:
            continue
        (current,) = conn.execute(
            "SELECT checksum FROM pbm_meta.batches WHERE run_id = %s AND collection = %s AND lo = %s",
            (run_id, collection, lo),
        ).fetchone()
        conn.execute(
            "UPDATE pbm_meta.batches SET checksum = %s WHERE run_id = %s AND collection = %s AND lo = %s",
            (checksum.as_hex(int(current, 16) + delta), run_id, collection, lo),
        )


def negate(sums: dict[str, int]) -> dict[str, int]:
    return {lo: -v for lo, v in sums.items()}


def difference(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return merge_sums(after, negate(before))
