"""The sample game database is what PocketBase itself would hold, and PocketBase serves it.

Protects: bulk rows in PocketBase's exact storage formats (the restarted server counts them and
logs players in with reused bcrypt hashes), resolvable relations, the mapping's collection
names, and the planted bad values of `dirty=True`.
"""

from __future__ import annotations

import json
import re
import sqlite3
from datetime import datetime, timedelta
from pathlib import Path

import pytest
import requests

from pbdev.pbserver import PocketBaseServer
from pbdev.sample import COLLECTIONS, PLAYER_PASSWORD, build_sample, main
from pbmigrate.source.catalog import read_catalog
from pbmigrate.source.snapshot import open_readonly

ID = re.compile(r"^[a-z0-9]{15}$")
DATE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture(scope="module")
def sample40(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return build_sample(tmp_path_factory.mktemp("sample40"), rows=3000)


@pytest.fixture(scope="module")
def sample22(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return build_sample(tmp_path_factory.mktemp("sample22"), rows=1000, version="0.22.27",
                        dirty=True, api_users=4)


def _login(pb: PocketBaseServer, email: str, password: str) -> requests.Response:
    return requests.post(f"{pb.url}/api/collections/users/auth-with-password",
                         json={"identity": email, "password": password}, timeout=30)


@pytest.mark.parametrize("name", ["sample40", "sample22"])
def test_server_counts_every_collection_and_players_log_in(name: str, request: pytest.FixtureRequest
                                                           ) -> None:
    sample = request.getfixturevalue(name)
    assert set(sample["counts"]) == set(COLLECTIONS)
    assert all(n > 0 for n in sample["counts"].values())
    with PocketBaseServer(sample["pb_data"], version=sample["version"]) as pb:
        pb.session(sample["superuser"]["email"], sample["superuser"]["password"])
        assert {c: pb.total(c) for c in COLLECTIONS} == sample["counts"]
        api_user = sample["api_users"][0]
        ok = _login(pb, api_user, PLAYER_PASSWORD)
        assert ok.status_code == 200, ok.text
        assert ok.json()["record"]["email"] == api_user
        assert _login(pb, api_user, "wrong-password").status_code == 400
        bulk_user = f"player{len(sample['api_users']) + 5}@example.com"
        assert _login(pb, bulk_user, PLAYER_PASSWORD).status_code == 200


def test_total_rows_are_close_to_the_request(sample40: dict) -> None:
    assert 2700 <= sample40["rows"] <= 3300
    assert sample40["dirty"] == []


def test_rows_use_pocketbase_storage_formats_and_relations_resolve(sample40: dict) -> None:
    conn = open_readonly(sample40["pb_data"])
    try:
        users = {r[0] for r in conn.execute("SELECT id FROM users")}
        matches = {r[0] for r in conn.execute("SELECT id FROM matches")}
        for table in COLLECTIONS:
            for rid, created, updated in conn.execute(f'SELECT id, created, updated FROM "{table}"'):
                assert ID.match(rid) and DATE.match(created) and DATE.match(updated), (table, rid)
                # PocketBase stamps its two autodates one after the other: a record made through the
                # API can show `updated` a millisecond before `created`. The builder's rows never do.
                lag = datetime.fromisoformat(created) - datetime.fromisoformat(updated)
                assert updated >= created or lag <= timedelta(milliseconds=2), (table, rid, created, updated)
        for table in ("participants", "leaderboard", "inventory", "achievements", "user_stats"):
            refs = {r[0] for r in conn.execute(f'SELECT "user" FROM "{table}"')}
            assert refs <= users, table
        assert {r[0] for r in conn.execute('SELECT "match" FROM participants')} <= matches
        emails = [r[0] for r in conn.execute("SELECT email FROM users")]
        assert len(set(emails)) == len(emails)
        tokens = [r[0] for r in conn.execute('SELECT "tokenKey" FROM users')]
        assert len(set(tokens)) == len(tokens) and all(len(t) == 50 for t in tokens)
        assert all(h.startswith("$2a$10$") for (h,) in conn.execute("SELECT password FROM users"))
        for status, players, winner, state, started in conn.execute(
                "SELECT status, players, winner, state, started FROM matches"):
            ids = json.loads(players)
            assert 2 <= len(ids) <= 10 and set(ids) <= users and len(set(ids)) == len(ids)
            assert (winner in ids) if status == "finished" else winner == ""
            if status == "in_progress":
                assert set(json.loads(state)["scores"]) == set(ids)
            else:
                assert state is None
            assert (started == "") == (status == "waiting")
        in_progress = conn.execute("SELECT count(*) FROM matches WHERE status='in_progress'").fetchone()[0]
        assert in_progress >= 3
        assert {r[0] for r in conn.execute("SELECT DISTINCT typeof(level) FROM users")} == {"integer"}
        # NUMERIC affinity: 1234.5 stays real, 1200.0 becomes integer, as PocketBase's own writes
        assert {r[0] for r in conn.execute("SELECT DISTINCT typeof(rating) FROM user_stats")} <= {
            "integer", "real"}
        dup = conn.execute('SELECT count(*) FROM (SELECT "match", "user" FROM participants '
                           'GROUP BY 1, 2 HAVING count(*) > 1)').fetchone()[0]
        assert dup == 0
        # the builder drops and rebuilds indexes around the bulk load: all are back
        indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        assert {"idx_participants_match_user", "idx_achievements_user_code", "idx_user_stats_user_season",
                "idx_email__pb_users_auth_", "idx_tokenKey__pb_users_auth_"} <= indexes
    finally:
        conn.close()


def test_catalog_of_the_sample_matches_the_game_schema(sample40: dict, sample22: dict) -> None:
    for sample in (sample40, sample22):
        conn = open_readonly(sample["pb_data"])
        try:
            catalog = read_catalog(conn)
        finally:
            conn.close()
        users = catalog.get("users")
        assert users.type == "auth" and users.field("display_name").required
        assert users.field("level").only_int and users.field("country").values[0] == "VN"
        players = catalog.get("matches").field("players")
        assert players.multi and players.max_select == 10 and players.target == users.id
        match = catalog.get("participants").field("match")
        assert match.required and match.cascade_delete and not match.multi
        assert catalog.get("achievements").field("tags").multi
        assert any("UNIQUE" in ix and "user_stats" in ix for ix in catalog.get("user_stats").indexes)
        assert {c.name for c in catalog.migrating()} == set(COLLECTIONS)


def test_dirty_build_plants_each_kind_of_bad_value(sample22: dict) -> None:
    planted = {(d["collection"], d["field"]): d["id"] for d in sample22["dirty"]}
    assert len(planted) == 6
    conn = sqlite3.connect(f"file:{sample22['pb_data']}/data.db?mode=ro", uri=True)
    try:
        def value(table: str, column: str) -> object:
            rid = planted[(table, column)]
            return conn.execute(f'SELECT "{column}" FROM "{table}" WHERE id=?', (rid,)).fetchone()[0]

        users = {r[0] for r in conn.execute("SELECT id FROM users")}
        assert value("participants", "user") not in users
        assert not set(json.loads(value("matches", "players"))) <= users
        assert not DATE.match(value("matches", "started"))
        assert "\x00" in value("users", "display_name")
        assert value("users", "level") == 7.5
        with pytest.raises(json.JSONDecodeError):
            json.loads(value("inventory", "attributes"))
    finally:
        conn.close()


def test_cli_prints_the_counts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--rows", "400", "--out", str(tmp_path), "--seed", "3", "--api-users", "2"]) == 0
    out = capsys.readouterr().out
    for name in COLLECTIONS:
        assert re.search(rf"^\s+{name}\s+\d+$", out, re.M), name
    assert (tmp_path / "pb_data" / "data.db").exists()
