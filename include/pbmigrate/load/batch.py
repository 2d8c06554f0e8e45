"""Load one id range of one collection: convert, COPY, record rejects and the ledger row, in one
transaction. The rows move as Arrow record batches (`columnar`), a chunk at a time.

A retried batch first removes whatever an earlier attempt of the same range left, and a batch
whose ledger row already says `done` is skipped, so retries and re-triggered runs never duplicate
or lose a row.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import psycopg

from pbmigrate import checksum
from pbmigrate.load.columnar.batch import copy_batch
from pbmigrate.pgsql import qi
from pbmigrate.plan.model import Table
from pbmigrate.source import Source

log = logging.getLogger(__name__)


@dataclass
class BatchResult:
    collection: str
    table: str
    lo: str
    hi: str
    rows_read: int
    rows_loaded: int
    rows_rejected: int
    junction_rows: int
    checksum: str
    seconds: float
    skipped: bool = False

    @property
    def rows_per_s(self) -> float:
        return self.rows_read / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def log_line(self) -> str:
        state = "already done, skipped" if self.skipped else f"{self.rows_per_s:,.0f} rows/s"
        return (f"{self.collection} -> {self.table} [{self.lo}..{self.hi}]: read {self.rows_read:,}, "
                f"loaded {self.rows_loaded:,}, rejected {self.rows_rejected:,}, "
                f"junction rows {self.junction_rows:,}; {state}")


def _existing(conn: psycopg.Connection, run_id: str, collection: str, lo: str) -> BatchResult | None:
    row = conn.execute(
        """SELECT target_table, hi, rows_read, rows_loaded, rows_rejected, junction_rows, checksum
             FROM pbm_meta.batches WHERE run_id = %s AND collection = %s AND lo = %s AND status = 'done'""",
        (run_id, collection, lo),
    ).fetchone()
    if row is None:
        return None
    return BatchResult(collection, row[0], lo, row[1], row[2], row[3], row[4], row[5], row[6], 0.0, True)


def clear_range(conn: psycopg.Connection, schema: str, table: Table, run_id: str, lo: str, hi: str) -> None:
    """Remove what an earlier attempt of this range left (same transaction as the reload)."""
    s = qi(schema)
    conn.execute(f'DELETE FROM {s}.{qi(table.name)} WHERE id BETWEEN %s AND %s', (lo, hi))
    for j in table.junctions:
        conn.execute(f"DELETE FROM {s}.{qi(j.table)} WHERE {qi(j.owner)} BETWEEN %s AND %s", (lo, hi))
    conn.execute(
        "DELETE FROM pbm_meta.rejects WHERE run_id = %s AND collection = %s AND stage = 'load' AND batch_lo = %s",
        (run_id, table.collection.name, lo),
    )
    conn.execute("DELETE FROM pbm_meta.batches WHERE run_id = %s AND collection = %s AND lo = %s",
                 (run_id, table.collection.name, lo))


def load_batch(conn: psycopg.Connection, source: Source, table: Table, *, run_id: str, schema: str,
               lo: str, hi: str, has_secrets: bool = True) -> BatchResult:
    """Load the rows of `table.collection` with ids in [lo, hi] into `schema.table`."""
    started = time.monotonic()
    coll = table.collection
    done = _existing(conn, run_id, coll.name, lo)
    if done is not None:
        return done
    with conn.transaction():
        clear_range(conn, schema, table, run_id, lo, hi)
        read, loaded, total, junction_rows, rejects = copy_batch(conn, source, table, schema, lo, hi,
                                                                 has_secrets)
        _record_rejects(conn, run_id, coll.name, lo, rejects)
        result = BatchResult(coll.name, table.name, lo, hi, read, loaded, read - loaded, junction_rows,
                             checksum.as_hex(total), time.monotonic() - started)
        conn.execute(
            """INSERT INTO pbm_meta.batches (run_id, collection, target_table, lo, hi, rows_read, rows_loaded,
                   rows_rejected, junction_rows, source_checksum, checksum, status, seconds, rows_per_s)
               VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, 'done', %s, %s)""",
            (run_id, coll.name, table.name, lo, hi, read, loaded, result.rows_rejected, junction_rows,
             result.checksum, result.checksum, result.seconds, result.rows_per_s),
        )
    return result


def _record_rejects(conn: psycopg.Connection, run_id: str, collection: str, lo: str, rejects: list) -> None:
    if not rejects:
        return
    with conn.cursor() as cur:
        cur.executemany(
            """INSERT INTO pbm_meta.rejects (run_id, collection, record_id, field, reason, stage, batch_lo)
               VALUES (%s, %s, %s, %s, %s, 'load', %s)""",
            [(run_id, collection, rid, f, r, lo) for rid, f, r in rejects],
        )
