"""Every function a DAG task calls, and nothing else calls into the engine from Airflow.

Each takes plain values (URLs, params, the run context) and returns plain, JSON-serialisable values
for XCom, never secrets. The run context (`context.RunContext`) travels between tasks: run_id,
source kind and snapshot, target and staging schema, and the params that shaped it; each task
checks it on arrival. API credentials are not in it; tasks get them from the connection.

The prepare and load steps live here (they only wire the stages together); the other stages'
task functions are one-line calls into their packages, so that this module reads as the pipeline.

Each function imports the stages it calls when it runs, not this module: every Airflow task is a
process of its own that imports this module, and a gate or a branch that loaded the whole engine
(Arrow, DuckDB, GX's helpers, the re-sync) spent about a second on it before doing a thing.
"""

from __future__ import annotations

import logging
import os
import resource
import time
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg

from pbmigrate.context import RunContext, RunParams, checked_run, open_run_source, run_dir, run_plan, source_plan
from pbmigrate.errors import ParamError
from pbmigrate.errors import TargetCutOver as TargetCutOver  # the re-sync DAG skips on it: cut over, not failed

if TYPE_CHECKING:
    from collections.abc import Sequence

    from pbmigrate.plan.mapping import Mapping
    from pbmigrate.plan.model import Plan

log = logging.getLogger("pbmigrate")


def run_params(*, source_path: str, target_schema: str, mapping: str, batch_size: int,
               collections: list[str] | None, orphans: str) -> RunParams:
    """The params that shape a run, checked and normalised (a resumed run must match them)."""
    from pbmigrate.load.finalize import ORPHAN_MODES
    from pbmigrate.source.snapshot import resolve_data_db

    if orphans not in ORPHAN_MODES:
        raise ParamError(f"param orphans must be one of {ORPHAN_MODES}, not {orphans!r}")
    if int(batch_size) < 1:
        raise ParamError("param batch_size must be at least 1")
    return {
        "source_path": str(resolve_data_db(source_path)) if source_path else "",
        "target_schema": target_schema,
        "mapping": mapping or "",
        "batch_size": int(batch_size),
        "collections": sorted(collections or []),
        "orphans": orphans,
    }


def prepare(*, params: RunParams, pg_url: str, dag_run_id: str, api: dict | None = None) -> RunContext:
    """Check the target and the mapping, resume an unfinished run or snapshot the source for a new one.

    Whatever a retry cannot fix fails here, in the first task, before anything is written to the
    target: a missing privilege, a malformed mapping (before the snapshot), a mapping that names
    what the source lacks, a type override or `derive` SQL PostgreSQL refuses, a cache section
    naming a column no table has (the last two tried in a scratch schema that is rolled back)."""
    from pbmigrate.audit import meta
    from pbmigrate.audit.guard import target_lock
    from pbmigrate.plan import ddl
    from pbmigrate.plan.mapping import load_mapping
    from pbmigrate.preflight import check_postgres, safe_url

    check_postgres(pg_url)
    mapping = load_mapping(params["mapping"])
    target = params["target_schema"]
    with target_lock(pg_url, target, shared=True, holder="pbmigrate migration"), \
            psycopg.connect(pg_url, autocommit=True) as conn:
        resumed = meta.resumable_run(conn, target, params) if meta.exists(conn) else None
        kind = "sqlite" if params["source_path"] else "api"
        if resumed and (kind == "api" or Path(resumed["snapshot_path"] or "").is_file()):
            run_id, snapshot, is_resumed = resumed["run_id"], resumed["snapshot_path"], True
            log.info("resuming run %s: finished batches will be skipped", run_id)
        else:
            run_id, is_resumed = dag_run_id, False
            snapshot = _snapshot(params, run_id, api)
        run: RunContext = {
            "run_id": run_id,
            "dag_run_id": dag_run_id,
            "target_schema": target,
            "staging_schema": ddl.staging_schema(target),
            "source": params["source_path"] or safe_url((api or {}).get("url", "")),
            "source_kind": kind,
            "snapshot_path": snapshot,
            # the snapshot holds data.db only: files are read from PocketBase's storage beside it
            "storage_path": str(Path(params["source_path"]).parent / "storage") if kind == "sqlite" else None,
            "params": params,
            "resumed": is_resumed,
        }
        check_mapping(conn, run, mapping, api)
        meta.ensure_meta(conn)
        meta.start_run(conn, run)
    return run


