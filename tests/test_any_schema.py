"""Any PocketBase, any game: databases this project did not design, migrated with the mapping that
`pbmigrate mapping init` writes for them, promoted; and mappings that cannot work fail at once.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import uuid
from pathlib import Path

import psycopg
import pytest
import redis
import yaml

from pbmigrate import cli, tasks
from pbmigrate.cutover import promote
from pbmigrate.errors import MappingError
from pbmigrate.source.sqlite import SqliteSource
from pbmigrate.validate import quality
from tests.foreign_dbs import ForeignDB, build_farming, build_racing
from tests.pbdbs import build_every_type_db


@pytest.fixture(scope="session")
def racing(tmp_path_factory: pytest.TempPathFactory) -> ForeignDB:
    return build_racing(tmp_path_factory.mktemp("racing"))


@pytest.fixture(scope="session")
def farming(tmp_path_factory: pytest.TempPathFactory) -> ForeignDB:
    return build_farming(tmp_path_factory.mktemp("farming"))


@pytest.fixture(autouse=True)
def work_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PBM_WORK_DIR", str(tmp_path / "work"))
    return tmp_path / "work"


def mapping_init(pb_data: Path, out: Path) -> Path:
    assert cli.main(["mapping", "init", str(pb_data), "-o", str(out)]) == 0
    return out


def _status(pg_url: str, target: str) -> tuple[str, str]:
    with psycopg.connect(pg_url) as conn:
        return conn.execute("SELECT run_id, status FROM pbm_meta.runs WHERE target_schema = %s "
                            "ORDER BY started_at DESC LIMIT 1", (target,)).fetchone()


def _rows(pg_url: str, schema: str, table: str) -> int:
    with psycopg.connect(pg_url) as conn:
        return conn.execute(f'SELECT count(*) FROM "{schema}"."{table}"').fetchone()[0]


def _failed_checks(pg_url: str, run_id: str) -> list:
    with psycopg.connect(pg_url) as conn:
        return conn.execute("SELECT target_table, check_name, observed FROM pbm_meta.checks "
                            "WHERE run_id = %s AND NOT success", (run_id,)).fetchall()


def migrate_and_promote(run_dag, pg_url: str, redis_url: str, pb_data: Path, target: str, mapping: Path,
                        counts: dict[str, int], **conf: object) -> str:
    """A full DAG run with the gate at max_reject_ratio 0: it must end promoted with every record."""
    conf = {"source_path": str(pb_data), "target_schema": target, "mapping": str(mapping), "max_reject_ratio": 0,
            **conf}
    dr = run_dag("pocketbase_migration", conf, pg_url=pg_url, redis_url=redis_url)
    run_id, status = _status(pg_url, target)
    assert dr.state == "success", _failed_checks(pg_url, run_id)
    assert status == "promoted"
    for coll, n in counts.items():
        assert _rows(pg_url, target, coll) == n, coll
    return run_id


def test_racing_game_on_040_is_promoted_with_its_starter_mapping(run_dag, fresh_pg_url, redis_url, racing, tmp_path):
    path = mapping_init(racing.pb_data, tmp_path / "racing.yaml")
    doc = yaml.safe_load(path.read_text())
    # What the starter decided for a schema it never saw: relations named for their targets,
    # a junction table for the entrants, the leaderboard from standings' elo per ladder.
    assert doc["collections"]["races"]["rename"]["track"] == "track_id"
    assert doc["collections"]["races"]["rename"]["rematch_of"] == "rematch_of_id"
    assert doc["collections"]["races"]["junctions"]["entrants"] == {
        "table": "races_entrants", "owner": "race_id", "target": "pilot_id"}
    assert doc["collections"]["Pilots"]["rename"]["where"] == "where"
    assert doc["cache"]["leaderboards"] == {"table": "standings", "season": "ladder", "member": "pilot_id",
                                            "score": "elo", "top": 100}
    assert "password" not in doc["cache"]["profiles"]["fields"] and "tokenKey" not in doc["cache"]["profiles"]["fields"]
    assert doc["cache"]["game_state"]["table"] == "races"

    migrate_and_promote(run_dag, fresh_pg_url, redis_url, racing.pb_data, "racing", path, racing.counts,
                        batch_size=4)
    assert _rows(fresh_pg_url, "racing", "races_entrants") == 3 + 3 + 3 + 3 + 2  # six pilots, three a race
    r = redis.Redis.from_url(redis_url)
    top = r.zrevrange("leaderboard:{2026-S1}:top", 0, 0, withscores=True)
    assert top and top[0][1] == 1200 + 37 * 5  # the best elo of the ladder
    assert r.get("pbm:backend") == b"postgres"


def test_farming_game_on_022_is_promoted_with_its_starter_mapping(run_dag, fresh_pg_url, redis_url, farming,
                                                                  tmp_path):
    path = mapping_init(farming.pb_data, tmp_path / "farming.yaml")
    doc = yaml.safe_load(path.read_text())
    assert doc["collections"]["Farms"]["junctions"]["neighbours"]["table"] == "Farms_neighbours"
    assert doc["collections"]["Farms"]["rename"]["owner"] == "owner_id"
    assert doc["cache"]["leaderboards"]["table"] == "harvest_stats"
    migrate_and_promote(run_dag, fresh_pg_url, redis_url, farming.pb_data, "farming", path, farming.counts)
    with psycopg.connect(fresh_pg_url) as conn:
        hashes = conn.execute('SELECT "passwordHash" FROM farming.users').fetchall()
    assert hashes and all(h.startswith("$2a$") for (h,) in hashes)


def test_every_field_type_of_040_geopoint_included_is_promoted_with_no_reject(run_dag, fresh_pg_url, redis_url,
                                                                             tmp_path):
    db = build_every_type_db(tmp_path / "every", "0.40.6")
    path = mapping_init(db.pb_data, tmp_path / "every.yaml")
    counts = {c: n for c, n in db.counts.items() if c != "everything_view"}
    run_id = migrate_and_promote(run_dag, fresh_pg_url, redis_url, db.pb_data, "every", path, counts)
    with psycopg.connect(fresh_pg_url) as conn:
        checks = dict(conn.execute("SELECT check_name, success FROM pbm_meta.checks WHERE run_id = %s "
                                   "AND target_table = 'everything'", (run_id,)).fetchall())
        point = conn.execute("SELECT location[0], location[1] FROM every.everything WHERE title = %s",
                             (db.sent["full"]["title"],)).fetchone()
    assert checks["not_null:location"] and checks["checksums"] and checks["row_count"]
    assert point == (23.32, 42.69)


def test_type_overrides_numeric_uuid_inet_pass_every_check(fresh_pg_url, racing, tmp_path):
    """Columns typed by the mapping, not by the plan, are validated like any other: GX reflects
    them and the checksums agree (numeric cast back to the field's type; inet and uuid hashed as
    PostgreSQL prints them, so '2001:db8::0' and an upper-case uuid are no mismatch)."""
    db = tmp_path / "pb_data"
    shutil.copytree(racing.pb_data, db)
    with sqlite3.connect(db / "data.db") as raw:  # values of the shapes the overrides need
        for n, (rid,) in enumerate(raw.execute("SELECT id FROM Pilots ORDER BY id").fetchall()):
            address = f"10.0.0.{n}" if n % 2 else f"2001:db8::{n:x}"
            raw.execute('UPDATE Pilots SET "where" = ? WHERE id = ?', (address, rid))
        for (rid,) in raw.execute("SELECT id FROM standings").fetchall():
            raw.execute("UPDATE standings SET ladder = ? WHERE id = ?", (str(uuid.uuid4()).upper(), rid))
    doc = yaml.safe_load(mapping_init(db, tmp_path / "racing.yaml").read_text())
    doc["collections"]["Tracks"]["types"] = {"Length_km": "numeric(8,3)", "from": "varchar(40)"}
    doc["collections"]["standings"]["types"] = {"elo": "numeric", "wins": "integer", "ladder": "uuid"}
    doc["collections"]["Pilots"]["types"] = {"where": "inet"}
    doc.pop("cache")  # the warm-up is not under test here
    path = tmp_path / "typed.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    params = tasks.run_params(source_path=str(db), target_schema="typed", mapping=str(path), batch_size=5,
                                 collections=None, orphans="reject")
    run = tasks.prepare(params=params, pg_url=fresh_pg_url, dag_run_id="typed")
    tasks.create_schema(run, fresh_pg_url)
    for batch in tasks.plan_batches(run):
        tasks.run_batch(run, batch, fresh_pg_url)
    tasks.finalize_run(run, fresh_pg_url)
    summary = quality.validate_run(run, fresh_pg_url)
    assert summary["success"], summary["failures"]
    verdict = promote.gate(run, fresh_pg_url, 0)
    assert verdict["promote"], verdict["reasons"]
    with psycopg.connect(fresh_pg_url) as conn:
        types = dict(conn.execute(
            "SELECT table_name || '.' || column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = 'typed_staging'").fetchall())
    assert types["Pilots.where"] == "inet" and types["standings.ladder"] == "uuid"
    assert types["standings.elo"] == "numeric" and types["Tracks.Length_km"] == "numeric"


# --------------------------------------------------------------------------- refusals


def _nothing_written(pg_url: str) -> bool:
    with psycopg.connect(pg_url) as conn:
        schemas = {s for (s,) in conn.execute("SELECT nspname FROM pg_namespace")}
    return not ({"pbm_meta"} & schemas) and not any(s.endswith("_staging") or s.startswith("pbm_check")
                                                   for s in schemas)


def test_a_mapping_naming_a_missing_collection_fails_after_one_attempt_of_the_first_task(
        run_dag, fresh_pg_url, racing, tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("collections:\n  standing: {table: ranks}\n")
    dr = run_dag("pocketbase_migration", {"source_path": str(racing.pb_data), "target_schema": "typo",
                                          "mapping": str(path)}, pg_url=fresh_pg_url)
    assert dr.state == "failed"
    tis = {ti.task_id: ti for ti in dr.get_task_instances()}
    first = tis["prepare.snapshot"]
    assert first.state == "failed" and first.try_number == 1 and first.max_tries >= 1  # retries allowed, unused
    assert tis["prepare.assess"].state in ("upstream_failed", None)
    assert _nothing_written(fresh_pg_url)


def _prepare(pb_data: Path, pg_url: str, mapping: Path) -> None:
    params = tasks.run_params(source_path=str(pb_data), target_schema="bad", mapping=str(mapping), batch_size=10,
                                 collections=None, orphans="reject")
    tasks.prepare(params=params, pg_url=pg_url, dag_run_id="bad")


@pytest.mark.parametrize(("text", "message"), [
    ("collections:\n  races: {rename: {track: t}\n", r"typo\.yaml: not valid YAML at line \d+, column \d+: "),
    ("collections:\n  standing: {}\n",
     r"collections\.standing: unknown collection 'standing'.*did you mean 'standings'"),
    ("collections:\n  races:\n    rename: {trak: track_id}\n",
     r"collections\.races\.rename\.trak: collection 'races' has no field 'trak' \(did you mean 'track'\?\)"),
    ("collections:\n  races:\n    skip_fields: state\n", r"collections\.races\.skip_fields: .*write \[state\]"),
    ("collections:\n  races:\n    colour: red\n", r"collections\.races: unknown key 'colour'"),
    ("collections:\n  Tracks:\n    types: {Length_km: \"numeric; DROP TABLE x\"}\n",
     r"collections\.Tracks\.types: .*is not a PostgreSQL type name"),
    ("collections:\n  Tracks:\n    types: {Length_km: nosuchtype}\n",
     r"collections\.Tracks: table 'Tracks' cannot be created: type \"nosuchtype\" does not exist"),
    ("derive:\n  podium: SELECT s.pilot_id, s.rating FROM {schema}.standings s\n",
     r"derive\.podium: the SQL fails: column s\.pilot_id does not exist"),
    ("cache:\n  profiles: {table: Pilots, fields: [callsing]}\n",
     r"cache\.profiles\.fields: 'Pilots' has no column 'callsing' \(did you mean 'callsign'\?\)"),
    ("cache:\n  leaderboards: {table: standing, season: ladder, member: pilot, score: elo}\n",
     r"cache\.leaderboards\.table: the migration makes no table or view 'standing' \(did you mean 'standings'\?\)"),
])
def test_a_bad_mapping_is_one_line_naming_file_key_and_problem_before_anything_is_written(
        fresh_pg_url, racing, tmp_path, text, message):
    path = tmp_path / "typo.yaml"
    path.write_text(text)
    with pytest.raises(MappingError, match=message) as exc:
        _prepare(racing.pb_data, fresh_pg_url, path)
    assert "\n" not in str(exc.value) and str(path) in str(exc.value)
    assert _nothing_written(fresh_pg_url)


def test_a_derived_view_needs_no_collection_and_replaces_one_of_its_name(racing, tmp_path):
    from pbmigrate.plan.mapping import load_mapping
    from pbmigrate.plan.model import build_plan

    path = tmp_path / "derive.yaml"
    path.write_text("derive:\n  podium: SELECT 1 AS x\n  lap_log: SELECT 2 AS y\n")
    src = SqliteSource(racing.pb_data / "data.db")
    try:
        plan = build_plan(src.catalog(), load_mapping(str(path)))
    finally:
        src.close()
    assert set(plan.derived) == {"podium", "lap_log"}
    assert "lap_log" not in [t.name for t in plan.tables]
    assert ("lap_log", "derived as view 'lap_log', not copied") in plan.skipped


def test_mapping_init_writes_to_stdout_and_fails_in_one_line_on_a_file_that_is_not_pocketbase(
        racing, tmp_path, capsys):
    assert cli.main(["mapping", "init", str(racing.pb_data)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# pbmigrate mapping for") and "\ncollections:\n" in out
    json.dumps(yaml.safe_load(out))  # valid YAML of plain values
    bogus = tmp_path / "data.db"
    bogus.write_bytes(b"not a database at all" * 100)
    assert cli.main(["mapping", "init", str(bogus)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pbmigrate: ") and "\n" not in err


def test_mapping_init_through_the_api_matches_the_snapshot_s_collections(racing, tmp_path, capsys):
    """API mode (`--url`): the same collections, fields and cache choices as from the file."""
    from pbdev.pbserver import PocketBaseServer
    from tests.foreign_dbs import SUPERUSER

    data = tmp_path / "pb_data"
    shutil.copytree(racing.pb_data, data)
    with PocketBaseServer(data, version=racing.version) as pb:
        email, password = SUPERUSER
        assert cli.main(["mapping", "init", "--url", pb.url, "--email", email, "--password", password]) == 0
    from_api = yaml.safe_load(capsys.readouterr().out)
    assert cli.main(["mapping", "init", str(racing.pb_data)]) == 0
    from_file = yaml.safe_load(capsys.readouterr().out)
    assert from_api["collections"].keys() == from_file["collections"].keys()
    assert from_api["collections"]["races"] == from_file["collections"]["races"]
    assert from_api["cache"]["leaderboards"] == from_file["cache"]["leaderboards"]
    assert password not in json.dumps(from_api)


def test_assess_names_the_closest_collections_for_a_missing_one(racing, tmp_path, capsys):
    path = tmp_path / "typo.yaml"
    path.write_text("collections:\n  pilots: {table: drivers}\n")
    assert cli.main(["assess", str(racing.pb_data), "--mapping", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown collection 'pilots'" in err and "did you mean 'Pilots'" in err and "\n" not in err
