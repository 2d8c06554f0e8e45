"""The pre-migration assessment and the `pbmigrate` console script, on real PocketBase databases."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from pbdev.sample import build_sample
from pbmigrate import tasks
from pbmigrate.plan.mapping import load_mapping
from pbmigrate.source.sqlite import SqliteSource
from pbmigrate.validate.assess import assess, render


@pytest.fixture(scope="module")
def dirty(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A sample game built by a real PocketBase server, with one bad value of each kind planted,
    plus two emails that differ only by letter case."""
    info = build_sample(tmp_path_factory.mktemp("dirty"), rows=1500, dirty=True, api_users=2)
    with sqlite3.connect(Path(info["pb_data"]) / "data.db") as raw:
        (a, b) = [r[0] for r in raw.execute("SELECT id FROM users ORDER BY id LIMIT 2")]
        raw.execute("UPDATE users SET email = 'Twin@Example.com' WHERE id = ?", (a,))
        raw.execute("UPDATE users SET email = 'twin@example.com' WHERE id = ?", (b,))
    return info


@pytest.fixture(scope="module")
def report(dirty: dict) -> dict:
    src = SqliteSource(dirty["pb_data"])
    try:
        return assess(src, load_mapping("game.yaml"))
    finally:
        src.close()


def _collection(report: dict, name: str) -> dict:
    return next(c for c in report["collections"] if c["collection"] == name)


def _planted(dirty: dict, problem: str) -> dict:
    return next(p for p in dirty["dirty"] if p["problem"] == problem)


@pytest.mark.parametrize(("problem", "key"), [
    ("malformed date", "started: not a date"),
    ("NUL byte in text", "display_name: NUL byte in text (PostgreSQL text cannot hold it)"),
    ("fraction in an onlyInt number", "level: fraction in an integer-only number"),
    ("invalid JSON", "attributes: invalid JSON"),
])
def test_each_kind_of_bad_value_is_found_with_its_record(report, dirty, problem, key):
    planted = _planted(dirty, problem)
    found = _collection(report, planted["collection"])["bad_values"]
    assert planted["id"] in found[key]["examples"]


def test_dangling_single_and_multi_relations_are_found(report, dirty):
    single = _planted(dirty, "dangling relation")
    multi = _planted(dirty, "dangling relation (multi)")
    assert single["id"] in _collection(report, "participants")["dangling"]["user"]["examples"]
    assert multi["id"] in _collection(report, "matches")["dangling"]["players"]["examples"]


def test_emails_that_differ_only_by_case_are_reported(report):
    dup = [d for d in _collection(report, "users")["duplicates"] if d.get("case_only")]
    assert dup and dup[0]["field"] == "email" and dup[0]["groups"] == 1


def test_types_renames_secrets_and_skipped_collections_are_listed(report):
    users = {f["field"]: f for f in _collection(report, "users")["fields"]}
    assert users["password"]["column"] == "password_hash" and users["password"].get("secret")
    assert users["level"]["pg_type"] == "bigint" and users["created"]["pg_type"] == "timestamptz"
    games = {f["field"]: f for f in _collection(report, "matches")["fields"]}
    assert games["players"]["pg_type"] == "junction table"
    skipped = {s["collection"]: s["reason"] for s in report["skipped"]}
    assert "derived" in skipped["leaderboard"] and "_superusers" in skipped
    assert "_params" in report["skipped_tables"]


def test_collections_without_updated_are_named(fixture_022: Path, tmp_path: Path):
    from pbdev.pbserver import PocketBaseServer

    with PocketBaseServer(tmp_path / "pb_data") as pb:
        pb.create_superuser("admin@example.com", "admin-pass-123")
        pb.create_collection({"name": "tags", "type": "base", "autodate": False,
                              "fields": [{"name": "label", "type": "text"}]})
    src = SqliteSource(tmp_path / "pb_data")
    try:
        rep = assess(src, load_mapping(None))
    finally:
        src.close()
    assert "tags" in rep["totals"]["without_updated"]
    assert "re-sync compares by checksum" in render(rep)


def test_rendered_table_never_shows_secret_values(report):
    text = render(report)
    assert "$2a$" not in text and "tokenKey" in text


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pbmigrate.cli", *args], capture_output=True, text=True, timeout=120)


