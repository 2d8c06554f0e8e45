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
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg

from pbmigrate.context import RunContext, RunParams, checked_run, open_run_source, run_dir, run_plan, source_plan
from pbmigrate.errors import ParamError
from pbmigrate.errors import TargetCutOver as TargetCutOver  # the re-sync DAG skips on it: cut over, not failed

if TYPE_CHECKING:
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


UNITS_PER_SLOT = 2  # a few tasks per slot: balanced by rows, without a task start-up per range


def load_slots() -> int:
    """Batch tasks the executor runs at once (`PBM_LOAD_SLOTS`; 2 for this project's LocalExecutor;
    the workers' total concurrency under Celery), so that packing never starves a worker."""
    return max(1, int(os.environ.get("PBM_LOAD_SLOTS", "2")))


def plan_batches(run: dict, api: dict | None = None, max_batches: int | None = None,
                 slots: int | None = None) -> list[dict]:
    """Id ranges of `batch_size` rows per collection, packed into load tasks of about equal rows,
    each named for the UI as `collection [first..last]`.

    Each range stays a ledger batch of its own (its own transaction, skipped once done, cleared
    on a retry); a task loads its ranges one after the other. A task costs a few seconds of start-up
    here (process, imports, plan), so one task per range left slots idle between short batches:
    neighbouring ranges of a collection are joined up to 1 / (`UNITS_PER_SLOT` x slots) of all
    rows, and tasks come largest first (schedulers start mapped tasks in map index order).
    `max_batches` is Airflow's max_map_length: more mapped tasks than that cannot be expanded."""
    from pbmigrate.audit import metrics
    from pbmigrate.source import plan_ranges

    run = checked_run(run)
    source = open_run_source(run, api)
    try:
        plan = run_plan(run, source)
        ranges = []
        for t in plan.tables:
            planned = plan_ranges(source, t.collection, run["params"]["batch_size"])
            for r in planned:
                ranges.append({"collection": t.collection.name, "lo": r.lo, "hi": r.hi, "rows": r.rows,
                               "label": f"{t.collection.name} [{r.lo}..{r.hi}]"})
            rows = sum(r.rows for r in planned)
            log.info("%s: %d rows in %d batches", t.collection.name, rows, len(planned))
            metrics.push_plan(t.collection.name, rows, len(planned), run["run_id"])
    finally:
        source.close()
    units = pack_ranges(ranges, (slots or load_slots()) * UNITS_PER_SLOT)
    if max_batches and len(units) > max_batches:
        raise ParamError(f"{len(units)} load tasks exceed Airflow's max_map_length ({max_batches}); "
                         + batch_size_hint(ranges, max_batches))
    log.info("%d batches in %d load tasks: %s", len(ranges), len(units), [u["rows"] for u in units])
    return units


def batch_size_hint(ranges: list[dict], max_tasks: int) -> str:
    """What to change so that at most `max_tasks` load tasks remain: the smallest batch_size whose
    ranges (a task holds one or more of them) number no more than that, if there is one."""
    rows: dict[str, int] = {}
    for r in ranges:
        rows[r["collection"]] = rows.get(r["collection"], 0) + r["rows"]
    if len(rows) > max_tasks:
        return (f"{len(rows)} collections have rows and each needs a task of its own: raise max_map_length "
                "or name fewer collections per run")
    lo, hi = 1, max(max(rows.values(), default=1), 1)
    while lo < hi:  # the fewest ranges a size gives: one per started batch_size of each collection
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if sum(-(-n // mid) for n in rows.values()) <= max_tasks else (mid + 1, hi)
    return f"raise batch_size to {lo} or more"


def pack_ranges(ranges: list[dict], tasks: int) -> list[dict]:
    """Neighbouring ranges of one collection (in plan order, which is id order) joined into units
    of at most total / `tasks` rows (a range larger than that stays alone), labelled
    `collection [first lo..last hi]`; units largest first."""
    limit = max(1, -(-sum(r["rows"] for r in ranges) // max(1, tasks)))
    units: list[dict] = []
    for r in ranges:
        last = units[-1] if units else None
        if last and last["collection"] == r["collection"] and last["rows"] + r["rows"] <= limit:
            last["ranges"].append(r)
            last["rows"] += r["rows"]
        else:
            units.append({"collection": r["collection"], "rows": r["rows"], "ranges": [r]})
    for u in units:
        first, end = u["ranges"][0], u["ranges"][-1]
        u["label"] = f"{u.pop('collection')} [{first['lo']}..{end['hi']}]"
    return sorted(units, key=lambda u: -u["rows"])  # stable: equal sizes keep the plan's order


def run_batch(run: dict, batch: dict, pg_url: str, api: dict | None = None) -> dict:
    """Load one unit of `plan_batches` (or a single range): each range in its own transaction."""
    from pbmigrate.audit import metrics
    from pbmigrate.audit.guard import target_lock
    from pbmigrate.load.batch import load_batch

    run = checked_run(run)
    ranges = batch.get("ranges") or [batch]
    source = open_run_source(run, api)
    results = []
    try:
        plan = run_plan(run, source)
        with target_lock(pg_url, run["target_schema"], shared=True, holder="pbmigrate migration"), \
                psycopg.connect(pg_url) as conn:
            for r in ranges:
                table = plan.table_for(r["collection"])
                result = load_batch(conn, source, table, run_id=run["run_id"], schema=run["staging_schema"],
                                    lo=r["lo"], hi=r["hi"], has_secrets=source.has_secrets)
                conn.commit()  # each range durable on its own: a later failure keeps it done
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
    if len(results) > 1:
        log.info("%s", unit_line(results))
    return {"label": batch["label"], "rows_read": sum(r["rows_read"] for r in results),
            "rows_loaded": sum(r["rows_loaded"] for r in results), "batches": results}


def unit_line(results: list[dict]) -> str:
    """The task's one-line summary when it loaded several ranges: the batches' own line over the
    task's span (its ranges are neighbours of one collection, in id order)."""
    from pbmigrate.load.batch import BatchResult

    def total(key: str) -> Any:
        return sum(r[key] for r in results)

    whole = BatchResult(results[0]["collection"], results[0]["table"], results[0]["lo"], results[-1]["hi"],
                        total("rows_read"), total("rows_loaded"), total("rows_rejected"), total("junction_rows"),
                        checksum="", seconds=total("seconds"))
    return f"{whole.log_line()} ({len(results)} batches)"


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


def warm(run: dict, section: str, *, pg_url: str, redis_url: str) -> dict:
    from pbmigrate.cache import warmup

    return warmup.warm_run(checked_run(run), section, pg_url=pg_url, redis_url=redis_url)


def validate(run: dict, pg_url: str, api: dict | None = None, files: dict | None = None) -> dict:
    from pbmigrate.validate import quality

    return quality.validate_run(checked_run(run), pg_url, api=api, files=files)


def gate(run: dict, pg_url: str, max_reject_ratio: float) -> dict:
    from pbmigrate.cutover import promote

    return promote.gate(checked_run(run), pg_url, max_reject_ratio)


def decide(verdict: dict, mode: str = "auto", **branches: str) -> str:
    """The task id the branch follows: cut over (or `cut_over=`), hold or roll back."""
    from pbmigrate.cutover import promote

    return promote.decide(verdict, mode, **branches)


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

