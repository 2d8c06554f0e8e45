"""The pipeline's optional load test (pbmigrate.cutover.loadgate): real dag.test() runs of both DAGs on a
migrated sample, a real PocketBase on the snapshot, the service and Locust as child processes.

The figures themselves are not asserted (no timed assertions here; targets live in bench/): the
tests assert that the step ran against the staging schema with a PocketBase reference, recorded
its figures, left the data it tested untouched, and that its gate refuses a cut-over (and never a
roll-back).
"""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
import redis

from pbdev.sample import build_sample
from pbmigrate.cutover import loadgate
from pbmigrate.errors import ParamError

# Capacity: one 100 rps step per backend, so a load test takes about a minute.
SMALL = {"loadtest": True, "loadtest_users": 40, "loadtest_duration": 4}


def _report(pb: float | None, pg: float, error_rate: float = 0.0) -> dict:
    out: dict = {"postgres": {"capacity_rps": pg, "error_rate": error_rate,
                              "endpoints": {"profile_me": {"error_rate": error_rate}}}}
    if pb is not None:
        out["pocketbase"] = {"capacity_rps": pb}
    return out


def test_the_verdict_names_each_limit_missed() -> None:
    opts = loadgate.LoadtestOptions(enabled=True, gate=True, min_improvement=1.5, max_error_rate=0.001)
    assert loadgate.evaluate(_report(200, 400), opts) == []
    (low,) = loadgate.evaluate(_report(300, 400), opts)
    assert "improvement 1.33" in low and "loadtest_min_improvement 1.50" in low
    (errors,) = loadgate.evaluate(_report(200, 400, error_rate=0.02), opts)
    assert "error rate 2.000%" in errors and "profile_me 2.00%" in errors
    # API mode has no PocketBase reference: an improvement limit cannot be met, errors alone can
    assert "no PocketBase reference" in loadgate.evaluate(_report(None, 400), opts)[0]
    assert loadgate.evaluate(_report(None, 400), loadgate.LoadtestOptions(min_improvement=0)) == []
    assert loadgate.evaluate(_report(0, 100), opts) == []  # PocketBase held no step, the new stack did
    broken = _report(0, 100) | {"pocketbase": {"capacity_rps": 0, "error_rate": 1.0}}
    assert "the PocketBase reference failed 100.0%" in loadgate.evaluate(broken, opts)[0]  # no free pass
    assert loadgate.evaluate({}, opts) == ["the load test has no figures for the new stack"]


def test_params_read_as_options_and_a_bad_mix_is_refused_in_one_line() -> None:
    opts = loadgate.options({"loadtest": True, "loadtest_users": 50, "loadtest_min_improvement": 0})
    assert opts.enabled and opts.users == 50 and opts.min_improvement == 0 and opts.mix == loadgate.READ_MIX
    assert "match_result" not in opts.mix  # reads only: the staging schema is what gets promoted
    with pytest.raises(ParamError, match="'lootbox=2' is not journey=weight"):
        loadgate.options({}, mix="profile_me=1,lootbox=2")


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return build_sample(tmp_path_factory.mktemp("lt") / "sample", rows=3000, api_users=2)


def _rows(pg_url: str, sql: str, args: tuple = ()) -> list[tuple]:
    with psycopg.connect(pg_url) as conn:
        return conn.execute(sql, args).fetchall()


