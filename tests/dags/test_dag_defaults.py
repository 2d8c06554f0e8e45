"""The DAGs run with what the trigger form and the scheduler give them: nulls and no conf at all.

The Airflow 3 form sends null for an empty field, and a scheduled run has no conf. Each test runs
the DAG with dag.test() into a real PostgreSQL database and reads back what it did.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import psycopg
import pytest

TARGET = "game"  # the re-sync's default target_schema: a scheduled run names no other


def _ti_state(dr, task_id: str) -> str:
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        ti = session.query(TaskInstance).filter_by(dag_id=dr.dag_id, run_id=dr.run_id, task_id=task_id).one()
        return str(ti.state)


def _latest_run(pg_url: str, target: str) -> tuple[str, dict]:
    with psycopg.connect(pg_url) as conn:
        return conn.execute("SELECT run_id, params FROM pbm_meta.runs WHERE target_schema = %s "
                            "ORDER BY started_at DESC LIMIT 1", (target,)).fetchone()


def test_form_nulls_for_empty_fields_mean_empty_and_no_xcom_error_for_the_skipped_branch(
        run_dag, fresh_pg_url: str, fixture_022: Path, capfd: pytest.CaptureFixture) -> None:
    conf = {"source_path": str(fixture_022), "mapping": None, "collections": None, "target_schema": "nul",
            "cutover": "manual"}  # what the form sends with mapping and collections left empty
    dr = run_dag("pocketbase_migration", conf, pg_url=fresh_pg_url)
    out = capfd.readouterr()
    assert dr.state == "success"
    _, params = _latest_run(fresh_pg_url, "nul")
    assert params["mapping"] == "" and params["collections"] == []  # every collection under its own name
    assert _ti_state(dr, "final_sync") == "skipped"
    assert "XCom not found" not in out.out + out.err


def test_resync_without_conf_uses_the_migrations_params_and_skips_after_cut_over(
        run_dag, fresh_pg_url: str, fixture_022: Path) -> None:
    full = run_dag("pocketbase_migration", {"source_path": str(fixture_022), "mapping": "", "target_schema": TARGET,
                                            "collections": ["demo1", "demo4"], "cutover": "manual"},
                   pg_url=fresh_pg_url)
    assert full.state == "success"
    run_id, _ = _latest_run(fresh_pg_url, TARGET)
    with sqlite3.connect(fixture_022 / "data.db") as raw:  # a change made after the full load
        raw.execute("UPDATE demo1 SET text = 'changed after the load', updated = '2099-01-01 00:00:00.000Z' "
                    "WHERE id = '84nmscqy84lsi1t'")

    # the resync DAG's defaults differ from this migration (mapping game.yaml, every collection):
    # a run with no conf must take the recorded ones instead
    dr = run_dag("pocketbase_resync", {}, pg_url=fresh_pg_url)
    assert dr.state == "success"
    with psycopg.connect(fresh_pg_url) as conn:
        synced = dict(conn.execute("SELECT collection, updated FROM pbm_meta.resyncs WHERE resync_id = %s",
                                   (dr.run_id,)).fetchall())
        text = conn.execute(f"SELECT text FROM {TARGET}_staging.demo1 WHERE id = '84nmscqy84lsi1t'").fetchone()
    assert synced == {"demo1": 1, "demo4": 0} and text == ("changed after the load",)

    refused = run_dag("pocketbase_resync", {"mapping": "game.yaml"}, pg_url=fresh_pg_url)  # explicit overrides
    assert refused.state == "failed" and _ti_state(refused, "resync") == "failed"

    with psycopg.connect(fresh_pg_url, autocommit=True) as conn:  # what a cut-over leaves behind
        conn.execute(f'ALTER SCHEMA "{TARGET}_staging" RENAME TO "{TARGET}"')
        conn.execute("UPDATE pbm_meta.runs SET status = 'promoted' WHERE run_id = %s", (run_id,))
        conn.execute("INSERT INTO pbm_meta.cutovers (run_id, target_schema, action, backend) "
                     "VALUES (%s, %s, 'cutover', 'postgres')", (run_id, TARGET))
    after = run_dag("pocketbase_resync", {}, pg_url=fresh_pg_url)
    assert after.state == "success" and _ti_state(after, "resync") == "skipped"


def test_mode_final_skips_the_fresh_load_resyncs_and_gates_the_held_run(
        run_dag, fresh_pg_url: str, fixture_022: Path) -> None:
    conf = {"source_path": str(fixture_022), "mapping": "", "target_schema": "fin", "cutover": "manual"}
    first = run_dag("pocketbase_migration", conf, pg_url=fresh_pg_url)
    assert first.state == "success" and _ti_state(first, "final_sync") == "skipped"
    with sqlite3.connect(fixture_022 / "data.db") as raw:  # the last write before PocketBase froze
        raw.execute("UPDATE demo1 SET text = 'the last write', updated = '2099-01-01 00:00:00.000Z' "
                    "WHERE id = '84nmscqy84lsi1t'")

    dr = run_dag("pocketbase_migration", {**conf, "mode": "final"}, pg_url=fresh_pg_url)
    assert dr.state == "success"
    states = {t: _ti_state(dr, t) for t in ("prepare.snapshot", "prepare.assess", "data.plan_batches",
                                            "data.finalize", "final_sync", "validate.checks", "cutover_auto",
                                            "cutover_manual", "ready", "cut_over", "hold", "roll_back")}
    assert states == {"prepare.snapshot": "skipped", "prepare.assess": "skipped", "data.plan_batches": "skipped",
                      "data.finalize": "skipped", "final_sync": "success", "validate.checks": "success",
                      "cutover_auto": "skipped", "cutover_manual": "success", "ready": "success",
                      "cut_over": "skipped", "hold": "success", "roll_back": "skipped"}, states
    with psycopg.connect(fresh_pg_url) as conn:
        assert conn.execute("SELECT text FROM fin_staging.demo1 WHERE id = '84nmscqy84lsi1t'").fetchone() == (
            "the last write",)


def test_a_refused_gate_rolls_back_and_skips_the_warm_up_and_both_ends(
        run_dag, fresh_pg_url: str, fixture_022: Path) -> None:
    with sqlite3.connect(fixture_022 / "data.db") as raw:  # one bad date: one reject, above a ratio of 0
        raw.execute("UPDATE demo1 SET datetime = '2024-13-45 99:00:00Z' WHERE id = '84nmscqy84lsi1t'")
    conf = {"source_path": str(fixture_022), "mapping": "", "target_schema": "refused", "cutover": "auto",
            "max_reject_ratio": 0}
    dr = run_dag("pocketbase_migration", conf, pg_url=fresh_pg_url)
    assert dr.state == "failed"  # on purpose, by roll_back
    states: dict[str, set[str]] = {}
    for ti in dr.get_task_instances():
        states.setdefault(ti.task_id, set()).add(str(ti.state))
    assert {t: states[t] for t in ("validate.checks", "prepare.assess", "cache.warm", "loadtest", "cutover_auto",
                                   "cutover_manual", "ready", "cut_over", "hold", "roll_back")} == {
        "validate.checks": {"success"}, "prepare.assess": {"success"}, "cache.warm": {"skipped"},
        "loadtest": {"skipped"}, "cutover_auto": {"skipped"}, "cutover_manual": {"skipped"}, "ready": {"success"},
        "cut_over": {"skipped"}, "hold": {"skipped"}, "roll_back": {"failed"}}, states
    with psycopg.connect(fresh_pg_url) as conn:
        status = conn.execute("SELECT status FROM pbm_meta.runs WHERE target_schema = 'refused'").fetchone()
        action, reason = conn.execute("SELECT action, reason FROM pbm_meta.cutovers WHERE target_schema = 'refused'"
                                      ).fetchone()
        staging = conn.execute("SELECT to_regnamespace('refused_staging')").fetchone()
    assert status == ("rolled_back",) and staging == (None,)
    assert action == "discard" and "max_reject_ratio" in reason  # the gate's own reason, from its XCom
