"""The re-sync's entry points: one run in one transaction (`resync`), the scheduled task around it
(`run_resync`: lock, snapshot, checks, figures), the final re-sync before cut-over (`final_sync`)
and validation's cue that one has run (`last_resync`).

Collections with `updated` are read from the watermark minus an overlap window (transactions still
in flight when the last snapshot was taken), then their id sets are walked for deletes; the others
are compared range by range (`rangediff`). Everything, watermarks and `pbm_meta.resyncs` included,
is one transaction with deferred constraints: a run lands whole or not at all.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import psycopg
from psycopg import errors as pgerrors

from pbmigrate import files as files_sync
from pbmigrate.audit import meta, metrics
from pbmigrate.audit.guard import target_lock
from pbmigrate.context import safe_name, work_dir
from pbmigrate.errors import ParamError, PbmError
from pbmigrate.load.columnar.read import Chunk
from pbmigrate.pgsql import qi
from pbmigrate.plan.convert import parse_datetime
from pbmigrate.plan.mapping import load_mapping
from pbmigrate.plan.model import Plan, build_plan
from pbmigrate.resync import reads
from pbmigrate.resync.cascade import Cascade, order
from pbmigrate.resync.rangediff import compare
from pbmigrate.resync.reads import pb_timestamp
from pbmigrate.resync.table import RANGE_ROWS, CollectionResult, TableSync
from pbmigrate.resync.target import (
    SyncTarget,
    check_params,
    check_schema,
    recorded_params,
    resolve_target,
)
from pbmigrate.source import Source, open_source
from pbmigrate.source.snapshot import resolve_data_db, take_snapshot, verify_snapshot

log = logging.getLogger("pbmigrate.resync")

DEFAULT_OVERLAP_SECONDS = 300


def _initial_since(conn: psycopg.Connection, sync: TableSync, target: SyncTarget, overlap: timedelta
                   ) -> tuple[datetime | None, str]:
    """The stored watermark of this run, else the newest `updated` the target holds."""
    row = conn.execute(
        "SELECT updated_at, run_id FROM pbm_meta.watermarks WHERE target_schema = %s AND collection = %s",
        (target.target_schema, sync.name),
    ).fetchone()
    mark = row[0] if row is not None and row[1] == target.run_id else None
    if mark is None:
        mark = conn.execute(f"SELECT max({qi(sync.updated_col or 'updated')}) FROM {sync.t}").fetchone()[0]
    if mark is None:
        return None, ""  # an empty target: every row is new
    return mark, pb_timestamp(mark - overlap)


def resync(conn: psycopg.Connection, source: Source, plan: Plan, target: SyncTarget, *, resync_id: str,
           overlap_seconds: float = DEFAULT_OVERLAP_SECONDS, range_rows: int = RANGE_ROWS,
           files: dict | None = None, before_commit: Callable[[], None] | None = None) -> list[CollectionResult]:
    """Bring `target.schema` to what `source` holds, in one transaction; figures per collection.

    `before_commit` runs last inside the transaction: raising there writes nothing."""
    overlap = timedelta(seconds=float(overlap_seconds))
    orphans = target.params.get("orphans", "reject")
    started = time.monotonic()
    with conn.transaction():
        conn.execute("SET CONSTRAINTS ALL DEFERRED")
        run = Cascade(conn, target.schema, target.run_id, orphans, source.has_secrets, plan)
        marks: dict[str, datetime | None] = {}
        syncs = [TableSync(run, t) for t in order(plan)]
        run.syncs.update({sync.table.name: sync for sync in syncs})
        since = {sync.name: _initial_since(conn, sync, target, overlap) for sync in syncs
                 if sync.result.mode == "updated"}

        def changed(i: int) -> Iterator[Chunk] | None:
            """The changed rows of the i-th table; a snapshot starts reading them at once."""
            if i >= len(syncs) or syncs[i].result.mode != "updated":
                return None
            sync = syncs[i]
            return reads.changed_chunks(source, sync.table, sync.updated_field or "", since[sync.name][1])

        ahead = changed(0)
        try:
            for i, sync in enumerate(syncs):
                t0 = time.monotonic()
                if sync.result.mode == "updated":
                    mark, sync.result.since = since[sync.name][0], since[sync.name][1] or None
                    sync.apply(ahead or (), track_updated=True)
                    ahead = changed(i + 1)  # read while this table's ids are walked
                    sync.walk_ids(source, range_rows)
                    new = parse_datetime(sync.max_updated) if sync.max_updated else None
                    marks[sync.name] = max(d for d in (mark, new) if d is not None) if (mark or new) else None
                else:
                    ahead = changed(i + 1)
                    for _ in compare(sync, source, range_rows, repair=True):
                        pass
                    marks[sync.name] = None
                sync.finish_rejects()
                sync.result.seconds = time.monotonic() - t0
        finally:
            reads.close(ahead)
        t0 = time.monotonic()
        run.revive_children(source)
        run.drain()
        run.settle_written()
        try:
            conn.execute("SET CONSTRAINTS ALL IMMEDIATE")
        except pgerrors.ForeignKeyViolation as exc:
            raise PbmError(f"re-sync of {target.schema!r} would leave a dangling reference, nothing was "
                           f"written: {exc.diag.message_primary} {exc.diag.message_detail or ''}") from exc
        settle = time.monotonic() - t0
        # the bytes behind file fields follow the rows, in the same transaction (objects of
        # removed names are deleted once it has committed)
        doomed_files = files_sync.resync_files(conn, source, plan, target.run, target.schema, files)
        results = [run.syncs[t.name].result for t in plan.tables]
        for r in results:
            r.seconds += settle / max(1, len(results))
            r.watermark = pb_timestamp(marks[r.collection]) if marks.get(r.collection) else None
            conn.execute(
                """INSERT INTO pbm_meta.watermarks (target_schema, collection, updated_at, synced_at, run_id)
                   VALUES (%s, %s, %s, now(), %s)
                   ON CONFLICT (target_schema, collection) DO UPDATE SET updated_at = EXCLUDED.updated_at,
                       synced_at = EXCLUDED.synced_at, run_id = EXCLUDED.run_id""",
                (target.target_schema, r.collection, marks.get(r.collection), target.run_id))
            conn.execute(
                """INSERT INTO pbm_meta.resyncs (resync_id, run_id, target_schema, synced_schema, collection,
                       target_table, mode, rows_read, inserted, updated, deleted, rejected, ranges_compared,
                       ranges_recopied, watermark, seconds)
                   VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
                   ON CONFLICT (resync_id, collection) DO UPDATE SET rows_read = EXCLUDED.rows_read,
                       inserted = EXCLUDED.inserted, updated = EXCLUDED.updated, deleted = EXCLUDED.deleted,
                       rejected = EXCLUDED.rejected, ranges_compared = EXCLUDED.ranges_compared,
                       ranges_recopied = EXCLUDED.ranges_recopied, watermark = EXCLUDED.watermark,
                       seconds = EXCLUDED.seconds, at = now()""",
                (resync_id, target.run_id, target.target_schema, target.schema, r.collection, r.table, r.mode,
                 r.rows_read, r.inserted, r.updated, r.deleted, r.rejected, r.ranges_compared, r.ranges_recopied,
                 marks.get(r.collection), r.seconds))
        if before_commit is not None:
            before_commit()
    files_sync.delete_objects(doomed_files, target.run, files)
    log.info("re-sync %s of %s: %.2f s", resync_id, target.schema, time.monotonic() - started)
    return results


class _Beside:
    """A check run in a thread beside the re-sync (the snapshot's quick_check, reading its own
    connection): `wait` joins it and raises what it raised."""

    def __init__(self, check: Callable[[], object]):
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(check,), name="pbm-beside", daemon=True)
        self.thread.start()

    def _run(self, check: Callable[[], object]) -> None:
        try:
            check()
        except BaseException as exc:  # handed to `wait`
            self.error = exc

    def wait(self) -> None:
        self.thread.join()
        if self.error is not None:
            raise self.error


def _warm_duckdb() -> None:
    """DuckDB's first result imports pandas (half a second here): pay it while the snapshot is taken."""
    duckdb.connect().sql("SELECT 1").to_arrow_table()


