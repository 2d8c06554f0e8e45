"""The audit schema `pbm_meta`: runs, batches (the ledger), rejects, checks, cut-overs, watermarks.

Runbooks and dashboards query these names; add columns freely, rename nothing.
"""

from __future__ import annotations

import json
from typing import Any

import psycopg

META_DDL = """
CREATE SCHEMA IF NOT EXISTS pbm_meta;
CREATE TABLE IF NOT EXISTS pbm_meta.runs (
    run_id          text PRIMARY KEY,
    dag_run_id      text,
    target_schema   text NOT NULL,
    staging_schema  text NOT NULL,
    source          text NOT NULL,
    source_kind     text NOT NULL,
    snapshot_path   text,
    params          jsonb NOT NULL DEFAULT '{}',
    status          text NOT NULL,
    started_at      timestamptz NOT NULL DEFAULT now(),
    finished_at     timestamptz,
    assessment      jsonb,
    report          jsonb
);
CREATE TABLE IF NOT EXISTS pbm_meta.batches (
    run_id          text NOT NULL,
    collection      text NOT NULL,
    target_table    text NOT NULL,
    lo              text NOT NULL,
    hi              text NOT NULL,
    rows_read       bigint NOT NULL,
    rows_loaded     bigint NOT NULL,
    rows_rejected   bigint NOT NULL,
    junction_rows   bigint NOT NULL DEFAULT 0,
    source_checksum text NOT NULL,          -- what the batch loaded
    checksum        text NOT NULL,          -- what the target must hash to (after finalize)
    status          text NOT NULL,
    seconds         double precision,
    rows_per_s      double precision,
    finished_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, collection, lo)
);
CREATE TABLE IF NOT EXISTS pbm_meta.rejects (
    id              bigserial PRIMARY KEY,
    run_id          text NOT NULL,
    collection      text NOT NULL,
    record_id       text,
    field           text,
    reason          text NOT NULL,
    stage           text NOT NULL DEFAULT 'load',
    batch_lo        text,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS rejects_run_collection_idx ON pbm_meta.rejects (run_id, collection);
CREATE TABLE IF NOT EXISTS pbm_meta.orphans (
    run_id          text NOT NULL,
    collection      text NOT NULL,
    field           text NOT NULL,
    target          text NOT NULL,
    mode            text NOT NULL,
    count           bigint NOT NULL,
    examples        text[] NOT NULL DEFAULT '{}',
    PRIMARY KEY (run_id, collection, field)
);
CREATE TABLE IF NOT EXISTS pbm_meta.checks (
    id              bigserial PRIMARY KEY,
    run_id          text NOT NULL,
    target_table    text NOT NULL,
    check_name      text NOT NULL,
    success         boolean NOT NULL,
    observed        jsonb,
    checked_at      timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS pbm_meta.cutovers (
    id              bigserial PRIMARY KEY,
    run_id          text,
    target_schema   text NOT NULL,
    action          text NOT NULL,
    backend         text NOT NULL,
    previous_schema text,
    reason          text,
    at              timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS pbm_meta.watermarks (
    target_schema   text NOT NULL,
    collection      text NOT NULL,
    updated_at      timestamptz,
    synced_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (target_schema, collection)
);
"""

LOCK_KEY = 0x70626D6D  # "pbmm": serialises concurrent first-time creation of pbm_meta objects


def exists(conn: psycopg.Connection) -> bool:
    """Whether pbm_meta has been created here (looking writes nothing)."""
    return conn.execute("SELECT to_regclass('pbm_meta.runs') IS NOT NULL").fetchone()[0]


def ensure_meta(conn: psycopg.Connection) -> None:
    """Create pbm_meta if needed (idempotent, safe when parallel tasks race)."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
        conn.execute(META_DDL)


def start_run(conn: psycopg.Connection, run: dict[str, Any]) -> None:
    with conn.transaction():
        conn.execute(
            """INSERT INTO pbm_meta.runs (run_id, dag_run_id, target_schema, staging_schema, source,
                   source_kind, snapshot_path, params, status)
               VALUES (%(run_id)s, %(dag_run_id)s, %(target_schema)s, %(staging_schema)s, %(source)s,
                   %(source_kind)s, %(snapshot_path)s, %(params)s, 'running')
               ON CONFLICT (run_id) DO UPDATE SET dag_run_id = EXCLUDED.dag_run_id, status = 'running',
                   finished_at = NULL""",
            {**run, "params": json.dumps(run.get("params", {}))},
        )


def set_run_status(conn: psycopg.Connection, run_id: str, status: str, finished: bool = False) -> None:
    with conn.transaction():
        conn.execute(
            "UPDATE pbm_meta.runs SET status = %s, finished_at = CASE WHEN %s THEN now() END WHERE run_id = %s",
            (status, finished, run_id),
        )


def save_run_json(conn: psycopg.Connection, run_id: str, column: str, value: Any) -> None:
    if column not in ("assessment", "report"):
        raise ValueError(column)
    with conn.transaction():
        conn.execute(f"UPDATE pbm_meta.runs SET {column} = %s WHERE run_id = %s", (json.dumps(value), run_id))


def resumable_run(conn: psycopg.Connection, target_schema: str, params: dict[str, Any]) -> dict | None:
    """The latest unfinished run for this target with the same params: re-triggering resumes it."""
    row = conn.execute(
        """SELECT run_id, snapshot_path, params, status FROM pbm_meta.runs
            WHERE target_schema = %s ORDER BY started_at DESC LIMIT 1""",
        (target_schema,),
    ).fetchone()
    if row is None or row[3] not in ("running", "failed") or row[2] != params:
        return None
    return {"run_id": row[0], "snapshot_path": row[1]}


def done_batches(conn: psycopg.Connection, run_id: str) -> set[tuple[str, str]]:
    rows = conn.execute(
        "SELECT collection, lo FROM pbm_meta.batches WHERE run_id = %s AND status = 'done'", (run_id,)
    ).fetchall()
    return {(c, lo) for c, lo in rows}