def check_mapping(conn: psycopg.Connection, run: dict, mapping: Mapping, api: dict | None = None) -> Plan:
    """The mapping against this source's catalog, then its DDL, views and cache section tried by
    PostgreSQL in a scratch schema that is rolled back."""
    from pbmigrate.cache import warmup
    from pbmigrate.plan import ddl
    from pbmigrate.plan.model import build_plan

    source = open_run_source(run, api)
    try:
        plan = build_plan(source.catalog(), mapping, collections=run["params"]["collections"],
                          has_secrets=source.has_secrets)
    finally:
        source.close()
    with ddl.scratch_schema(conn, plan, mapping.source) as scratch:
        warmup.check_config(conn, scratch, warmup.parse_cache_config(mapping.cache), mapping.source)
    return plan


def _snapshot(params: dict, run_id: str, api: dict | None) -> str | None:
    from pbmigrate.source.api import ApiSource
    from pbmigrate.source.snapshot import take_snapshot

    dest = run_dir(params["target_schema"], run_id)
    if params["source_path"]:
        snap = take_snapshot(params["source_path"], dest / "data.db")
        log.info("snapshot of %s: %s (%s bytes, %.2f s), quick_check ok", snap.source, snap.path, snap.bytes,
                 snap.seconds)
        return snap.path
    src = ApiSource(**(api or {}))
    try:
        key = src.create_backup(None)
        path = src.download_backup(key, dest / key)
        log.info("API mode: PocketBase backup %s downloaded to %s", key, path)
    finally:
        src.close()
    return None


def create_schema(run: dict, pg_url: str, api: dict | None = None) -> list[str]:
    from pbmigrate.audit.guard import target_lock
    from pbmigrate.plan import ddl

    run = checked_run(run)
    plan = source_plan(run, api)
    for w in plan.warnings:
        log.warning("%s", w)
    with target_lock(pg_url, run["target_schema"], shared=True, holder="pbmigrate migration"), \
            psycopg.connect(pg_url, autocommit=True) as conn:
        tables = ddl.create_schema(conn, run["staging_schema"], plan, fresh=not run["resumed"])
    log.info("staging schema %s: %d tables", run["staging_schema"], len(tables))
    return tables


def load_slots() -> int:
    """Batch tasks the executor runs at once (`PBM_LOAD_SLOTS`; 2 for this project's LocalExecutor;
    the workers' total concurrency under Celery): one load task per slot."""
    return max(1, int(os.environ.get("PBM_LOAD_SLOTS", "2")))


def plan_batches(run: dict, api: dict | None = None, max_batches: int | None = None,
                 slots: int | None = None) -> list[dict]:
    """Id ranges of `batch_size` rows per collection, shared by one load task per slot.

    Each range stays a ledger batch of its own (its own transaction, skipped once done, cleared
    on a retry). Every task walks all ranges, largest first, and loads the next one nobody holds
    (`run_batch`), so both slots stay busy to the end whatever a range costs (rows of one
    collection cost ten times those of another here), with one task start-up per slot.
    `max_batches` is Airflow's max_map_length: no more tasks than that are mapped."""
    from pbmigrate.audit import metrics
    from pbmigrate.source import plan_ranges

    run = checked_run(run)
    source = open_run_source(run, api)
    try:
        plan = run_plan(run, source)
        ranges = []
        for t in plan.tables:
            planned = plan_ranges(source, t.collection, run["params"]["batch_size"])
            ranges += [{"collection": t.collection.name, "lo": r.lo, "hi": r.hi, "rows": r.rows} for r in planned]
            rows = sum(r.rows for r in planned)
            log.info("%s: %d rows in %d batches", t.collection.name, rows, len(planned))
            metrics.push_plan(t.collection.name, rows, len(planned), run["run_id"])
    finally:
        source.close()
    units = share_ranges(ranges, min(slots or load_slots(), max_batches or len(ranges) or 1))
    log.info("%d batches shared by %d load tasks", len(ranges), len(units))
    return units


def share_ranges(ranges: list[dict], tasks: int) -> list[dict]:
    """`tasks` load tasks (fewer when there are fewer ranges), each holding every range, largest
    first (stable: equal sizes keep the plan's order); labelled for the UI."""
    ordered = sorted(ranges, key=lambda r: -r["rows"])
    n = min(tasks, len(ordered))
    rows = sum(r["rows"] for r in ordered)
    return [{"label": f"load {i + 1} of {n}: {len(ordered)} batches, {rows:,} rows, shared", "rows": rows,
             "ranges": ordered, "shared": True} for i in range(n)]


