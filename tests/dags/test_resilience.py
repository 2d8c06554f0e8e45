"""Retries and resumes: a killed connection, an interrupted run re-triggered.

PostgreSQL itself misbehaves here: an event trigger attaches a row trigger to a staging table as
the DAG creates it. That trigger either kills its own backend in the middle of the COPY (once: a
sequence survives the rollback) or raises until the test removes it.
"""

from __future__ import annotations

import psycopg
import pytest

from tests.compare import assert_migrated
from tests.dags.test_migration_dag import _plan

ATTACH = """
CREATE FUNCTION pbm_test_attach() RETURNS event_trigger LANGUAGE plpgsql AS $$
DECLARE r record;
BEGIN
  FOR r IN SELECT * FROM pg_event_trigger_ddl_commands() WHERE command_tag = 'CREATE TABLE' LOOP
    IF r.object_identity LIKE '%%_staging.{table}' THEN
      EXECUTE format('CREATE TRIGGER pbm_test BEFORE INSERT ON %s FOR EACH ROW EXECUTE FUNCTION {func}()',
                     r.object_identity);
    END IF;
  END LOOP;
END $$;
CREATE EVENT TRIGGER pbm_test_attach ON ddl_command_end EXECUTE FUNCTION pbm_test_attach();
"""
KILL_ONCE = """
CREATE SEQUENCE pbm_test_kill;
CREATE FUNCTION pbm_test_kill() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF nextval('pbm_test_kill') = 2 THEN PERFORM pg_terminate_backend(pg_backend_pid()); END IF;
  RETURN NEW;
END $$;
"""
OUTAGE = """
CREATE FUNCTION pbm_test_outage() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'simulated outage'; END $$;
"""


def _ledger(url: str, target: str) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT b.run_id, b.collection, b.lo, b.finished_at FROM pbm_meta.batches b JOIN pbm_meta.runs r "
            "USING (run_id) WHERE r.target_schema = %s ORDER BY 2, 3", (target,)).fetchall()


def test_batch_whose_connection_is_killed_mid_copy_succeeds_on_retry_without_duplicates(
        run_dag, fresh_pg_url, fixture_022):
    with psycopg.connect(fresh_pg_url, autocommit=True) as conn:
        conn.execute(KILL_ONCE)
        conn.execute(ATTACH.format(table="demo1", func="pbm_test_kill"))
    dr = run_dag("pocketbase_migration", {"source_path": str(fixture_022), "mapping": "", "target_schema": "kill",
                                          "cutover": "manual"},
                 pg_url=fresh_pg_url)
    assert dr.state == "success"
    tries = {ti.map_index: ti.try_number for ti in dr.get_task_instances() if ti.task_id == "data.load"}
    assert sorted(tries.values()).count(2) == 1  # exactly one batch needed its retry
    with psycopg.connect(fresh_pg_url) as conn:
        assert conn.execute("SELECT nextval('pbm_test_kill')").fetchone()[0] > 3  # it really fired, then reloaded
        run_id = conn.execute("SELECT run_id FROM pbm_meta.runs WHERE target_schema = 'kill'").fetchone()[0]
        ids = conn.execute("SELECT count(*), count(DISTINCT id) FROM kill_staging.demo1").fetchone()
        ledger = conn.execute("SELECT count(*) FROM pbm_meta.batches WHERE run_id = %s AND collection = 'demo1'",
                              (run_id,)).fetchone()
    assert ids == (3, 3) and ledger == (1,)
    assert assert_migrated(str(fixture_022 / "data.db"), fresh_pg_url, "kill_staging",
                           _plan(fixture_022 / "data.db"), run_id) == 22


def test_interrupted_run_retriggered_resumes_and_skips_finished_batches(
        run_dag, fresh_pg_url, fixture_022, monkeypatch: pytest.MonkeyPatch):
    with psycopg.connect(fresh_pg_url, autocommit=True) as conn:
        conn.execute(OUTAGE)
        conn.execute(ATTACH.format(table="demo5", func="pbm_test_outage"))
    monkeypatch.setenv("PBM_RETRIES", "0")
    conf = {"source_path": str(fixture_022), "mapping": "", "target_schema": "resume", "batch_size": 2,
            "cutover": "manual"}
    first = run_dag("pocketbase_migration", conf, pg_url=fresh_pg_url)
    assert first.state == "failed"
    before = _ledger(fresh_pg_url, "resume")
    assert before and not any(c == "demo5" for _, c, _, _ in before)

    with psycopg.connect(fresh_pg_url, autocommit=True) as conn:  # the outage is over
        conn.execute("DROP EVENT TRIGGER pbm_test_attach")
        conn.execute("DROP TRIGGER pbm_test ON resume_staging.demo5")
    second = run_dag("pocketbase_migration", conf, pg_url=fresh_pg_url)
    assert second.state == "success"
    after = _ledger(fresh_pg_url, "resume")
    assert {r[0] for r in after} == {before[0][0]}  # the same migration run, resumed
    assert set(before) <= set(after)  # finished batches were not loaded again (same finished_at)
    assert any(c == "demo5" for _, c, _, _ in after)
    assert assert_migrated(str(fixture_022 / "data.db"), fresh_pg_url, "resume_staging",
                           _plan(fixture_022 / "data.db"), before[0][0]) == 22