def _staging_digest(pg_url: str, schema: str) -> dict[str, str]:
    """md5 of every table of the schema: a load test that wrote anything changes one."""
    with psycopg.connect(pg_url) as conn:
        tables = [t for (t,) in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = %s ORDER BY 1", (schema,))]
        return {t: conn.execute(f'SELECT md5(coalesce(string_agg(x::text, \'|\' ORDER BY x::text), \'\')) '
                                f'FROM "{schema}"."{t}" x').fetchone()[0] for t in tables}


@pytest.mark.slow
def test_migration_then_cutover_dag_record_load_tests_and_the_gate_refuses_the_cutover(
        run_dag, fresh_pg_url, redis_url, sample, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PBM_LOADTEST_CAPACITY_STEPS", "100")
    conf = {"source_path": str(sample["pb_data"]), "mapping": "game.yaml", "target_schema": "lt",
            "batch_size": 1000, "cutover": "manual", **SMALL}
    dr = run_dag("pocketbase_migration", conf, pg_url=fresh_pg_url, redis_url=redis_url)
    states = {ti.task_id: ti.state for ti in dr.get_task_instances()}
    assert dr.state == "success" and states["loadtest"] == "success" and states["hold"] == "success", states

    (row,) = _rows(fresh_pg_url, """SELECT stage, schema_tested, users, pocketbase_capacity_rps IS NOT NULL,
        postgres_capacity_rps IS NOT NULL, rps > 0, error_rate, gate, passed, report ? 'pocketbase',
        report->'postgres'->'endpoints' ? 'match_result', (report->'config'->>'users')::int, report::text
        FROM pbm_meta.loadtests""")
    stage, tested, users, has_pb, has_pg, served, errors, gate, _passed, pb_ran, wrote, cfg_users, raw = row
    assert (stage, tested, users, gate) == ("migration", "lt_staging", 40, False)
    assert has_pb and pb_ran and has_pg and served  # PocketBase on the snapshot copy is the reference
    assert errors == 0 and not wrote and cfg_users == 40  # reads only, none failed
    assert "postgresql://" not in raw  # the report never carries the database URL
    status = _rows(fresh_pg_url, "SELECT status FROM pbm_meta.runs WHERE target_schema = 'lt'")
    assert status == [("ready",)]  # held for the cut-over DAG, as without the load test
    assert redis.Redis.from_url(redis_url).get("pbm:backend") is None  # the game's flag untouched

    # The cut-over DAG load-tests the waiting staging schema again; a gate it cannot meet refuses it.
    before = _staging_digest(fresh_pg_url, "lt_staging")
    dr = run_dag("pocketbase_cutover", {"action": "cutover", "target_schema": "lt", **SMALL, "loadtest_gate": True,
                                        "loadtest_min_improvement": 1000}, pg_url=fresh_pg_url, redis_url=redis_url)
    states = {ti.task_id: ti for ti in dr.get_task_instances()}
    assert dr.state == "failed" and states["loadtest"].state == "failed" and states["apply"].state == "upstream_failed"
    assert states["loadtest"].try_number == 1  # a refusal is not retried
    (row,) = _rows(fresh_pg_url, "SELECT stage, gate, passed, reasons::text, improvement FROM pbm_meta.loadtests "
                                 "WHERE stage = 'cutover'")
    assert row[:3] == ("cutover", True, False) and "below loadtest_min_improvement 1000.00" in row[3]
    assert row[4] is not None
    assert _rows(fresh_pg_url, "SELECT to_regnamespace('lt')::text, to_regnamespace('lt_staging')::text") == [
        (None, "lt_staging")]  # nothing promoted, staging kept as validated
    assert _staging_digest(fresh_pg_url, "lt_staging") == before  # the load test changed no row
    assert redis.Redis.from_url(redis_url).get("pbm:backend") is None

    # A roll-back is never held back by the load test, whatever its params say.
    dr = run_dag("pocketbase_cutover", {"action": "rollback", "target_schema": "lt", **SMALL, "loadtest_gate": True,
                                        "loadtest_min_improvement": 1000}, pg_url=fresh_pg_url, redis_url=redis_url)
    assert dr.state == "success"
    assert _rows(fresh_pg_url, "SELECT count(*) FROM pbm_meta.loadtests") == [(2,)]
    assert _rows(fresh_pg_url, "SELECT to_regnamespace('lt_staging')::text") == [(None,)]


def test_a_missing_runner_fails_in_one_line(fresh_pg_url, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PBM_LOADTEST_SCRIPT", str(tmp_path / "nope.py"))
    run = {"run_id": "r", "target_schema": "t", "staging_schema": "t_staging", "source_kind": "sqlite"}
    with pytest.raises(loadgate.LoadtestUnavailable, match=r"no load-test runner at .*nope\.py"):
        loadgate.loadtest_step(run, fresh_pg_url, loadgate.LoadtestOptions(enabled=True), stage="migration")
    assert loadgate.loadtest_step(run, fresh_pg_url, loadgate.LoadtestOptions(), stage="migration")["skipped"]