def _claim(conn: psycopg.Connection, run_id: str, r: dict, wait: bool) -> bool:
    """Take the range for this transaction (a lock the commit or a crash releases): without
    `wait`, False when another load task holds it."""
    key = f"pbm-batch/{run_id}/{r['collection']}/{r['lo']}"
    if wait:
        conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (key,))
        return True
    return bool(conn.execute("SELECT pg_try_advisory_xact_lock(hashtextextended(%s, 0))", (key,)).fetchone()[0])


def run_batch(run: dict, batch: dict, pg_url: str, api: dict | None = None) -> dict:
    """Load one unit of `plan_batches` (or a single range): each range in its own transaction.

    A shared unit's ranges are claimed one at a time: a range another task holds is passed over,
    and once through, the task waits for each range it passed over and loads it if that task
    failed, so a task that succeeds leaves every range of the run done."""
    from pbmigrate.audit import metrics
    from pbmigrate.audit.guard import target_lock
    from pbmigrate.load.batch import load_batch

    run = checked_run(run)
    ranges = batch.get("ranges") or [batch]
    shared = bool(batch.get("shared"))
    source = open_run_source(run, api)
    results, done_elsewhere = [], 0
    try:
        plan = run_plan(run, source)
        with target_lock(pg_url, run["target_schema"], shared=True, holder="pbmigrate migration"), \
                psycopg.connect(pg_url) as conn:
            passed = []
            for wait, todo in ((False, ranges), (True, passed)):
                for r in todo:
                    if shared and not _claim(conn, run["run_id"], r, wait):
                        conn.rollback()
                        passed.append(r)
                        continue
                    table = plan.table_for(r["collection"])
                    result = load_batch(conn, source, table, run_id=run["run_id"], schema=run["staging_schema"],
                                        lo=r["lo"], hi=r["hi"], has_secrets=source.has_secrets)
                    conn.commit()  # each range durable on its own: a later failure keeps it done
                    if shared and result.skipped:
                        done_elsewhere += 1
                        continue
                    log.info("%s", result.log_line())
                    if not result.skipped:
                        metrics.push_batch(result.collection, result.rows_read, result.rows_loaded,
                                           result.rows_rejected, result.seconds, run["run_id"],
                                           batch=f"{result.lo}..{result.hi}")
                    results.append(result.as_dict())
    finally:
        source.close()
    if "ranges" not in batch:
        return results[0]
    log.info("this task loaded %d of %d batches (%s rows); %d were done by another task or an earlier attempt",
             len(results), len(ranges), f"{sum(r['rows_read'] for r in results):,}", done_elsewhere)
    return {"label": batch["label"], "rows_read": sum(r["rows_read"] for r in results),
            "rows_loaded": sum(r["rows_loaded"] for r in results), "batches": results,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}  # the budget: 400


def finalize_run(run: dict, pg_url: str, api: dict | None = None) -> dict:
    from pbmigrate.audit import meta, metrics
    from pbmigrate.audit.guard import target_lock
    from pbmigrate.load.finalize import finalize

    run = checked_run(run)
    plan = source_plan(run, api)
    started = time.monotonic()
    with target_lock(pg_url, run["target_schema"], shared=True, holder="pbmigrate migration"), \
            psycopg.connect(pg_url, autocommit=True) as conn:
        report = finalize(conn, run["staging_schema"], plan, run["run_id"], run["params"]["orphans"])
        meta.set_run_status(conn, run["run_id"], "loaded")
        (data_seconds,) = conn.execute(
            "SELECT extract(epoch FROM now() - min(finished_at - seconds * interval '1 second'))::float8 "
            "FROM pbm_meta.batches WHERE run_id = %s", (run["run_id"],)).fetchone()
    report["seconds"] = round(time.monotonic() - started, 3)
    log.info("finalize: %s", report)
    metrics.push_phase("data", data_seconds or report["seconds"], True, run["run_id"])
    return report


# --- the other stages, one call each ------------------------------------------------------------


def assess(run: dict, pg_url: str, api: dict | None = None) -> dict:
    """The pre-migration assessment, recorded with the run; passes the run on."""
    from pbmigrate.validate import assess as validate_assess

    validate_assess.assess_run(checked_run(run), pg_url, api=api)
    return run


def plan_file_batches(run: dict, pg_url: str, api: dict | None = None, max_batches: int | None = None,
                      files: dict | None = None) -> list[dict]:
    from pbmigrate import files as files_stage

    return files_stage.plan_file_batches(checked_run(run), pg_url, api=api, max_batches=max_batches, files=files)


