"""Gate, cut-over, roll-back and backups on real PostgreSQL and Redis.

The engine tests drive the task functions directly; the DAG tests (named `test_dag_*`, marked
slow; select them with `-k test_dag_`) run pocketbase_migration and pocketbase_cutover with
dag.test() and skip until the migration DAG has its validate group wired in.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import psycopg
import pytest
import redis

from pbmigrate.cutover import promote
from pbmigrate.validate import quality
from tests.validate.test_quality import BAD_RECORD, migrate, plant_bad_record


@pytest.fixture(autouse=True)
def work_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PBM_WORK_DIR", str(tmp_path / "work"))
    return tmp_path / "work"


def validated(pb_data: Path, pg_url: str, dag_run_id: str, max_reject_ratio: float = 0.0,
              target: str = "live") -> tuple[dict, dict]:
    run = migrate(pb_data, pg_url, target, dag_run_id)
    quality.validate_run(run, pg_url)
    return run, promote.gate(run, pg_url, max_reject_ratio)


def schema_oid(pg_url: str, name: str) -> int | None:
    with psycopg.connect(pg_url) as conn:
        row = conn.execute("SELECT oid FROM pg_namespace WHERE nspname = %s", (name,)).fetchone()
    return row[0] if row else None


def flag(redis_url: str) -> str | None:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        return client.get("pbm:backend")
    finally:
        client.close()


def one(pg_url: str, sql: str, args: tuple = ()):
    with psycopg.connect(pg_url) as conn:
        return conn.execute(sql, args).fetchone()


def test_happy_path_cuts_over_live_schema_holds_the_data_and_the_flag_says_postgres(
        fresh_pg_url, redis_url, fixture_022):
    run, verdict = validated(fixture_022, fresh_pg_url, "happy")
    assert verdict["promote"] and promote.decide(verdict, "auto") == "cut_over"

    result = promote.cut_over_run(run, fresh_pg_url, redis_url)

    assert one(fresh_pg_url, "SELECT count(*) FROM live.demo1") == (3,)
    assert schema_oid(fresh_pg_url, "live_staging") is None and result["previous_schema"] is None
    assert flag(redis_url) == "postgres"
    assert one(fresh_pg_url, "SELECT value, run_id FROM pbm_meta.flags WHERE name = 'pbm:backend'") == (
        "postgres", "happy")
    assert one(fresh_pg_url, "SELECT status FROM pbm_meta.runs WHERE run_id = 'happy'") == ("promoted",)
    assert one(fresh_pg_url, "SELECT action, backend FROM pbm_meta.cutovers WHERE run_id = 'happy'") == (
        "cutover", "postgres")
    # no live schema before, so only the source snapshot is kept (and the list of the files the
    # store holds for the run: the store itself stays), and the report says where
    assert [b["kind"] for b in result["backups"]] == ["files", "source"]
    listed = Path(result["backups"][0]["path"]).read_text().splitlines()
    assert len(listed) == 1 + 15 and all(json.loads(line)["sha256"] for line in listed[1:])
    md = Path(result["report"]).read_text()
    assert "**Status: promoted**" in md and run["snapshot_path"] in md and "Gate: **PROMOTE**" in md

    again = promote.cut_over(run, fresh_pg_url, redis_url)  # a retried task only sets the flag again
    assert again["already"] and one(fresh_pg_url, "SELECT count(*) FROM pbm_meta.cutovers") == (1,)


def test_bad_value_beyond_the_threshold_fails_the_gate_rolls_back_and_leaves_live_and_flag(
        fresh_pg_url, redis_url, fixture_022):
    with psycopg.connect(fresh_pg_url, autocommit=True) as conn:  # what is live before this run
        conn.execute("CREATE SCHEMA live; CREATE TABLE live.marker (v int); INSERT INTO live.marker VALUES (1)")
    redis.Redis.from_url(redis_url).set("pbm:backend", "postgres")
    live_oid = schema_oid(fresh_pg_url, "live")
    plant_bad_record(fixture_022)

    run, verdict = validated(fixture_022, fresh_pg_url, "dirty", max_reject_ratio=0.01)

    assert not verdict["promote"] and verdict["rejected"] == 1 and verdict["rows_read"] == 22
    assert "more than max_reject_ratio" in verdict["reasons"][0]
    assert promote.decide(verdict, "auto") == promote.decide(verdict, "manual") == "roll_back"
    with pytest.raises(promote.PromotionRefused, match="rolled back, not promoted: 1 of 22 records rejected"):
        promote.roll_back_run(run, fresh_pg_url, redis_url, verdict)
    assert schema_oid(fresh_pg_url, "live_staging") is None
    assert schema_oid(fresh_pg_url, "live") == live_oid and one(fresh_pg_url, "SELECT v FROM live.marker") == (1,)
    assert flag(redis_url) == "postgres"
    assert one(fresh_pg_url, "SELECT status FROM pbm_meta.runs WHERE run_id = 'dirty'") == ("rolled_back",)
    assert one(fresh_pg_url, "SELECT action, backend FROM pbm_meta.cutovers WHERE run_id = 'dirty'") == (
        "discard", "postgres")  # recorded as Redis said it, not changed
    md = (Path(run["snapshot_path"]).parent / "report.md").read_text()
    assert "Gate: **REFUSE**" in md and BAD_RECORD in md and "not one of the select values" in md

    # the same rejects within a looser threshold pass the gate
    assert promote.gate(run, fresh_pg_url, 0.05)["promote"]


def test_manual_cutover_then_rollback_restores_the_previous_live_schema_with_its_grants(
        fresh_pg_url, redis_url, fixture_022):
    role = f"pbm_game_{uuid.uuid4().hex[:6]}"
    first, _ = validated(fixture_022, fresh_pg_url, "first")
    promote.cut_over_run(first, fresh_pg_url, redis_url)
    first_oid = schema_oid(fresh_pg_url, "live")
    with psycopg.connect(fresh_pg_url, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role}")
        conn.execute(f"GRANT USAGE ON SCHEMA live TO {role}")
        conn.execute(f"GRANT SELECT ON live.demo2 TO {role}")
    try:
        second, verdict = validated(fixture_022, fresh_pg_url, "second")
        assert promote.decide(verdict, "manual") == "hold"
        promote.hold_run(second, fresh_pg_url)
        assert schema_oid(fresh_pg_url, "live") == first_oid and flag(redis_url) == "postgres"
        assert one(fresh_pg_url, "SELECT status FROM pbm_meta.runs WHERE run_id = 'second'") == ("ready",)

        promoted = promote.run_action("cutover", "live", fresh_pg_url, redis_url)

        assert promoted["run_id"] == "second" and schema_oid(fresh_pg_url, "live_previous") == first_oid
        dump = next(b for b in promoted["backups"] if b["kind"] == "schema")
        assert Path(dump["path"]).stat().st_size > 0
        assert one(fresh_pg_url, "SELECT has_schema_privilege(%s, 'live', 'USAGE'), "
                   "has_table_privilege(%s, 'live.demo2', 'SELECT')", (role, role)) == (True, True)

        rolled = promote.run_action("rollback", "live", fresh_pg_url, redis_url, "error rate after cut-over")

        assert rolled["action"] == "rollback" and rolled["run_id"] == "second"
        assert schema_oid(fresh_pg_url, "live") == first_oid and schema_oid(fresh_pg_url, "live_rolled_back")
        assert flag(redis_url) == "pocketbase"
        assert one(fresh_pg_url, "SELECT status FROM pbm_meta.runs WHERE run_id = 'second'") == ("rolled_back",)
        assert promote.run_action("rollback", "live", fresh_pg_url, redis_url)["run_id"] == "first"
        assert schema_oid(fresh_pg_url, "live") is None  # before "first" there was no live schema
        assert promote.run_action("rollback", "live", fresh_pg_url, redis_url)["action"] == "none"
        with pytest.raises(promote.PbmError, match="nothing to cut over"):
            promote.run_action("cutover", "live", fresh_pg_url, redis_url)
    finally:
        with psycopg.connect(fresh_pg_url, autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")


def test_rollback_restores_the_old_live_schema_from_its_pg_dump_when_previous_is_gone(
        fresh_pg_url, redis_url, fixture_022):
    first, _ = validated(fixture_022, fresh_pg_url, "first")
    promote.cut_over_run(first, fresh_pg_url, redis_url)
    with psycopg.connect(fresh_pg_url, autocommit=True) as conn:
        conn.execute("UPDATE live.demo2 SET title = 'edited while live' WHERE id = 'llvuca81nly1qls'")
    second, _ = validated(fixture_022, fresh_pg_url, "second")
    promote.cut_over_run(second, fresh_pg_url, redis_url)
    with psycopg.connect(fresh_pg_url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA live_previous CASCADE")

    rolled = promote.roll_back("live", fresh_pg_url, redis_url, "test", run_id="second")

    assert rolled["restored"].startswith("pg_dump ")
    assert one(fresh_pg_url, "SELECT title FROM live.demo2 WHERE id = 'llvuca81nly1qls'") == ("edited while live",)
    assert one(fresh_pg_url, "SELECT count(*) FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace "
               "WHERE n.nspname = 'live' AND c.contype = 'f'")[0] >= 20
    assert flag(redis_url) == "pocketbase"


def test_cutover_refuses_a_run_that_did_not_pass_the_gate(fresh_pg_url, redis_url, fixture_022):
    plant_bad_record(fixture_022)
    run, verdict = validated(fixture_022, fresh_pg_url, "dirty")
    assert not verdict["promote"]
    with pytest.raises(promote.PbmError, match="has not passed the gate"):
        promote.cut_over(run, fresh_pg_url, redis_url)
    with pytest.raises(ValueError, match="param cutover"):
        promote.decide(verdict, "later")
    assert schema_oid(fresh_pg_url, "live") is None and flag(redis_url) is None


# --------------------------------------------------------------------------- DAG tests


def _wired() -> None:
    import airflow_local

    dag = airflow_local.load_dag("pocketbase_migration")
    if "validate" not in dag.task_group_dict or "cutover" not in dag.params:
        pytest.skip("pocketbase_migration has no validate group / cutover param yet (wiring pending)")


def _dag(run_dag, dag_id: str, conf: dict, pg_url: str, redis_url: str):
    return run_dag(dag_id, conf, pg_url=pg_url, redis_url=redis_url)


def _conf(pb_data: Path, **extra) -> dict:
    return {"source_path": str(pb_data), "mapping": "", "target_schema": "live", "batch_size": 10, **extra}


@pytest.mark.slow
def test_dag_happy_path_cuts_over(run_dag, fresh_pg_url, redis_url, fixture_022):
    _wired()
    dr = _dag(run_dag, "pocketbase_migration", _conf(fixture_022), fresh_pg_url, redis_url)
    assert dr.state == "success"
    assert one(fresh_pg_url, "SELECT count(*) FROM live.users") == (3,) and flag(redis_url) == "postgres"
    assert one(fresh_pg_url, "SELECT status FROM pbm_meta.runs") == ("promoted",)


@pytest.mark.slow
def test_dag_bad_value_fails_the_gate_rolls_back_and_the_run_fails(run_dag, fresh_pg_url, redis_url, fixture_022):
    _wired()
    plant_bad_record(fixture_022)
    dr = _dag(run_dag, "pocketbase_migration", _conf(fixture_022), fresh_pg_url, redis_url)
    assert dr.state == "failed"
    states = {ti.task_id: ti.state for ti in dr.get_task_instances()}
    assert states["roll_back"] == "failed" and states["cut_over"] == "skipped" and states["hold"] == "skipped"
    assert states["cache.warm"] == "skipped"  # a refused run never warms Redis
    assert schema_oid(fresh_pg_url, "live") is None and schema_oid(fresh_pg_url, "live_staging") is None
    assert flag(redis_url) is None
    assert one(fresh_pg_url, "SELECT status FROM pbm_meta.runs") == ("rolled_back",)


@pytest.mark.slow
def test_dag_manual_cutover_then_cutover_dag_rollback_restores_previous_live(
        run_dag, fresh_pg_url, redis_url, fixture_022):
    _wired()
    assert _dag(run_dag, "pocketbase_migration", _conf(fixture_022), fresh_pg_url, redis_url).state == "success"
    first_oid = schema_oid(fresh_pg_url, "live")
    dr = _dag(run_dag, "pocketbase_migration", _conf(fixture_022, cutover="manual"), fresh_pg_url, redis_url)
    assert dr.state == "success" and schema_oid(fresh_pg_url, "live") == first_oid
    assert schema_oid(fresh_pg_url, "live_staging") is not None

    conf = {"action": "cutover", "target_schema": "live"}
    assert _dag(run_dag, "pocketbase_cutover", conf, fresh_pg_url, redis_url).state == "success"
    assert schema_oid(fresh_pg_url, "live_previous") == first_oid and flag(redis_url) == "postgres"
    conf = {"action": "rollback", "target_schema": "live"}
    assert _dag(run_dag, "pocketbase_cutover", conf, fresh_pg_url, redis_url).state == "success"
    assert schema_oid(fresh_pg_url, "live") == first_oid and flag(redis_url) == "pocketbase"

    # Nothing waits in staging now: the cut-over refuses, and fails at once instead of retrying.
    dr = _dag(run_dag, "pocketbase_cutover", {"action": "cutover", "target_schema": "live"}, fresh_pg_url, redis_url)
    states = {ti.task_id: ti for ti in dr.get_task_instances()}
    apply = states["apply"]
    assert dr.state == "failed" and apply.state == "failed" and states["loadtest"].state == "success"  # param off
    assert apply.try_number == 1 and apply.max_tries >= 1  # retries were allowed, and not used
