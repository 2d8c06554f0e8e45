"""The `files` task group's copy: each file name of an id range from the source's storage into the
store, its ledger row (or reject) written every LEDGER_ROWS files. A retry skips what the ledger
holds and adopts what the store holds complete, so a kill mid-collection copies nothing twice."""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import psycopg

from pbmigrate.audit.guard import target_lock
from pbmigrate.audit.meta import ensure_meta
from pbmigrate.context import open_run_source, run_plan, source_plan
from pbmigrate.errors import ParamError
from pbmigrate.files.ledger import STAGE, Outcome, record_outcomes
from pbmigrate.files.refs import Ref, file_columns, file_tables, id_range, target_refs
from pbmigrate.files.source import MissingFile, Storage, open_storage, unsafe_name
from pbmigrate.files.store import FileStore, open_store, store_config
from pbmigrate.plan.model import Table
from pbmigrate.source.catalog import Collection

log = logging.getLogger("pbmigrate.files")

LEDGER_ROWS = 1000  # outcomes written to pbm_meta.files per transaction
# concurrent copies per task: file creation, I/O and hashing release the GIL (creating many small
# files is filesystem metadata work, which overlaps well); PBM_FILES_WORKERS to tune
WORKERS = int(os.environ.get("PBM_FILES_WORKERS", "4"))
EXAMPLES = 5


@dataclass
class CopyResult:
    collection: str
    lo: str | None
    hi: str | None
    files: int = 0
    copied: int = 0
    bytes_copied: int = 0
    skipped: int = 0  # already in the ledger
    adopted: int = 0
    missing: int = 0
    seconds: float = 0.0
    examples: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("collection", "lo", "hi", "files", "copied", "bytes_copied", "skipped",
                                              "adopted", "missing", "seconds", "examples")}

    def log_line(self) -> str:
        rate = self.bytes_copied / self.seconds / 1e6 if self.seconds else 0.0
        return (f"files {self.collection} [{self.lo}..{self.hi}]: {self.files:,} names, copied {self.copied:,} "
                f"({self.bytes_copied:,} bytes, {rate:.1f} MB/s), already done {self.skipped:,}, adopted "
                f"{self.adopted:,}, missing {self.missing:,} in {self.seconds:.2f} s")


def copy_one(storage: Storage, store: FileStore, coll: Collection, ref: Ref) -> Outcome:
    """One file from the source into the store, unless the store holds it complete already."""
    key = store.key(coll.name, ref.record_id, ref.name)
    bad = unsafe_name(ref.record_id, ref.name)
    if bad:
        return Outcome(ref, key, "missing", reason=f"bad file name: {bad}")
    have = store.head(key) if store.local else None  # S3 keeps no sha256 to adopt: copy again
    if have is not None:  # an earlier attempt's complete copy: adopted if the source agrees
        source = storage.fingerprint(coll, ref.record_id, ref.name)
        if source is None or (source[0] == have.size and source[1] == have.md5):
            return Outcome(ref, key, "done", have.size, have.sha256, have.md5, have.content_type, adopted=True)
    try:
        src, attrs = storage.open(coll, ref.record_id, ref.name)
    except MissingFile as exc:
        return Outcome(ref, key, "missing", reason=str(exc))
    with src:
        size, sha = store.put(key, src, content_type=attrs["content_type"], original_name=attrs["original_name"],
                              md5=attrs["md5"])
    return Outcome(ref, key, "done", size, sha, attrs["md5"], attrs["content_type"])


def copy_refs(conn: psycopg.Connection, storage: Storage, store: FileStore, coll: Collection,
              refs: Iterable[Ref], run_id: str, result: CopyResult, batch_lo: str | None = None,
              workers: int = WORKERS) -> None:
    """Copy `refs`, writing their ledger rows (and rejects) every LEDGER_ROWS files, in order."""
    pending: list[Outcome] = []

    def flush() -> None:
        with conn.transaction():
            record_outcomes(conn, run_id, coll.name, store.describe(), pending, batch_lo)
        pending.clear()

    def account(o: Outcome) -> None:
        if o.status != "done":
            result.missing += 1
            if len(result.examples) < EXAMPLES:
                result.examples.append(f"{o.ref.record_id}.{o.ref.field}: {o.reason}")
        elif o.adopted:
            result.adopted += 1
        else:
            result.copied += 1
            result.bytes_copied += o.size or 0
        pending.append(o)
        if len(pending) >= LEDGER_ROWS:
            flush()

    for o in _in_order(storage, store, coll, refs, workers, LEDGER_ROWS):
        account(o)
    if pending:
        flush()


