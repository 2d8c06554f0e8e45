"""Load one id range of one collection: convert, COPY, record rejects and the ledger row, in one
transaction.

A retried batch first removes whatever an earlier attempt of the same range left, and a batch
whose ledger row already says `done` is skipped, so retries and re-triggered runs never duplicate
or lose a row.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from typing import Any

import psycopg

from pbmigrate import checksum, fused, pgcopy
from pbmigrate.columnar.batch import copy_batch
from pbmigrate.convert import Reject, multi
from pbmigrate.plan import Table, qi
from pbmigrate.sources import Source

log = logging.getLogger(__name__)
PATH_ENV = "PBM_BATCH_PATH"  # "columnar" (Arrow batches, the default) or "rows" (the per-row loop)
SPOOL_BYTES = 32 * 1024 * 1024  # junction rows beyond this spill to disk: bounded memory


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


def columnar_path() -> bool:
    return os.environ.get(PATH_ENV, "columnar") != "rows"


def _reject_all(row: tuple, table: Table, convs: list) -> list[tuple[str, str]]:
    """Convert every field of a failing row to report each bad field, not just the first."""
    problems = []
    for col, conv in zip(table.columns, convs):
        try:
            conv(row[col.position])
        except Reject as r:
            problems.append((r.field, r.reason))
    for j in table.junctions:
        try:
            multi(j.field)(row[j.position])
        except Reject as r:
            problems.append((r.field, r.reason))
    return problems or [("?", "row failed to convert")]


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
    with conn.transaction(), ExitStack() as stack:
        spools = {j.table: JunctionSpool() for j in table.junctions}
        for spool in spools.values():
            stack.callback(spool.close)
        clear_range(conn, schema, table, run_id, lo, hi)
        if columnar_path():
            read, loaded, total, junction_rows, rejects = copy_batch(conn, source, table, schema, lo, hi,
                                                                     has_secrets)
        else:
            read, loaded, total, junction_rows, rejects = _copy_rows(conn, source, table, schema, lo, hi,
                                                                     has_secrets, spools)
            for j in table.junctions:
                spools[j.table].copy_to(conn, schema, j)
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


def _copy_rows(conn: psycopg.Connection, source: Source, table: Table, schema: str, lo: str, hi: str,
               has_secrets: bool, spools: dict) -> tuple[int, int, int, int, list]:
    """The hot loop: convert, COPY, checksum; junction rows go to their spools as COPY text."""
    convs = table.converters(has_secrets)
    convert = fused.row_function(table, convs)
    junctions = [(j, multi(j.field), spools[j.table]) for j in table.junctions]
    digest, jdigest = checksum.digest, checksum.junction_digest
    binary = pgcopy.can_use_binary(table)
    if binary:
        pgcopy.register(conn)
    total = read = loaded = junction_rows = 0
    rejects: list[tuple[str, str, str]] = []
    with conn.cursor() as cur, cur.copy(pgcopy.copy_sql(schema, table, binary)) as copy:
        if binary:
            copy.set_types([c.type for c in table.columns])
        for row in source.rows(table.collection, lo, hi, ordered=False):
            read += 1
            try:
                out, canon = convert(row)
                jrows = [(j, m(row[j.position]), spool) for j, m, spool in junctions]
            except Reject:
                rejects.extend((str(row[0]), f, r) for f, r in _reject_all(row, table, convs))
                continue
            copy.write_row(out)
            loaded += 1
            total += digest(canon)
            owner = out[0]
            for j, ids, spool in jrows:
                if ids:
                    total += jdigest(j.table, owner, ids)
                    junction_rows += len(ids)
                    spool.add(owner, ids, _needs_escape(row[j.position], owner))
    for spool in spools.values():
        spool.flush()
    return read, loaded, total, junction_rows, rejects


def _needs_escape(raw: object, owner: str) -> bool:
    """JSON escapes tab, newline and backslash, so ids from a raw JSON array without a backslash
    hold none of the characters COPY text must escape; anything else is escaped to be safe."""
    if type(raw) is not str or not raw.startswith("[") or "\\" in raw:
        return True
    return "\\" in owner or not owner.isprintable()


class JunctionSpool:
    """Junction rows as COPY text lines, buffered in memory, then on disk past SPOOL_BYTES."""

    def __init__(self) -> None:
        self.file = tempfile.SpooledTemporaryFile(SPOOL_BYTES, mode="w+")  # noqa: SIM115 - closed by close()
        self.lines: list[str] = []

    def add(self, owner: str, ids: list[str], escape: bool) -> None:
        if escape:
            owner, ids = pgcopy.text_field(owner), [pgcopy.text_field(i) for i in ids]
        self.lines.extend(f"{owner}\t{target}\t{pos}\n" for pos, target in enumerate(ids))
        if len(self.lines) >= 10_000:
            self.flush()

    def flush(self) -> None:
        self.file.write("".join(self.lines))
        self.lines.clear()

    def copy_to(self, conn: psycopg.Connection, schema: str, j) -> None:
        self.file.seek(0)
        sql = f"COPY {qi(schema)}.{qi(j.table)} ({qi(j.owner)}, {qi(j.target)}, position) FROM STDIN"
        with conn.cursor() as cur, cur.copy(sql) as copy:
            while chunk := self.file.read(1 << 20):
                copy.write(chunk)

    def close(self) -> None:
        self.file.close()


def _record_rejects(conn: psycopg.Connection, run_id: str, collection: str, lo: str, rejects: list) -> None:
    if not rejects:
        return
    with conn.cursor() as cur:
        cur.executemany(
            """INSERT INTO pbm_meta.rejects (run_id, collection, record_id, field, reason, stage, batch_lo)
               VALUES (%s, %s, %s, %s, %s, 'load', %s)""",
            [(run_id, collection, rid, f, r, lo) for rid, f, r in rejects],
        )
