"""The pocketbase_migration DAG end to end with dag.test(), on real PocketBase databases."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import psycopg
import pytest

from pbmigrate.plan.mapping import load_mapping
from pbmigrate.plan.model import build_plan
from pbmigrate.source.sqlite import SqliteSource
from tests.compare import assert_migrated


def _run_id(pg_url: str, target: str) -> str:
    with psycopg.connect(pg_url) as conn:
        return conn.execute("SELECT run_id FROM pbm_meta.runs WHERE target_schema = %s ORDER BY started_at DESC "
                            "LIMIT 1", (target,)).fetchone()[0]


def _plan(db: Path, mapping: str = ""):
    src = SqliteSource(db)
    try:
        return build_plan(src.catalog(), load_mapping(mapping))
    finally:
        src.close()


def test_pocketbase_022_fixture_migrates_every_field_of_every_record(run_dag, fresh_pg_url, fixture_022):
    conf = {"source_path": str(fixture_022), "mapping": "", "target_schema": "fx", "batch_size": 2,
            "max_reject_ratio": 0, "cutover": "manual"}  # manual: the staging schema stays to be inspected
    dr = run_dag("pocketbase_migration", conf, pg_url=fresh_pg_url)
    assert dr.state == "success"
    run_id = _run_id(fresh_pg_url, "fx")
    compared = assert_migrated(str(fixture_022 / "data.db"), fresh_pg_url, "fx_staging", _plan(fixture_022 / "data.db"),
                               run_id)
    assert compared == 22  # every record of the 8 record collections (views are not copied)
    with psycopg.connect(fresh_pg_url) as conn:
        fks = conn.execute("SELECT count(*) FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace "
                           "WHERE n.nspname = 'fx_staging' AND c.contype = 'f' AND c.convalidated").fetchone()[0]
        batches = conn.execute("SELECT count(*), sum(rows_read) FROM pbm_meta.batches WHERE run_id = %s",
                               (run_id,)).fetchone()
        hashes = conn.execute('SELECT "passwordHash" FROM fx_staging.users ORDER BY id').fetchall()
        stored = conn.execute("SELECT count(*) FILTER (WHERE status = 'done'), count(*), count(md5) "
                              "FROM pbm_meta.files WHERE run_id = %s", (run_id,)).fetchone()
        files_check = conn.execute("SELECT bool_and(success), sum((observed->>'verified')::int) FROM pbm_meta.checks "
                                   "WHERE run_id = %s AND check_name = 'files'", (run_id,)).fetchone()
    assert stored == (15, 15, 15)  # every upload of the fixture's record collections (views are not copied)
    assert files_check == (True, 15)  # each object re-read by validation: size, sha256 and PocketBase's md5
    assert fks >= 20  # single relations and junction tables, all VALID
    assert batches == (13, 22)  # batch_size 2 -> ranges per collection
    assert all(h[0].startswith("$2a$") for h in hashes)  # players can still log in


def test_bad_values_go_to_rejects_with_reasons_while_good_rows_load(run_dag, fresh_pg_url, fixture_022):
    db = fixture_022 / "data.db"
    with sqlite3.connect(db) as raw:  # raw SQL writes, as a script outside PocketBase might do
        raw.execute("UPDATE demo1 SET datetime = '2024-13-45 99:00:00Z' WHERE id = '84nmscqy84lsi1t'")
        raw.execute("UPDATE demo2 SET title = 'a' || char(0) || 'b' WHERE id = '0yxhwia2amd8gec'")
        raw.execute("UPDATE demo4 SET json_object = '{\"broken\": ' WHERE id = 'i9naidtvr6qsgb4'")
        raw.execute("UPDATE demo5 SET rel_one = 'missing0000001' WHERE id = 'la4y2w4o98acwuj'")
    conf = {"source_path": str(fixture_022), "mapping": "", "target_schema": "bad", "orphans": "null",
            "cutover": "manual", "max_reject_ratio": 1}
    dr = run_dag("pocketbase_migration", conf, pg_url=fresh_pg_url)
    assert dr.state == "success"
    run_id = _run_id(fresh_pg_url, "bad")
    with psycopg.connect(fresh_pg_url) as conn:
        rejects = {(c, r, f): reason for c, r, f, reason in conn.execute(
            "SELECT collection, record_id, field, reason FROM pbm_meta.rejects WHERE run_id = %s", (run_id,))}
        orphans = conn.execute("SELECT collection, field, mode, count FROM pbm_meta.orphans WHERE run_id = %s",
                               (run_id,)).fetchall()
        rel = conn.execute("SELECT rel_one FROM bad_staging.demo5 WHERE id = 'la4y2w4o98acwuj'").fetchone()
    assert "not a date" in rejects[("demo1", "84nmscqy84lsi1t", "datetime")]
    assert "NUL byte" in rejects[("demo2", "0yxhwia2amd8gec", "title")]
    assert "invalid JSON" in rejects[("demo4", "i9naidtvr6qsgb4", "json_object")]
    # one injected dangling id, plus one row whose target (demo4 i9naidtvr6qsgb4) was itself rejected
    assert ("demo5", "rel_one", "null", 2) in orphans and rel == (None,)
    assert assert_migrated(str(db), fresh_pg_url, "bad_staging", _plan(db), run_id, orphans="null") == 19


def test_unknown_collection_in_params_fails_the_run_with_its_name(run_dag, fresh_pg_url, fixture_022):
    dr = run_dag("pocketbase_migration", {"source_path": str(fixture_022), "mapping": "", "target_schema": "oops",
                                          "collections": ["nope"]}, pg_url=fresh_pg_url)
    assert dr.state == "failed"


@pytest.mark.parametrize("bad", ["/no/such/pb_data", "/etc/hostname"])
def test_a_source_that_is_not_pocketbase_fails_before_anything_is_written(run_dag, fresh_pg_url, bad):
    dr = run_dag("pocketbase_migration", {"source_path": bad, "mapping": "", "target_schema": "nothing"},
                 pg_url=fresh_pg_url)
    assert dr.state == "failed"
    with psycopg.connect(fresh_pg_url) as conn:
        assert conn.execute("SELECT to_regnamespace('nothing_staging')").fetchone() == (None,)


def test_api_mode_migrates_through_a_running_server_and_keeps_no_secrets(run_dag, fresh_pg_url, tmp_path,
                                                                        monkeypatch: pytest.MonkeyPatch):
    from urllib.parse import quote

    from pbdev.pbserver import PocketBaseServer
    from pbdev.sample import build_sample

    info = build_sample(tmp_path / "sample", rows=600, api_users=2)
    su = info["superuser"]
    with PocketBaseServer(Path(info["pb_data"])) as pb:
        host = pb.url.split("://", 1)[1]
        monkeypatch.setenv("AIRFLOW_CONN_PBM_POCKETBASE",
                           f"http://{quote(su['email'], safe='')}:{quote(su['password'], safe='')}@{host}")
        dr = run_dag("pocketbase_migration", {"source_path": "", "mapping": "game.yaml", "target_schema": "api",
                                              "batch_size": 200, "cutover": "manual"}, pg_url=fresh_pg_url)
        assert dr.state == "success"
    run_id = _run_id(fresh_pg_url, "api")
    plan = _plan(Path(info["pb_data"]) / "data.db", "game.yaml")
    plan.has_secrets = False  # the API never hands out password hashes or token keys
    assert assert_migrated(str(Path(info["pb_data"]) / "data.db"), fresh_pg_url, "api_staging", plan, run_id) \
        == sum(c for name, c in info["counts"].items() if name != "leaderboard")
    with psycopg.connect(fresh_pg_url) as conn:
        hashes = conn.execute("SELECT count(*) FROM api_staging.players WHERE password_hash IS NOT NULL").fetchone()
        note = conn.execute("SELECT assessment->'notes'->>0 FROM pbm_meta.runs WHERE run_id = %s",
                            (run_id,)).fetchone()[0]
    assert hashes == (0,) and "password hashes" in note
