"""Where a re-sync may write, and with which params: the latest migration run of a target, refused
when it was cut over, never loaded, or built with other params or another PocketBase schema.

`pbm_meta.resyncs` (what each run did, per collection) is created here, beside the checks that
decide whether a run may start.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import psycopg

from pbmigrate.audit.meta import cut_over_in_effect
from pbmigrate.errors import ResyncRefused, TargetCutOver
from pbmigrate.plan.model import Plan

log = logging.getLogger("pbmigrate.resync")

UNLOADED_STATUSES = frozenset({"running", "failed", "rolled_back", "rolledback"})

@dataclass(frozen=True)
class SyncTarget:
    """Where a re-sync writes: the latest migration run of a target and the schema it loaded."""

    run_id: str
    target_schema: str
    schema: str  # the schema written: staging before cut-over, the live one when forced after
    staging_schema: str
    status: str
    cut_over: bool
    params: dict
    run: dict  # the migration's run dict (pipeline), for the tasks after a final re-sync


def _schema_exists(conn: psycopg.Connection, schema: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone() is not None


def resolve_target(conn: psycopg.Connection, target_schema: str, *, force: bool = False) -> SyncTarget:
    """The schema a re-sync may write, or ResyncRefused saying why not."""
    row = conn.execute(
        """SELECT run_id, dag_run_id, staging_schema, status, params, source, source_kind, snapshot_path, started_at
             FROM pbm_meta.runs WHERE target_schema = %s ORDER BY started_at DESC LIMIT 1""",
        (target_schema,),
    ).fetchone()
    if row is None:
        raise ResyncRefused(f"no migration has loaded target {target_schema!r} yet: run pocketbase_migration "
                            "first (a re-sync keeps a loaded schema current, it does not create one)")
    run_id, dag_run_id, staging, status, params, source, kind, snapshot, started_at = row
    cut = cut_over_in_effect(conn, target_schema)
    # A migration started after the cut-over loaded a new staging schema: re-syncing that one
    # leaves the live schema alone, so the earlier cut-over does not stand in its way.
    newer_load = cut is not None and status != "promoted" and started_at > cut["at"]
    cut_over = status == "promoted" or (cut is not None and not newer_load)
    run = {"run_id": run_id, "dag_run_id": dag_run_id, "target_schema": target_schema, "staging_schema": staging,
           "source": source, "source_kind": kind, "snapshot_path": snapshot, "params": params, "resumed": True}
    if cut_over:
        when = f" at {cut['at']:%Y-%m-%d %H:%M:%S %Z} (run {cut['run_id']})" if cut is not None else ""
        if not force:
            raise TargetCutOver(
                f"target {target_schema!r} was cut over to PostgreSQL{when}: PocketBase is no longer "
                "the source of truth, and a re-sync would overwrite newer PostgreSQL data with PocketBase's. "
                "Pause pocketbase_resync; set the param force=true only if PocketBase is still the system "
                "being written (for example after the flag was flipped back)")
        schema = target_schema
        log.warning("target %s is cut over, re-sync forced: writing the live schema %s", target_schema, schema)
    else:
        if status in UNLOADED_STATUSES:
            raise ResyncRefused(f"the latest migration run {run_id} of target {target_schema!r} has status "
                                f"{status!r}: its load is not complete, so there is nothing to re-sync yet")
        schema = staging
    if not _schema_exists(conn, schema):
        raise ResyncRefused(f"schema {schema!r} of run {run_id} (status {status!r}) does not exist: "
                            "it was dropped or rolled back; run a new full migration")
    return SyncTarget(run_id, target_schema, schema, staging, status, cut_over, params, run)


def recorded_params(target: SyncTarget, *, source_path: str | None, mapping: str | None,
                    collections: list[str] | None) -> tuple[str, str, list[str]]:
    """Each param left None takes the value the migration that built the target ran with.

    A scheduled run has no conf: this is how it re-syncs the right source with the right mapping.
    """
    p = target.params
    chosen = (p.get("source_path", "") if source_path is None else source_path,
              p.get("mapping", "") if mapping is None else mapping,
              list(p.get("collections") or []) if collections is None else list(collections))
    taken = [name for name, given in (("source_path", source_path), ("mapping", mapping),
                                      ("collections", collections)) if given is None]
    if taken:
        log.info("as migration run %s ran: %s", target.run_id,
                 ", ".join(f"{k}={v!r}" for k, v in zip(("source_path", "mapping", "collections"), chosen)
                           if k in taken))
    return chosen


def check_params(target: SyncTarget, *, mapping: str, collections: list[str] | None) -> None:
    """The re-sync must shape rows as the migration that built the schema did."""
    want = {"mapping": mapping or "", "collections": sorted(collections or [])}
    have = {"mapping": target.params.get("mapping", ""), "collections": sorted(target.params.get("collections") or [])}
    for key, value in want.items():
        if value != have[key]:
            raise ResyncRefused(f"param {key}={value!r} differs from the migration run {target.run_id} that built "
                                f"{target.schema!r} ({key}={have[key]!r}); use the same value")


def check_schema(conn: psycopg.Connection, schema: str, plan: Plan) -> None:
    """Refuse when the PocketBase schema moved since the full load (new fields or collections)."""
    cols: dict[str, list[str]] = {}
    for table, column in conn.execute(
            "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = %s "
            "ORDER BY table_name, ordinal_position", (schema,)):
        cols.setdefault(table, []).append(column)
    for t in plan.tables:
        expected = {t.name: t.column_names, **{j.table: [j.owner, j.target, "position"] for j in t.junctions}}
        for name, columns in expected.items():
            have = cols.get(name)
            if have is None:
                raise ResyncRefused(f"{t.collection.name}: table {schema}.{name} does not exist; the PocketBase "
                                    "schema changed since the full load: run a new full migration")
            if sorted(have) != sorted(columns):
                raise ResyncRefused(
                    f"{t.collection.name}: {schema}.{name} has columns {sorted(have)} but the PocketBase schema now "
                    f"maps to {sorted(columns)}; the schema changed since the full load: run a new full migration")
