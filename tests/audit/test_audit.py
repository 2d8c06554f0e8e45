"""pbm_meta comes from one ordered list of migrations: once each, in order, safe when tasks race,
and a database an earlier pbmigrate created table by table comes up to date."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import psycopg

from pbmigrate.audit import meta, migrations


def tables(conn: psycopg.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'pbm_meta'")}


def test_every_pbm_meta_table_comes_from_the_migrations_once_in_order(fresh_pg_url):
    with psycopg.connect(fresh_pg_url, autocommit=True) as conn:
        assert migrations.applied(conn) == [] and not meta.exists(conn)
        first = migrations.migrate(conn)
        assert first == [name for name, _ in migrations.MIGRATIONS] == migrations.applied(conn)
        assert first == sorted(first)  # applied() reads them back in the list's order
        assert {"runs", "batches", "rejects", "orphans", "checks", "cutovers", "watermarks", "resyncs",
                "backups", "flags", "files", "migrations"} <= tables(conn)
        assert migrations.migrate(conn) == []  # nothing left to do
        assert meta.exists(conn)


def test_racing_tasks_apply_each_migration_once(fresh_pg_url):
    def one(_: int) -> list[str]:
        with psycopg.connect(fresh_pg_url, autocommit=True) as conn:
            return migrations.migrate(conn)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(4)))
    assert sorted(len(r) for r in results) == [0, 0, 0, len(migrations.MIGRATIONS)]


def test_a_database_made_by_an_earlier_version_comes_up_to_date(fresh_pg_url):
    """Before the list, each module created its own tables (no pbm_meta.migrations): the same DDL
    (IF NOT EXISTS) applies over them, rows kept."""
    core = migrations.MIGRATIONS[0][1]
    with psycopg.connect(fresh_pg_url, autocommit=True) as conn:
        conn.execute(core)
        conn.execute("INSERT INTO pbm_meta.runs (run_id, target_schema, staging_schema, source, source_kind, "
                     "status) VALUES ('old', 'live', 'live_staging', 'x', 'sqlite', 'promoted')")
        assert migrations.migrate(conn) == [name for name, _ in migrations.MIGRATIONS]
        assert conn.execute("SELECT status FROM pbm_meta.runs").fetchall() == [("promoted",)]
        assert "watermarks" in tables(conn) and conn.execute(
            "SELECT 1 FROM information_schema.columns WHERE table_schema = 'pbm_meta' "
            "AND table_name = 'watermarks' AND column_name = 'run_id'").fetchone()


def test_a_batch_row_says_when_it_was_written_not_when_its_transaction_began(fresh_pg_url):
    """The data phase's seconds run from the first batch's start to the last one's finish: a
    batch's finished_at must be the time its row was written, after its COPY."""
    with psycopg.connect(fresh_pg_url) as conn:
        migrations.migrate(conn)
        conn.execute("SELECT pg_sleep(0.2)")  # the COPY, in the batch's own transaction
        conn.execute("INSERT INTO pbm_meta.batches (run_id, collection, target_table, lo, hi, rows_read, "
                     "rows_loaded, rows_rejected, source_checksum, checksum, status) "
                     "VALUES ('r', 'c', 't', 'a', 'z', 1, 1, 0, '0', '0', 'done')")
        began, finished = conn.execute("SELECT now(), finished_at FROM pbm_meta.batches").fetchone()
        assert (finished - began).total_seconds() >= 0.2