def copy_files(run: dict, batch: dict, pg_url: str, files: dict | None = None, api: dict | None = None) -> dict:
    from pbmigrate import files as files_stage

    return files_stage.copy_batch(checked_run(run), batch, pg_url, files, api=api)


def warm_sections(run: dict, *, pg_url: str, redis_url: str) -> dict:
    """The DAG's cache warm-up: every section of the mapping's cache config, two at a time."""
    from pbmigrate.cache import warmup

    return warmup.warm_sections(checked_run(run), pg_url=pg_url, redis_url=redis_url)


def validate(run: dict, pg_url: str, api: dict | None = None, files: dict | None = None) -> dict:
    from pbmigrate.validate import quality

    return quality.validate_run(checked_run(run), pg_url, api=api, files=files)


def gate(run: dict, pg_url: str, max_reject_ratio: float) -> dict:
    from pbmigrate.cutover import promote

    return promote.gate(checked_run(run), pg_url, max_reject_ratio)


def decide(verdict: dict, mode: str = "auto", **branches: str) -> str:
    """Which end of the migration DAG runs: cut over (or `cut_over=`), hold or roll back."""
    from pbmigrate.cutover import promote

    return promote.decide(verdict, mode, **branches)


def follow(verdict: dict, then: Sequence[str]) -> str | list[str]:
    """The task ids the gate's branch follows: `then`, or roll back."""
    from pbmigrate.cutover import promote

    return promote.follow(verdict, then)


def cut_over(run: dict, pg_url: str, redis_url: str) -> dict:
    from pbmigrate.cutover import promote

    return promote.cut_over_run(checked_run(run), pg_url, redis_url)


def hold(run: dict, pg_url: str) -> dict:
    from pbmigrate.cutover import promote

    return promote.hold_run(checked_run(run), pg_url)


def roll_back(run: dict, pg_url: str, redis_url: str | None, verdict: dict) -> None:
    from pbmigrate.cutover import promote

    promote.roll_back_run(checked_run(run), pg_url, redis_url, verdict)


def loadtest(run: dict, pg_url: str, params: dict, mix: str = "", dag_run_id: str | None = None) -> dict:
    """Param loadtest: the game service on the staging schema against PocketBase on the run's
    snapshot, recorded in pbm_meta.loadtests; with loadtest_gate a miss refuses promotion."""
    from pbmigrate.cutover import loadgate

    return loadgate.loadtest_step(checked_run(run), pg_url, loadgate.options(params, mix), stage="migration",
                                  dag_run_id=dag_run_id)


def loadtest_before_action(action: str, target_schema: str, pg_url: str, params: dict, mix: str = "",
                           dag_run_id: str | None = None) -> dict:
    """`pocketbase_cutover`: the same load test of the run waiting in staging, before action=cutover only."""
    from pbmigrate.cutover import loadgate

    return loadgate.before_action(action, target_schema, pg_url, loadgate.options(params, mix), dag_run_id=dag_run_id)


def cutover_action(action: str, target_schema: str, pg_url: str, redis_url: str | None, reason: str = "") -> dict:
    """`pocketbase_cutover`: promote a held run, or roll the live schema back."""
    from pbmigrate.cutover import promote

    return promote.run_action(action, target_schema, pg_url, redis_url, reason)


def resync(*, source_path: str | None, target_schema: str, mapping: str | None, collections: list[str] | None,
           overlap_seconds: float, force: bool, pg_url: str, resync_id: str, api: dict | None = None,
           files: dict | None = None) -> dict:
    """`pocketbase_resync`: one incremental re-sync of the target's latest loaded run."""
    from pbmigrate import resync as resync_stage

    return resync_stage.run_resync(source_path=source_path, target_schema=target_schema, mapping=mapping,
                                   collections=collections, overlap_seconds=overlap_seconds, force=force,
                                   pg_url=pg_url, resync_id=resync_id, api=api, files=files)


def final_sync(*, source_path: str | None, target_schema: str, mapping: str | None, collections: list[str] | None,
               overlap_seconds: float, pg_url: str, dag_run_id: str, api: dict | None = None,
               files: dict | None = None) -> dict:
    """mode=final: the last re-sync with PocketBase frozen; returns the run context for the gates."""
    from pbmigrate import resync as resync_stage

    return resync_stage.final_sync(source_path=source_path, target_schema=target_schema, mapping=mapping,
                                   collections=collections, overlap_seconds=overlap_seconds, pg_url=pg_url,
                                   dag_run_id=dag_run_id, api=api, files=files)