def vacuum_unvisited(conn: psycopg.Connection, schema: str, plan: Plan) -> list[str]:
    """VACUUM the tables whose visibility map is mostly unset: loaded in bulk and never vacuumed.

    The id walk hashes every range of every table. With the visibility map set that is an
    index-only scan of the primary key; without it every id costs a heap visit (2.4x slower here).
    Autovacuum sets it after a bulk load, when it runs; this does once what it would, after the
    commit (VACUUM cannot run inside a transaction). Tables merely written by a re-sync keep their
    map mostly set and are left to autovacuum: vacuuming their dead rows costs more than it saves.
    """
    rows = conn.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = ANY(%s) AND c.relpages > 0 AND c.relallvisible * 2 < c.relpages",
        (schema, [t.name for t in plan.tables])).fetchall()
    done = []
    for (name,) in rows:
        t0 = time.monotonic()
        conn.execute(f"VACUUM {qi(schema)}.{qi(name)}")
        done.append(name)
        log.info("vacuumed %s.%s (visibility map unset since its load): %.2f s", schema, name,
                 time.monotonic() - t0)
    return done


def resync_dir(target_schema: str) -> Path:
    """Where the re-sync keeps its snapshot: one per target, replaced by every run."""
    return work_dir() / target_schema / "resync"


