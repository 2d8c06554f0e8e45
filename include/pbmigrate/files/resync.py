"""Re-sync of files, in the re-sync's own transaction after its rows: copy what new or changed
records name, forget what deleted records or replaced files named, delete those objects after commit."""

from __future__ import annotations

import logging
from typing import Any

import psycopg

from pbmigrate.audit.meta import ensure_meta
from pbmigrate.files.copy import WORKERS, CopyResult, copy_refs
from pbmigrate.files.ledger import STAGE, read_ledger
from pbmigrate.files.refs import file_tables, target_refs
from pbmigrate.files.source import open_storage
from pbmigrate.files.store import open_store, store_config
from pbmigrate.plan.model import Plan

log = logging.getLogger("pbmigrate.files")


def resync_files(conn: psycopg.Connection, source: Any, plan: Plan, run: dict, schema: str,
                 files: dict | str | None = None) -> list[str]:
    """Inside the re-sync's transaction, after its rows: copy the files the target names and the
    ledger lacks (new or changed records), forget those it no longer names (deleted records,
    replaced files). Returns the keys to delete once the transaction has committed: deleting
    before would leave rows of a rolled-back re-sync pointing at nothing."""
    tables = file_tables(plan)
    if not tables:
        return []
    ensure_meta(conn)
    store = open_store(store_config(files, run["target_schema"]))
    storage = open_storage(run, source)
    run_id = run["run_id"]
    doomed: list[str] = []
    store.write_index({t.collection.id: t.collection.name for t in tables})
    for t in tables:
        coll = t.collection
        refs = set(target_refs(conn, schema, t))
        ledger = read_ledger(conn, run_id, coll.name)
        gone = [r for r in ledger if r not in refs]
        new = sorted((r for r in refs if ledger.get(r, ("missing",))[0] != "done"),
                     key=lambda r: (r.record_id, r.field, r.name))
        touched = sorted({r.record_id for r in gone} | {r.record_id for r in new})
        if touched:
            conn.execute("DELETE FROM pbm_meta.rejects WHERE run_id = %s AND collection = %s AND stage = %s "
                         "AND record_id = ANY(%s)", (run_id, coll.name, STAGE, touched))
        if gone:
            with conn.cursor() as cur:
                cur.executemany("DELETE FROM pbm_meta.files WHERE run_id = %s AND collection = %s AND record_id = %s "
                                "AND field = %s AND name = %s",
                                [(run_id, coll.name, r.record_id, r.field, r.name) for r in gone])
            doomed += [ledger[r][4] for r in gone if ledger[r][0] == "done"]
        result = CopyResult(coll.name, None, None, files=len(refs))
        if new:
            copy_refs(conn, storage, store, coll, new, run_id, result, workers=WORKERS if store.local else 2)
        if new or gone:
            log.info("re-sync files of %s: copied %d (%d bytes), removed %d, missing %d", coll.name, result.copied,
                     result.bytes_copied, len(gone), result.missing)
    return doomed


def delete_objects(keys: list[str], run: dict, files: dict | str | None = None) -> int:
    """Remove objects no record names any more (after the re-sync committed)."""
    if not keys:
        return 0
    store = open_store(store_config(files, run["target_schema"]))
    for key in keys:
        store.delete(key)
    return len(keys)
