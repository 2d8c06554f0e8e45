"""Validation on a real migrated staging schema: GX checkpoints, checksums, pbm_meta.checks, report.

Each test loads the PocketBase 0.22 fixture through the engine's own task functions (prepare,
create_schema, plan_batches, run_batch, finalize_run) into a database of its own, then checks.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import psycopg
import pytest

from pbmigrate import checksum, files, tasks
from pbmigrate.load import ledger
from pbmigrate.plan.mapping import load_mapping
from pbmigrate.plan.model import build_plan
from pbmigrate.source import open_source
from pbmigrate.validate import quality, report

BAD_RECORD = "qjeql998mtp1azp"  # a demo5 record nothing points at, so rejecting it orphans nothing


def migrate(pb_data: Path, pg_url: str, target: str, dag_run_id: str, batch_size: int = 3) -> dict:
    """The data phase of one run, task by task, as the DAG calls it; returns the run dict."""
    params = tasks.run_params(source_path=str(pb_data), target_schema=target, mapping="", batch_size=batch_size,
                                 collections=None, orphans="reject")
    run = tasks.prepare(params=params, pg_url=pg_url, dag_run_id=dag_run_id)
    tasks.create_schema(run, pg_url)
    for batch in tasks.plan_batches(run):
        tasks.run_batch(run, batch, pg_url)
    tasks.finalize_run(run, pg_url)
    for batch in files.plan_file_batches(run, pg_url):  # the files group: validation proves the uploads too
        files.copy_batch(run, batch, pg_url)
    return run


def plant_bad_record(pb_data: Path) -> None:
    """Two bad fields in one record: one rejected record, two reject rows."""
    with sqlite3.connect(pb_data / "data.db") as raw:
        raw.execute("UPDATE demo5 SET select_one = 'zzz', total = 'abc' WHERE id = ?", (BAD_RECORD,))


@pytest.fixture(autouse=True)
def work_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PBM_WORK_DIR", str(tmp_path / "work"))
    return tmp_path / "work"


def _checks(pg_url: str, run_id: str) -> dict[tuple[str, str], tuple[bool, dict]]:
    with psycopg.connect(pg_url) as conn:
        return {(t, c): (ok, obs) for t, c, ok, obs in conn.execute(
            "SELECT target_table, check_name, success, observed FROM pbm_meta.checks WHERE run_id = %s", (run_id,))}


def test_clean_fixture_passes_every_check_and_keeps_results_docs_and_report(fresh_pg_url, fixture_022):
    run = migrate(fixture_022, fresh_pg_url, "fx", "clean")
    summary = quality.validate_run(run, fresh_pg_url)

    assert summary["success"], summary["failures"]
    checks = _checks(fresh_pg_url, run["run_id"])
    assert len(checks) == summary["checks"] and all(ok for ok, _ in checks.values())
    for table in ("clients", "demo1", "demo2", "demo3", "demo4", "demo5", "nologin", "users"):
        for name in ("row_count", "primary_key_unique", "primary_key_not_null", "checksums", "source_rows"):
            assert (table, name) in checks
    assert checks[("demo1", "row_count")][1]["observed_value"] == 3
    # type conversion (dates, floats, json, arrays) does not upset the checksums
    assert checks[("demo4", "checksums")][1]["mismatched"] == 0
    assert ("demo4", "no_orphans:demo4_self_rel_many.target_id->demo4") in checks  # junctions included
    assert ("demo5", "in_set:select_many") in checks and ("demo5", "in_set:select_one") in checks
    assert ("demo4", "not_null:rel_one_no_cascade_required") in checks

    assert len(json.dumps(summary)) < 4000  # compact enough for XCom
    assert Path(summary["data_docs"]).is_file() and summary["data_docs"].endswith("index.html")
    results = Path(summary["results"]).read_text()
    with psycopg.connect(fresh_pg_url) as conn:
        hashes = [h for (h,) in conn.execute('SELECT "passwordHash" FROM fx_staging.users')]
    assert hashes and not any(h in results for h in hashes)  # secrets never reach the results

    paths = report.publish(run, fresh_pg_url)
    md = Path(paths["markdown"]).read_text()
    rep = json.loads(Path(paths["json"]).read_text())
    assert "| demo1 | demo1 | 3 | 3 | 3 | 0 | ok |" in md
    assert rep["totals"]["rows_read"] == 22 and rep["validation"]["data_docs"] == summary["data_docs"]


def test_one_value_changed_in_the_target_after_the_load_is_caught_by_the_checksums(fresh_pg_url, fixture_022):
    run = migrate(fixture_022, fresh_pg_url, "fx", "changed")
    with psycopg.connect(fresh_pg_url, autocommit=True) as conn:
        conn.execute("UPDATE fx_staging.demo2 SET title = 'test2 ' WHERE id = 'achvryl401bhse3'")

    summary = quality.validate_run(run, fresh_pg_url)

    assert not summary["success"]
    assert [(f["table"], f["check"]) for f in summary["failures"]] == [("demo2", "checksums")]
    observed = summary["failures"][0]["observed"]
    bad = observed["examples"][0]
    assert observed["mismatched"] == 1 and bad["lo"] <= "achvryl401bhse3" <= bad["hi"]


def test_rejected_records_are_subtracted_once_from_the_expected_row_count(fresh_pg_url, fixture_022):
    plant_bad_record(fixture_022)
    run = migrate(fixture_022, fresh_pg_url, "fx", "dirty")

    summary = quality.validate_run(run, fresh_pg_url)

    assert summary["success"], summary["failures"]  # rejects are the gate's business, not a failed check
    with psycopg.connect(fresh_pg_url) as conn:
        counts = quality.ledger_counts(conn, run["run_id"])
        reject_rows = conn.execute("SELECT count(*) FROM pbm_meta.rejects WHERE run_id = %s",
                                   (run["run_id"],)).fetchone()[0]
    assert reject_rows == 2 and counts["demo5"] == {"table": "demo5", "read": 2, "rejected": 1, "expected": 1,
                                                    "batches": 1}
    rep = report.build(psycopg.connect(fresh_pg_url, autocommit=True), run)
    demo5 = next(c for c in rep["collections"] if c["collection"] == "demo5")
    assert demo5["rejected"] == 1 and demo5["target_rows"] == 1
    assert {r["field"] for r in demo5["rejects"]} == {"select_one", "total"}
    assert all(r["examples"] == [BAD_RECORD] for r in demo5["rejects"])


def test_gx_catches_duplicates_nulls_values_outside_the_set_and_orphans(fresh_pg_url, fixture_022):
    run = migrate(fixture_022, fresh_pg_url, "fx", "tampered")
    with psycopg.connect(fresh_pg_url, autocommit=True) as conn:
        for sql in (
            "ALTER TABLE fx_staging.demo5 DROP CONSTRAINT demo5_select_one_check",
            "ALTER TABLE fx_staging.demo5 DROP CONSTRAINT demo5_select_many_check",
            "UPDATE fx_staging.demo5 SET select_one = 'zzz', select_many = '{a,zzz}' WHERE id = 'qjeql998mtp1azp'",
            "ALTER TABLE fx_staging.demo2 ALTER COLUMN title DROP NOT NULL",
            "UPDATE fx_staging.demo2 SET title = NULL WHERE id = 'llvuca81nly1qls'",
            "ALTER TABLE fx_staging.demo3 DROP CONSTRAINT demo3_pkey CASCADE",
            "INSERT INTO fx_staging.demo3 SELECT * FROM fx_staging.demo3 ORDER BY id LIMIT 1",
            "ALTER TABLE fx_staging.users DROP CONSTRAINT fk_users_rel",
            "UPDATE fx_staging.users SET rel = 'nowhere' WHERE id = 'oap640cot4yru2s'",
            "ALTER TABLE fx_staging.demo1_rel_many DROP CONSTRAINT demo1_rel_many_target_id_fk",
            "INSERT INTO fx_staging.demo1_rel_many VALUES ('84nmscqy84lsi1t', 'ghost', 99)",
        ):
            conn.execute(sql)

    quality.validate_run(run, fresh_pg_url)

    failed = {k: obs for k, (ok, obs) in _checks(fresh_pg_url, run["run_id"]).items() if not ok}
    assert failed[("demo5", "in_set:select_one")]["examples"] == ["zzz"]
    assert failed[("demo5", "in_set:select_many")]["examples"] == ["qjeql998mtp1azp"]
    assert failed[("demo2", "not_null:title")]["unexpected_count"] == 1
    assert failed[("demo2", "not_null:title")]["examples"] == ["llvuca81nly1qls"]
    dup = failed[("demo3", "primary_key_unique")]
    assert dup["observed_value"] == 1 and len(dup["examples"]) == 1
    assert ("demo3", "row_count") in failed and failed[("demo3", "row_count")]["observed_value"] == 5
    assert failed[("users", "no_orphans:rel->demo2")]["examples"] == ["oap640cot4yru2s"]
    assert failed[("demo1", "no_orphans:demo1_rel_many.target_id->users")]["examples"] == ["84nmscqy84lsi1t"]
    checksum_failures = {t for t, c in failed if c == "checksums"}
    assert checksum_failures == {"demo1", "demo2", "demo3", "demo5", "users"}
    assert not any("exception" in obs for obs in failed.values())


def test_checksums_sum_each_junction_as_an_aggregate_of_its_own(fresh_pg_url, fixture_022):
    run = migrate(fixture_022, fresh_pg_url, "fx", "parts")
    plan = tasks.source_plan(run, None)
    schema, demo1 = run["staging_schema"], plan.table_for("demo1")
    assert len(ledger.target_sum_parts(schema, demo1)) == 1 + len(demo1.junctions) > 1
    with psycopg.connect(fresh_pg_url) as conn:
        counts = {t.collection.name: conn.execute(f'SELECT count(*) FROM "{schema}"."{t.name}"').fetchone()[0]
                  for t in plan.tables}
        los = {t.name: [lo for lo, _, _ in quality.expected_sums(conn, t, run["run_id"])] for t in plan.tables}
        whole = {t.name: sum(ledger.target_sums(conn, schema, t, los[t.name]).values()) for t in plan.tables}

    sums = {c.table: c for c in quality.ledger_checks(fresh_pg_url, schema, plan, run["run_id"], counts)
            if c.name == "checksums"}
    assert all(c.success for c in sums.values()), sums
    assert {t: c.observed["actual"] for t, c in sums.items()} == {t: checksum.as_hex(v) for t, v in whole.items()}

    with psycopg.connect(fresh_pg_url, autocommit=True) as conn:  # one extra target in a junction only
        conn.execute(f'ALTER TABLE "{schema}".demo1_rel_many DROP CONSTRAINT demo1_rel_many_target_id_fk')
        conn.execute(f"INSERT INTO \"{schema}\".demo1_rel_many VALUES ('84nmscqy84lsi1t', 'ghost', 99)")
    failed = [c.table for c in quality.ledger_checks(fresh_pg_url, schema, plan, run["run_id"], counts, workers=3)
              if not c.success]
    assert failed == ["demo1"]


def test_table_specs_escape_braces_for_gx_and_quote_identifiers(fixture_022):
    src = open_source(str(fixture_022 / "data.db"))
    try:
        plan = build_plan(src.catalog(), load_mapping(""))
    finally:
        src.close()
    specs = {s.name: s for s in quality.table_specs(plan.table_named("demo5"), 'we"ird', 2)}
    assert specs["row_count"].value == 2
    orphan = specs["no_orphans:demo5_rel_many.target_id->demo4"]
    assert '"we""ird"."demo5_rel_many"' in orphan.value and quality.BATCH in orphan.value
    assert quality.gx_query("SELECT '{x}' FROM " + quality.BATCH) == "SELECT '{{x}}' FROM {batch}"


def test_after_a_final_resync_tables_are_compared_with_the_new_snapshot_not_the_stale_ledger(
        fresh_pg_url, fixture_022):
    from pbmigrate import resync

    migrate(fixture_022, fresh_pg_url, "fx", "full")
    with sqlite3.connect(fixture_022 / "data.db") as raw:  # PocketBase kept taking writes
        raw.execute("UPDATE demo2 SET title = 'renamed', updated = '2030-01-01 00:00:00.000Z' "
                    "WHERE id = 'achvryl401bhse3'")
    run = resync.final_sync(source_path=str(fixture_022), target_schema="fx", mapping="", collections=None,
                          pg_url=fresh_pg_url, dag_run_id="final")

    summary = quality.validate_run(run, fresh_pg_url)

    assert summary["success"], summary["failures"]
    checks = _checks(fresh_pg_url, run["run_id"])
    assert checks[("demo2", "checksums")][1]["mode"] == "compared with the source after re-sync"
    with psycopg.connect(fresh_pg_url, autocommit=True) as conn:
        assert conn.execute("SELECT title FROM fx_staging.demo2 WHERE id = 'achvryl401bhse3'").fetchone() == (
            "renamed",)
        conn.execute("UPDATE fx_staging.demo2 SET title = 'tampered' WHERE id = 'llvuca81nly1qls'")
    summary = quality.validate_run(run, fresh_pg_url)
    assert [(f["table"], f["check"]) for f in summary["failures"]] == [("demo2", "checksums")]
    assert summary["failures"][0]["observed"]["changed"] == 1


def test_checks_the_catalog_proves_skip_gx_and_without_a_valid_constraint_gx_still_catches(
        fresh_pg_url, fixture_022):
    run = migrate(fixture_022, fresh_pg_url, "fx", "proven")
    with psycopg.connect(fresh_pg_url, autocommit=True) as conn:
        for sql in (
            # the foreign key comes back NOT VALID over a dangling id: it proves nothing
            "ALTER TABLE fx_staging.users DROP CONSTRAINT fk_users_rel",
            "UPDATE fx_staging.users SET rel = 'nowhere' WHERE id = 'oap640cot4yru2s'",
            "ALTER TABLE fx_staging.users ADD CONSTRAINT fk_users_rel FOREIGN KEY (rel) "
            "REFERENCES fx_staging.demo2 (id) NOT VALID",
            # no NOT NULL any more: GX counts the NULL
            "ALTER TABLE fx_staging.demo2 ALTER COLUMN title DROP NOT NULL",
            "UPDATE fx_staging.demo2 SET title = NULL WHERE id = 'llvuca81nly1qls'",
        ):
            conn.execute(sql)

    summary = quality.validate_run(run, fresh_pg_url)

    checks = _checks(fresh_pg_url, run["run_id"])
    assert len(checks) == summary["checks"]
    ok, obs = checks[("users", "no_orphans:rel->demo2")]
    assert not ok and obs["examples"] == ["oap640cot4yru2s"] and "proven_by_constraint" not in obs
    ok, obs = checks[("demo2", "not_null:title")]
    assert not ok and obs["unexpected_count"] == 1 and obs["examples"] == ["llvuca81nly1qls"]
    # what the constraints do prove passes without a GX query, under the same check names
    assert checks[("users", "primary_key_unique")] == (True, {"proven_by_constraint": "users_pkey",
                                                              "observed_value": 0})
    assert checks[("users", "primary_key_not_null")][1]["proven_by_constraint"] == "users.id NOT NULL"
    assert checks[("demo4", "not_null:rel_one_no_cascade_required")][1]["unexpected_count"] == 0
    assert checks[("demo1", "no_orphans:demo1_rel_many.target_id->users")][1] == {
        "proven_by_constraint": "demo1_rel_many_target_id_fk", "observed_value": 0}
    # the row count and the select sets are never proven: GX counts them
    assert checks[("demo1", "row_count")][1]["observed_value"] == 3
    assert "proven_by_constraint" not in checks[("demo5", "in_set:select_one")][1]
    gx_ran = json.loads(Path(summary["results"]).read_text())["gx"]["users"]["results"]
    gx_checks = {r["expectation_config"]["meta"]["check"] for r in gx_ran}
    assert "no_orphans:rel->demo2" in gx_checks and "primary_key_unique" not in gx_checks


def test_catalog_proofs_count_only_what_postgresql_enforces(pg):
    pg.execute("DROP SCHEMA IF EXISTS proofs CASCADE")
    for sql in (
        "CREATE SCHEMA proofs",
        "CREATE TABLE proofs.t (id text PRIMARY KEY, n text, u text NOT NULL, p text NOT NULL, q text)",
        "CREATE UNIQUE INDEX t_u ON proofs.t (u)",  # null-free column: proves uniqueness
        "CREATE UNIQUE INDEX t_p ON proofs.t (p) WHERE p <> ''",  # partial: proves nothing
        "CREATE UNIQUE INDEX t_q ON proofs.t (q)",  # two NULLs pass it but are a GROUP BY duplicate
        "CREATE TABLE proofs.r (id text PRIMARY KEY, a text, b text, c text)",
        "ALTER TABLE proofs.r ADD CONSTRAINT r_a FOREIGN KEY (a) REFERENCES proofs.t (id)",
        "INSERT INTO proofs.r VALUES ('1', NULL, 'ghost', NULL)",  # NOT VALID checks new rows only
        "ALTER TABLE proofs.r ADD CONSTRAINT r_b FOREIGN KEY (b) REFERENCES proofs.t (id) NOT VALID",
        "ALTER TABLE proofs.r ADD CONSTRAINT r_c FOREIGN KEY (c) REFERENCES proofs.t (id)",
        # r_c's check trigger disabled: it no longer holds r's rows to anything
        """DO $$ DECLARE g name; BEGIN
             FOR g IN SELECT tgname FROM pg_trigger WHERE tgrelid = 'proofs.r'::regclass
                AND tgconstraint = (SELECT oid FROM pg_constraint WHERE conname = 'r_c') LOOP
               EXECUTE format('ALTER TABLE proofs.r DISABLE TRIGGER %I', g);
             END LOOP; END $$""",
        "UPDATE proofs.r SET c = 'ghost'",  # r_c lets it in
    ):
        pg.execute(sql)

    proofs = quality.catalog_proofs(pg, "proofs")

    assert proofs[("unique", "t", "id")] == "t_pkey" and proofs[("not_null", "t", "id")] == "t.id NOT NULL"
    assert proofs[("unique", "t", "u")] == "t_u" and ("not_null", "t", "u") in proofs
    assert ("unique", "t", "p") not in proofs and ("unique", "t", "q") not in proofs
    assert ("not_null", "t", "n") not in proofs
    assert proofs[("references", "r", "a", "t")] == "r_a"
    assert ("references", "r", "b", "t") not in proofs and ("references", "r", "c", "t") not in proofs
    pg.execute("DROP SCHEMA proofs CASCADE")