def run_resync(*, source_path: str | None, target_schema: str, mapping: str | None, collections: list[str] | None,
               pg_url: str,
               resync_id: str, overlap_seconds: float = DEFAULT_OVERLAP_SECONDS, force: bool = False,
               api: dict | None = None, lock_wait_seconds: float = 60.0, range_rows: int = RANGE_ROWS,
               snapshot_name: str = "data.db", files: dict | None = None) -> dict:
    """One re-sync (the `pocketbase_resync` task): snapshot, compare, write, record; a summary.

    `source_path`, `mapping` or `collections` left None take the migration run's values
    (`recorded_params`). Raises TargetCutOver after a cut-over (unless `force`), ResyncRefused
    before any completed load or when the params differ from the migration's; TargetBusy when a
    migration holds the target.
    """
    if float(overlap_seconds) < 0:
        raise ParamError("param overlap_seconds must not be negative")
    started = time.monotonic()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        meta.ensure_meta(conn)
    with target_lock(pg_url, target_schema, wait_seconds=lock_wait_seconds, holder="pbmigrate re-sync"), \
            psycopg.connect(pg_url, autocommit=True,
                            application_name=f"pbmigrate re-sync {target_schema}"[:63]) as conn:
        target = resolve_target(conn, target_schema, force=force)
        source_path, mapping, collections = recorded_params(target, source_path=source_path, mapping=mapping,
                                                            collections=collections)
        check_params(target, mapping=mapping, collections=collections)
        if source_path:  # files are read from the storage beside the data.db this re-sync reads
            target.run["storage_path"] = str(resolve_data_db(source_path).parent / "storage")
        snapshot_path, snapshot_at = None, None
        warm = _Beside(_warm_duckdb)
        verified: _Beside | None = None
        if source_path:
            snap = take_snapshot(source_path, resync_dir(target_schema) / snapshot_name, verify=False)
            verified = _Beside(lambda: verify_snapshot(snap.path))  # must pass before the commit
            snapshot_path, snapshot_at = snap.path, datetime.now(UTC)
            log.info("snapshot of %s: %s (%s bytes, %.2f s)", snap.source, snap.path, snap.bytes, snap.seconds)
            source = open_source(snap.path)
        else:
            if not api:
                raise ParamError("API mode needs the pbm_pocketbase connection (url, email, password)")
            source = open_source(None, **api)
            snapshot_at = datetime.now(UTC)
            log.warning("API mode: every id and changed row is paged through the REST API (slower than a "
                        "snapshot); point source_path at the data.db when the files are reachable")
        try:
            plan = build_plan(source.catalog(), load_mapping(mapping), collections=collections,
                              has_secrets=source.has_secrets)
            check_schema(conn, target.schema, plan)
            results = resync(conn, source, plan, target, resync_id=resync_id, overlap_seconds=overlap_seconds,
                             range_rows=range_rows, files=files,
                             before_commit=verified.wait if verified is not None else None)
            vacuum_unvisited(conn, target.schema, plan)
        except Exception:
            if verified is not None:
                verified.wait()  # a snapshot that failed its check explains any failure best
            raise
        finally:
            for beside in (warm, verified):
                if beside is not None:
                    beside.thread.join()
            with contextlib.suppress(sqlite3.Error, OSError):
                source.close()
    for r in results:
        log.info("%s", r.log_line())
    totals = {k: sum(getattr(r, k) for r in results) for k in ("inserted", "updated", "deleted", "rejected")}
    summary = {
        "resync_id": resync_id,
        "run_id": target.run_id,
        "target_schema": target_schema,
        "schema": target.schema,
        "forced": bool(target.cut_over),
        "snapshot_path": snapshot_path,
        "snapshot_at": snapshot_at.isoformat() if snapshot_at else None,
        "finished_at": datetime.now(UTC).isoformat(),
        "seconds": round(time.monotonic() - started, 3),
        "totals": totals,
        "collections": {r.collection: {k: v for k, v in asdict(r).items() if k != "collection"} for r in results},
    }
    log.info("re-sync of %s into %s: inserted %d, updated %d, deleted %d, rejected %d in %.2f s", target_schema,
             target.schema, totals["inserted"], totals["updated"], totals["deleted"], totals["rejected"],
             summary["seconds"])
    # PostgreSQL now holds PocketBase as of the snapshot: the lag is the snapshot's age.
    lag = (datetime.now(UTC) - snapshot_at).total_seconds() if snapshot_at else 0.0
    for r in results:
        metrics.push_resync(r.collection, r.inserted, r.updated, r.deleted, lag, target.run_id)
    return summary


