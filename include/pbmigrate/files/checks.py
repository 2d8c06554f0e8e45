"""Validation's `files` check: every file name in the migrated tables has its object, re-read, with
the size and sha256 read from the source and PocketBase's own md5 where `.attrs` had one."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg

from pbmigrate.audit.meta import Check, ensure_meta
from pbmigrate.files.copy import EXAMPLES, WORKERS
from pbmigrate.files.ledger import read_ledger
from pbmigrate.files.refs import Ref, file_tables, target_refs
from pbmigrate.files.store import FileStore, open_store, store_config
from pbmigrate.plan.model import Plan, Table

log = logging.getLogger("pbmigrate.files")


def check_table_files(conn: psycopg.Connection, store: FileStore, table: Table, run_id: str, schema: str,
                      workers: int = WORKERS) -> dict[str, Any]:
    """Every file name the table holds: its object re-read, size and sha256 equal to the ledger's
    (what was read from the source), and PocketBase's md5 where `.attrs` had one. A name the
    ledger records as missing is a reject (the gate counts it); a name with no ledger row at all,
    or an object that is absent or differs, fails the check."""
    started = time.monotonic()
    coll = table.collection.name
    refs = target_refs(conn, schema, table)
    ledger = read_ledger(conn, run_id, coll)
    counts = {"files": len(refs), "bytes": 0, "verified": 0, "rejected": 0, "unrecorded": 0, "missing_objects": 0,
              "size_mismatch": 0, "sha256_mismatch": 0, "md5_mismatch": 0, "md5_checked": 0}
    examples: list[str] = []
    to_read = []
    for ref in refs:
        row = ledger.get(ref)
        if row is None:
            counts["unrecorded"] += 1
            examples.append(f"{ref.record_id}.{ref.field} {ref.name}: no ledger row")
        elif row[0] != "done":
            counts["rejected"] += 1
        else:
            to_read.append((ref, row))

    def read(item: tuple[Ref, tuple]) -> tuple[Ref, tuple, tuple | None]:
        ref, row = item
        return ref, row, store.digest(row[4])

    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="pbm-files-check") as pool:
        for ref, (_, size, sha, md5, key), got in pool.map(read, to_read):
            label = f"{ref.record_id}.{ref.field} {ref.name}"
            if got is None:
                counts["missing_objects"] += 1
                examples.append(f"{label}: no object {key}")
                continue
            bad = False
            if got[0] != size:
                counts["size_mismatch"] += 1
                examples.append(f"{label}: {got[0]} bytes, ledger {size}")
                bad = True
            if got[1] != sha:
                counts["sha256_mismatch"] += 1
                examples.append(f"{label}: sha256 differs from the source's")
                bad = True
            if md5:
                counts["md5_checked"] += 1
                if got[2] != md5:
                    counts["md5_mismatch"] += 1
                    examples.append(f"{label}: md5 {got[2]} but PocketBase's .attrs says {md5}")
                    bad = True
            if not bad:
                counts["verified"] += 1
                counts["bytes"] += got[0]
    referenced = set(refs)
    counts["stale_ledger_rows"] = sum(1 for r in ledger if r not in referenced)
    failures = counts["unrecorded"] + counts["missing_objects"] + counts["size_mismatch"] + \
        counts["sha256_mismatch"] + counts["md5_mismatch"]
    return {"ok": failures == 0, **counts, "examples": examples[:EXAMPLES], "store": store.describe(),
            "seconds": round(time.monotonic() - started, 3)}


def file_checks(conn: psycopg.Connection, plan: Plan, run: dict, files: dict | str | None = None) -> list[Any]:
    """Validation's `files` check per table with file fields (recorded with the others in pbm_meta.checks)."""
    tables = file_tables(plan)
    if not tables:
        return []
    ensure_meta(conn)
    store = open_store(store_config(files, run["target_schema"]))
    checks = []
    for t in tables:
        obs = check_table_files(conn, store, t, run["run_id"], run["staging_schema"])
        ok = obs.pop("ok")
        checks.append(Check(t.name, "files", ok, obs))
        log.info("files of %s: %d names, %d verified (%d bytes), %d rejected, %s", t.name, obs["files"],
                 obs["verified"], obs["bytes"], obs["rejected"], "ok" if ok else f"FAILED {obs['examples']}")
    return checks