def _in_order(storage: Storage, store: FileStore, coll: Collection, refs: Iterable[Ref], workers: int,
              ahead: int) -> Iterator[Outcome]:
    """The outcomes of `refs` in their order, `workers` copies at a time. Up to `ahead` copies are
    queued beyond the one the caller waits for, so the workers keep copying while the caller writes
    the ledger, and memory does not grow with the range."""
    if workers <= 1:
        yield from (copy_one(storage, store, coll, ref) for ref in refs)
        return
    window: deque[Future[Outcome]] = deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="pbm-files") as pool:
        try:
            for ref in refs:
                window.append(pool.submit(copy_one, storage, store, coll, ref))
                if len(window) > ahead:
                    yield window.popleft().result()
            while window:
                yield window.popleft().result()
        finally:
            for f in window:  # a copy or the ledger failed: queued copies are not started
                f.cancel()


def copy_range(conn: psycopg.Connection, storage: Storage, store: FileStore, table: Table, *,
               run_id: str, schema: str, lo: str | None, hi: str | None, workers: int = WORKERS) -> CopyResult:
    """The files of one id range of one migrated table. A retry skips what the ledger holds and
    settles again what an earlier attempt found missing (the file may have come back)."""
    started = time.monotonic()
    coll = table.collection
    result = CopyResult(coll.name, lo, hi)
    refs = target_refs(conn, schema, table, lo, hi)
    result.files = len(refs)
    where, args = id_range("record_id", lo, hi)
    with conn.transaction():
        conn.execute(f"DELETE FROM pbm_meta.files WHERE run_id = %s AND collection = %s AND status <> 'done' "
                     f"AND {where}", (run_id, coll.name, *args))
        conn.execute(f"DELETE FROM pbm_meta.rejects WHERE run_id = %s AND collection = %s AND stage = %s AND {where}",
                     (run_id, coll.name, STAGE, *args))
    done = {Ref(r, f, n) for r, f, n in conn.execute(
        f"SELECT record_id, field, name FROM pbm_meta.files WHERE run_id = %s AND collection = %s AND {where}",
        (run_id, coll.name, *args))}
    todo = [r for r in refs if r not in done]
    result.skipped = len(refs) - len(todo)
    copy_refs(conn, storage, store, coll, todo, run_id, result, lo, workers)
    result.seconds = round(time.monotonic() - started, 3)
    return result


def plan_file_batches(run: dict, pg_url: str, api: dict | None = None, max_batches: int | None = None,
                      files: dict | str | None = None) -> list[dict]:
    """The data phase's id ranges of every collection with file fields (largest first), one
    mapped task each: the ranges the ledger proves loaded, so the names come from the target.
    Also writes the store's id -> name index, here, once, before the copies run in parallel."""
    plan = source_plan(run, api)
    wanted = {t.collection.name: t for t in file_tables(plan)}
    if not wanted:
        log.info("no collection of this migration has a file field: nothing to copy")
        return []
    open_store(store_config(files, run["target_schema"])).write_index(
        {t.collection.id: t.collection.name for t in wanted.values()})
    with psycopg.connect(pg_url, autocommit=True) as conn:
        ensure_meta(conn)
        rows = conn.execute(
            "SELECT collection, lo, hi, rows_loaded FROM pbm_meta.batches WHERE run_id = %s AND collection = ANY(%s) "
            "ORDER BY collection, lo COLLATE \"C\"", (run["run_id"], list(wanted))).fetchall()
    batches = [{"collection": c, "lo": lo, "hi": hi, "rows": int(n), "label": f"{c} [{lo}..{hi}]"}
               for c, lo, hi, n in rows]
    if max_batches and len(batches) > max_batches:
        raise ParamError(f"{len(batches)} file batches exceed Airflow's max_map_length ({max_batches}); "
                         "raise batch_size")
    for name, t in wanted.items():
        cols = ", ".join(c.field.name for c in file_columns(t))
        log.info("%s: file fields %s in %d ranges", name, cols, sum(1 for b in batches if b["collection"] == name))
    batches.sort(key=lambda b: -b["rows"])
    return batches


def copy_batch(run: dict, batch: dict, pg_url: str, files: dict | str | None = None,
               api: dict | None = None) -> dict:
    """One mapped task of the `files` group: the files of one id range, into the store."""
    store = open_store(store_config(files, run["target_schema"]))
    source = open_run_source(run, api)
    try:
        plan = run_plan(run, source)
        table = plan.table_for(batch["collection"])
        storage = open_storage(run, source)
        with target_lock(pg_url, run["target_schema"], shared=True, holder="pbmigrate migration"), \
                psycopg.connect(pg_url, autocommit=True) as conn:
            ensure_meta(conn)
            result = copy_range(conn, storage, store, table, run_id=run["run_id"], schema=run["staging_schema"],
                                lo=batch["lo"], hi=batch["hi"], workers=WORKERS if store.local else 2)
    finally:
        source.close()
    log.info("%s (from %s to %s)", result.log_line(), storage.describe(), store.describe())
    return result.as_dict()