def final_sync(*, source_path: str | None, target_schema: str, mapping: str | None, collections: list[str] | None,
               pg_url: str,
               dag_run_id: str, overlap_seconds: float = DEFAULT_OVERLAP_SECONDS, api: dict | None = None,
               lock_wait_seconds: float = 600.0, files: dict | None = None) -> dict:
    """The last re-sync before cut-over (`pocketbase_migration` with mode=final), with PocketBase
    frozen: returns the migration's run dict, pointed at this re-sync's snapshot, for the gates.

    `resynced` tells validation that the ledger's batch checksums are stale: compare the target
    with `snapshot_path` through `compare_ranges` instead.
    """
    summary = run_resync(source_path=source_path, target_schema=target_schema, mapping=mapping,
                         collections=collections, pg_url=pg_url, resync_id=f"final:{dag_run_id}",
                         overlap_seconds=overlap_seconds, force=False, api=api, lock_wait_seconds=lock_wait_seconds,
                         snapshot_name=f"final-{safe_name(dag_run_id)}.db",  # its own file: the gates read it
                         files=files)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        target = resolve_target(conn, target_schema)
    run = dict(target.run)
    run.update({"dag_run_id": dag_run_id, "snapshot_path": summary["snapshot_path"] or run["snapshot_path"],
                "resynced": True, "resync": {"resync_id": summary["resync_id"], "totals": summary["totals"]}})
    return run


def last_resync(conn: psycopg.Connection, run_id: str) -> dict | None:
    """The latest re-sync of a migration run (None if none): validation's cue to use compare_ranges."""
    row = conn.execute(
        """SELECT resync_id, max(at), sum(inserted), sum(updated), sum(deleted), sum(rejected)
             FROM pbm_meta.resyncs WHERE run_id = %s GROUP BY resync_id ORDER BY max(at) DESC LIMIT 1""",
        (run_id,),
    ).fetchone()
    if row is None:
        return None
    return {"resync_id": row[0], "at": row[1].isoformat(), "inserted": int(row[2]), "updated": int(row[3]),
            "deleted": int(row[4]), "rejected": int(row[5])}
