"""Every `pbm_meta` table, created by one ordered list of migrations.

Each migration runs once per database, in order, in its own transaction, and is recorded in
`pbm_meta.migrations`. They are written to be idempotent as well (IF NOT EXISTS), so a database
that an earlier version of pbmigrate created piece by piece comes up to date without a conflict.
Add a migration at the end; never edit or reorder one that has shipped: runbooks and dashboards
query these names (add columns freely, rename nothing).
"""

from __future__ import annotations

import psycopg

LOCK_KEY = 0x70626D6D  # "pbmm": serialises concurrent first-time creation across tasks

MIGRATIONS: list[tuple[str, str]] = [
    ("0001_runs_batches_rejects_checks_cutovers_watermarks", """
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
"""),
    ("0002_resyncs", """
CREATE TABLE IF NOT EXISTS pbm_meta.resyncs (
    resync_id       text NOT NULL,
    run_id          text NOT NULL,
    target_schema   text NOT NULL,
    synced_schema   text NOT NULL,
    collection      text NOT NULL,
    target_table    text NOT NULL,
    mode            text NOT NULL,
    rows_read       bigint NOT NULL DEFAULT 0,
    inserted        bigint NOT NULL DEFAULT 0,
    updated         bigint NOT NULL DEFAULT 0,
    deleted         bigint NOT NULL DEFAULT 0,
    rejected        bigint NOT NULL DEFAULT 0,
    ranges_compared integer NOT NULL DEFAULT 0,
    ranges_recopied integer NOT NULL DEFAULT 0,
    watermark       timestamptz,
    seconds         double precision,
    at              timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (resync_id, collection)
);
CREATE INDEX IF NOT EXISTS resyncs_run_idx ON pbm_meta.resyncs (run_id, at);
ALTER TABLE pbm_meta.watermarks ADD COLUMN IF NOT EXISTS run_id text;
"""),
    ("0003_backups_flags", """
CREATE TABLE IF NOT EXISTS pbm_meta.backups (
    id              bigserial PRIMARY KEY,
    run_id          text,
    target_schema   text NOT NULL,
    kind            text NOT NULL,          -- 'schema' (pg_dump -Fc), 'source' (the source snapshot) or
                                            -- 'files' (the list of the store's files the run copied)
    source_name     text NOT NULL,          -- the schema dumped, or the source the snapshot is of
    path            text NOT NULL,
    bytes           bigint,
    seconds         double precision,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS pbm_meta.flags (
    name            text PRIMARY KEY,       -- 'pbm:backend', mirrored from Redis
    value           text NOT NULL,
    target_schema   text,
    run_id          text,
    set_at          timestamptz NOT NULL DEFAULT now()
);
"""),
    ("0004_files", """
CREATE TABLE IF NOT EXISTS pbm_meta.files (
    run_id          text NOT NULL,
    collection      text NOT NULL,
    record_id       text COLLATE "C" NOT NULL,
    field           text NOT NULL,
    name            text NOT NULL,
    store           text NOT NULL,          -- the store's URL, without credentials
    key             text NOT NULL,          -- the object's key under the store's root
    size            bigint,
    sha256          text,                   -- of the bytes read from the source
    md5             text,                   -- PocketBase's .attrs md5 (base64), when it has one
    content_type    text,
    status          text NOT NULL,          -- done | missing
    reason          text,
    copied_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, collection, record_id, field, name)
);
"""),
    # now() is the transaction's start: a batch's row said it finished when its COPY began, and the
    # data phase's seconds (first start to last finish) came out short by the last batch's time
    ("0005_batches_finished_at_clock_time", """
ALTER TABLE pbm_meta.batches ALTER COLUMN finished_at SET DEFAULT clock_timestamp();
"""),
    ("0006_loadtests", """
CREATE TABLE IF NOT EXISTS pbm_meta.loadtests (
    id                      bigserial PRIMARY KEY,
    run_id                  text NOT NULL,
    dag_run_id              text,
    stage                   text NOT NULL,          -- 'migration' (before promote) or 'cutover' (pocketbase_cutover)
    target_schema           text NOT NULL,
    schema_tested           text NOT NULL,          -- the staging schema the service served
    users                   integer NOT NULL,
    duration_s              integer NOT NULL,       -- per step
    mix                     text NOT NULL,
    pocketbase_capacity_rps double precision,       -- NULL: no PocketBase reference (API mode)
    postgres_capacity_rps   double precision,
    improvement             double precision,       -- postgres / pocketbase capacity, same run
    rps                     double precision,       -- the new stack's players run
    p50_ms                  double precision,
    p95_ms                  double precision,
    p99_ms                  double precision,
    error_rate              double precision,
    gate                    boolean NOT NULL,       -- loadtest_gate: a failed verdict refuses promotion
    min_improvement         double precision NOT NULL,
    max_error_rate          double precision NOT NULL,
    passed                  boolean NOT NULL,
    reasons                 jsonb NOT NULL DEFAULT '[]',
    report                  jsonb NOT NULL,         -- the runner's JSON: figures and config, no secrets
    report_path             text,
    seconds                 double precision,
    created_at              timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS loadtests_run_idx ON pbm_meta.loadtests (run_id);
"""),
]

_LEDGER = """
CREATE SCHEMA IF NOT EXISTS pbm_meta;
CREATE TABLE IF NOT EXISTS pbm_meta.migrations (
    name            text PRIMARY KEY,
    applied_at      timestamptz NOT NULL DEFAULT now()
);
"""


def applied(conn: psycopg.Connection) -> list[str]:
    """The migrations this database has, in order (none if pbm_meta is not there)."""
    if not conn.execute("SELECT to_regclass('pbm_meta.migrations') IS NOT NULL").fetchone()[0]:
        return []
    return [r[0] for r in conn.execute("SELECT name FROM pbm_meta.migrations ORDER BY name")]


def migrate(conn: psycopg.Connection) -> list[str]:
    """Bring pbm_meta up to date; returns the migrations applied now. Safe when tasks race: the
    first takes the lock and applies, the others find nothing left to do."""
    done_now = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
        conn.execute(_LEDGER)
        have = {r[0] for r in conn.execute("SELECT name FROM pbm_meta.migrations")}
        for name, ddl in MIGRATIONS:
            if name in have:
                continue
            with conn.transaction():
                conn.execute(ddl)
                conn.execute("INSERT INTO pbm_meta.migrations (name) VALUES (%s)", (name,))
            done_now.append(name)
    return done_now
