"""`pbm_meta.files`: one row per file name a migrated record holds (done, with size, sha256 and
PocketBase's md5; or missing, with its reason), written with the copy so a retry skips what is
done. Its DDL lives here alone (one constant, one ensure function)."""

from __future__ import annotations

from dataclasses import dataclass

import psycopg

from pbmigrate.files.refs import Ref

STAGE = "files"  # pbm_meta.rejects.stage of a file that could not be copied



def has_ledger(conn: psycopg.Connection) -> bool:
    return conn.execute("SELECT to_regclass('pbm_meta.files') IS NOT NULL").fetchone()[0]


@dataclass
class Outcome:
    """What became of one file name: a ledger row to be."""

    ref: Ref
    key: str
    status: str  # done | missing
    size: int | None = None
    sha256: str | None = None
    md5: str | None = None
    content_type: str | None = None
    reason: str | None = None
    adopted: bool = False  # found complete in the store (an earlier attempt copied it)


def ledger_rows(run_id: str, coll: str, store: str, outcomes: list[Outcome]) -> list[tuple]:
    return [(run_id, coll, o.ref.record_id, o.ref.field, o.ref.name, store, o.key, o.size, o.sha256, o.md5,
             o.content_type, o.status, o.reason) for o in outcomes]


LEDGER_UPSERT = """
INSERT INTO pbm_meta.files (run_id, collection, record_id, field, name, store, key, size, sha256, md5,
                            content_type, status, reason)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (run_id, collection, record_id, field, name) DO UPDATE SET store = EXCLUDED.store, key = EXCLUDED.key,
    size = EXCLUDED.size,
    sha256 = EXCLUDED.sha256, md5 = EXCLUDED.md5, content_type = EXCLUDED.content_type, status = EXCLUDED.status,
    reason = EXCLUDED.reason, copied_at = now()
"""


def record_outcomes(conn: psycopg.Connection, run_id: str, coll: str, store: str, outcomes: list[Outcome],
                    batch_lo: str | None = None) -> None:
    """Ledger rows, and a reject per file the source lacks (never a secret: names and ids only)."""
    if not outcomes:
        return
    with conn.cursor() as cur:
        cur.executemany(LEDGER_UPSERT, ledger_rows(run_id, coll, store, outcomes))
        missing = [o for o in outcomes if o.status != "done"]
        if missing:
            cur.executemany(
                "INSERT INTO pbm_meta.rejects (run_id, collection, record_id, field, reason, stage, batch_lo) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s)",
                [(run_id, coll, o.ref.record_id, o.ref.field, o.reason, STAGE, batch_lo) for o in missing])



def read_ledger(conn: psycopg.Connection, run_id: str, coll: str) -> dict[Ref, tuple]:
    """(status, size, sha256, md5, key) per file name the ledger holds for a collection."""
    return {Ref(r, f, n): (status, size, sha, md5, key) for r, f, n, status, size, sha, md5, key in conn.execute(
        "SELECT record_id, field, name, status, size, sha256, md5, key FROM pbm_meta.files "
        "WHERE run_id = %s AND collection = %s", (run_id, coll))}


def files_report(conn: psycopg.Connection, run_id: str) -> dict[str, dict[str, int]]:
    """Per collection: files copied and their bytes, and files missing from the source."""
    if not has_ledger(conn):
        return {}
    return {c: {"files": int(n), "bytes": int(b or 0), "missing": int(m)} for c, n, b, m in conn.execute(
        "SELECT collection, count(*) FILTER (WHERE status = 'done'), sum(size) FILTER (WHERE status = 'done'), "
        "count(*) FILTER (WHERE status <> 'done') FROM pbm_meta.files WHERE run_id = %s GROUP BY 1 ORDER BY 1",
        (run_id,))}