def test_cli_prints_a_table_and_json(dirty):
    table = _cli("assess", dirty["pb_data"], "--mapping", "game")
    assert table.returncode == 0 and "users (auth) -> players" in table.stdout
    data = json.loads(_cli("assess", dirty["pb_data"], "--mapping", "game", "--json").stdout)
    assert data["totals"]["bad_values"] >= 4


@pytest.mark.parametrize(("make", "message"), [
    (lambda d: d / "missing.db", "no such file"),
    (lambda d: (d / "text.db").write_text("hello") and d / "text.db", "not a SQLite database file"),
    (lambda d: sqlite3.connect(d / "plain.db").execute("CREATE TABLE t (x)") and d / "plain.db",
     "not a PocketBase database"),
])
def test_cli_bad_input_is_one_line_and_non_zero(tmp_path, make, message):
    out = _cli("assess", str(make(tmp_path)))
    assert out.returncode != 0
    assert out.stderr.count("\n") == 1 and message in out.stderr and "Traceback" not in out.stderr


def test_cli_unknown_field_type_names_collection_field_and_type(fixture_022, tmp_path):
    with sqlite3.connect(fixture_022 / "data.db") as raw:
        raw.execute("UPDATE _collections SET schema = json_set(schema, '$[0].type', 'vector') WHERE name = 'demo2'")
    out = _cli("assess", str(fixture_022))
    assert out.returncode != 0 and out.stderr.count("\n") == 1
    assert "'demo2'" in out.stderr and "'title'" in out.stderr and "'vector'" in out.stderr


def test_the_dag_assessment_after_the_load_reads_its_rejects_and_matches_the_scan(report, dirty, fresh_pg_url):
    """The DAG assesses after the load, from the load's own rejects: the same report as the scan."""
    params = tasks.run_params(source_path=str(dirty["pb_data"]), target_schema="assessed", mapping="game.yaml",
                              batch_size=400, collections=[], orphans="reject")
    run = tasks.prepare(params=params, pg_url=fresh_pg_url, dag_run_id="assessed")
    tasks.create_schema(run, fresh_pg_url)
    for unit in tasks.plan_batches(run):
        tasks.run_batch(run, unit, fresh_pg_url)
    tasks.assess(run, fresh_pg_url)
    with psycopg.connect(fresh_pg_url) as conn:
        (stored,) = conn.execute("SELECT assessment FROM pbm_meta.runs WHERE run_id = %s",
                                 (run["run_id"],)).fetchone()
    assert stored["totals"]["bad_values"] >= 4
    assert stored == json.loads(json.dumps(report))


def test_only_unique_indexes_the_snapshot_does_not_hold_are_scanned_for_duplicates(fixture_022):
    """A unique index SQLite holds was enforced on every write: no GROUP BY scan for it. One that
    PocketBase declares but SQLite lacks (drift) is scanned, and its duplicates reported."""
    with sqlite3.connect(fixture_022 / "data.db") as raw:
        raw.execute("UPDATE _collections SET indexes = json_insert(indexes, '$[#]', 'CREATE UNIQUE INDEX "
                    "`idx_title_nocase` ON `demo3` (`title` COLLATE NOCASE)') WHERE name = 'demo3'")
        raw.execute("UPDATE demo3 SET title = 'SameName' WHERE id = '1tmknxy2868d869'")
        raw.execute("UPDATE demo3 SET title = 'samename' WHERE id = 'mk5fmymtx4wsprk'")
    src = SqliteSource(fixture_022)
    try:
        statements: list[str] = []
        src.conn.set_trace_callback(statements.append)
        rep = assess(src, load_mapping(None))
    finally:
        src.close()
    scans = [s for s in statements if "GROUP BY" in s and "HAVING count(*) > 1" in s]
    assert len(scans) == 1 and "COLLATE NOCASE" in scans[0]  # demo2's, demo4's, the auth ones: held
    assert _collection(rep, "demo3")["duplicates"] == [{"index": "idx_title_nocase", "groups": 1, "rows": 2}]


def test_the_assessment_module_leaves_pyarrow_to_the_scan_that_needs_it():
    code = "import sys, pbmigrate.validate.assess; print('pyarrow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"
