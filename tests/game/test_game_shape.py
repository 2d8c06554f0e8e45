"""pbgame on a game of another shape: collection and field names from the mapping's ``game:``
section, and a one-line start failure naming what is missing otherwise (real PocketBase,
PostgreSQL, Redis and service)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis
import requests
import yaml

from pbdev.pbserver import PocketBaseServer, check
from pbdev.sample import build_sample
from pbgame.schema import load_schema, required_columns
from pbgame.testbed import GameServer, migrate
from pbmigrate.errors import MappingError
from pbmigrate.plan.mapping import MAPPINGS_DIR
from tests.conftest import REDIS_TEST_URL, ROOT, _create_db, _drop_db


def _mapping(tmp: Path, extra: dict) -> str:
    """game.yaml with `extra` merged into its top level (None drops a key), as a file of its own."""
    doc = yaml.safe_load((MAPPINGS_DIR / "game.yaml").read_text())
    for key, value in extra.items():
        merged = {**doc.get(key, {}), **value} if isinstance(value, dict) else value
        doc[key] = {k: v for k, v in merged.items() if v is not None} if isinstance(merged, dict) else merged
    path = tmp / f"m_{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


OTHER_SHAPE = {
    "collections": {
        "participants": None,  # renamed in PocketBase: the collection is now match_players
        "match_players": {"table": "game_sessions", "rename": {"match": "game_id", "player": "player_id"}},
        "inventory": {"table": "player_inventory", "rename": {"owner": "player_id"}},
    },
    "game": {"participants": {"collection": "match_players", "fields": {"user": "player"}},
             "inventory": {"fields": {"user": "owner"}}},
}


def test_roles_name_the_collections_and_fields_and_a_wrong_role_is_one_line(tmp_path: Path) -> None:
    game = load_schema(_mapping(tmp_path, OTHER_SHAPE))
    n = game.names
    assert n.coll("participants") == "match_players" and n.src("participants", "user") == "player"
    assert n.table("participants") == "game_sessions" and n.col("participants", "user") == "player_id"
    assert n.src("inventory", "user") == "owner" and n.col("inventory", "user") == "player_id"
    assert "player_id" in required_columns(game)["game_sessions"]
    with pytest.raises(MappingError, match=r"game\.participant: unknown role.*'participants'"):
        load_schema(_mapping(tmp_path, {"game": {"participant": "x"}}))
    with pytest.raises(MappingError, match=r"game\.inventory\.fields\.owner: unknown field role"):
        load_schema(_mapping(tmp_path, {"game": {"inventory": {"fields": {"owner": "user"}}}}))


def _rename(pb: PocketBaseServer, collection: str, new_name: str | None, fields: dict[str, str]) -> None:
    coll = pb.collection(collection)
    for f in coll["fields"]:
        f["name"] = fields.get(f["name"], f["name"])
    indexes = []
    for ix in coll["indexes"]:  # PocketBase re-creates them: they must name the new table and columns
        head, on, tail = ix.partition(" ON ")
        for old, new in fields.items():
            tail = re.sub(rf"\b{old}\b", new, tail)
        if new_name:
            tail = re.sub(rf"\b{collection}\b", new_name, tail)
        indexes.append(head + on + tail)
    body = {"fields": coll["fields"], "indexes": indexes} | ({"name": new_name} if new_name else {})
    check(pb.admin.patch(f"/api/collections/{coll['id']}", json=body))


@pytest.fixture(scope="module")
def other_game(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """The sample with `participants` renamed `match_players` (`user` -> `player`) and inventory's
    `user` renamed `owner` in PocketBase itself, migrated with a mapping that says so."""
    tmp = tmp_path_factory.mktemp("shape")
    info = build_sample(tmp / "sample", rows=3000, api_users=2)
    db = f"pbm_shape_{uuid.uuid4().hex[:8]}"
    pg_url = _create_db(db)
    client = redis.Redis.from_url(REDIS_TEST_URL, decode_responses=True)
    client.flushdb()
    su = info["superuser"]
    try:
        with PocketBaseServer(info["pb_data"]) as pb:
            pb.session(su["email"], su["password"])
            _rename(pb, "participants", "match_players", {"user": "player"})
            _rename(pb, "inventory", None, {"user": "owner"})
            mapping = _mapping(tmp, OTHER_SHAPE)
            run = migrate(info["pb_data"], pg_url, REDIS_TEST_URL, mapping=mapping, work_dir=tmp / "work")
            players = check(pb.admin.get("/api/collections/users/records",
                                         params={"perPage": 8, "sort": "email", "fields": "id,email"}))["items"]
            yield {"pb": pb, "su": su, "pg_url": pg_url, "run": run, "mapping": mapping, "tmp": tmp,
                   "players": players, "password": info["player_password"], "redis": client}
    finally:
        client.flushdb()
        client.close()
        _drop_db(db)
        shutil.rmtree(tmp, ignore_errors=True)


def _env(g: dict, mapping: str, schema: str | None = None) -> dict[str, str]:
    return {"PBG_PG_URL": g["pg_url"], "PBG_REDIS_URL": REDIS_TEST_URL,
            "PBG_SCHEMA": schema or g["run"]["target_schema"],
            "PBG_MAPPING": mapping, "PBG_POCKETBASE_URL": g["pb"].url, "PBG_POCKETBASE_EMAIL": g["su"]["email"],
            "PBG_POCKETBASE_PASSWORD": g["su"]["password"], "PBG_FLAG_TTL": "0.2", "PBG_TRUST_PROXY": "1"}


def test_a_game_of_another_shape_answers_the_same_on_both_backends(other_game: dict) -> None:
    g = other_game
    first, last = g["players"][0]["id"], g["players"][-1]["id"]
    with GameServer(_env(g, g["mapping"]), log_path=g["tmp"] / "svc.log") as svc:
        answers: dict[str, list] = {}
        for n, backend in enumerate(("pocketbase", "postgres")):
            g["redis"].set("pbm:backend", backend)
            time.sleep(0.35)  # the flag is cached for 0.2 s
            got = []
            for i, p in enumerate(g["players"]):
                login = requests.post(svc.url + "/api/login", json={"email": p["email"], "password": g["password"]},
                                      headers={"X-Forwarded-For": f"10.9.{n}.{i + 1}"}, timeout=10)
                assert login.status_code == 200, (backend, login.text)
                h = {"Authorization": "Bearer " + login.json()["token"]}
                got.append([requests.get(svc.url + path, headers=h, timeout=10).json()
                            for path in ("/api/players/me/matches", "/api/players/me/inventory")])
            answers[backend] = got
            # a match result written through the renamed collection and fields (h: the last player's session)
            posted = requests.post(svc.url + "/api/matches", headers=h, timeout=10, json={
                "season": "2026-S1", "mode": "ranked", "map": "Old Quarter", "players": [last, first],
                "winner": first, "scores": {first: 10.0, last: 5.0}})
            assert posted.status_code == 201, (backend, posted.text)
    # every player but the last two (whose histories the first write grew) answers the same on both
    assert answers["pocketbase"][1:-1] == answers["postgres"][1:-1]
    assert any(hist for hist, _ in answers["postgres"]) and any(inv for _, inv in answers["postgres"])
    history = next(hist for hist, _ in answers["postgres"] if hist)
    assert {"game_id", "team", "score"} <= set(history[0])  # PostgreSQL's names, from the renamed fields
    pb_matches = check(g["pb"].admin.get("/api/collections/match_players/records", params={
        "filter": f"player='{last}'", "perPage": 200, "fields": "id"}))["items"]
    assert len(pb_matches) == len(answers["pocketbase"][-1][0]) + 1  # the PocketBase write used `player`


def test_the_sample_mapping_on_that_pocketbase_fails_at_start_naming_what_is_missing(other_game: dict) -> None:
    g = other_game
    log = g["tmp"] / "wrong.log"
    with pytest.raises(RuntimeError, match="exited"):
        GameServer(_env(g, "game.yaml"), log_path=log).start()
    (line,) = [x for x in log.read_text().splitlines() if "lacks what the game journeys need" in x]
    assert f"PocketBase {g['pb'].url} lacks" in line
    assert "participants," in line and "inventory.user" in line and "match_players" not in line


def test_a_schema_without_the_game_fails_at_start_naming_tables_and_columns(other_game: dict) -> None:
    g = other_game
    with psycopg.connect(g["pg_url"], autocommit=True) as conn:
        conn.execute("CREATE SCHEMA bare; CREATE TABLE bare.players (id text, email text)")
    log = g["tmp"] / "bare.log"
    env = _env(g, g["mapping"], schema="bare") | {"PBG_POCKETBASE_URL": ""}
    with pytest.raises(RuntimeError, match="exited"):
        GameServer(env, log_path=log).start()
    (line,) = [x for x in log.read_text().splitlines() if "lacks what the game journeys need" in x]
    assert "PostgreSQL schema bare lacks" in line and "players.xp" in line and "game_sessions" in line


def test_the_load_test_follows_the_roles_on_both_backends(other_game: dict) -> None:
    """The runner's existing-data mode (the pipeline's loadtest step) on that game: PocketBase's
    reference journeys use the renamed collection and fields too, so none fails (last: it writes)."""
    from pbmigrate.source.snapshot import take_snapshot

    g = other_game
    snap = take_snapshot(g["pb"].data_dir, g["tmp"] / "snap" / "data.db").path
    out = g["tmp"] / "lt"
    env = {**os.environ, "USERS": "30", "SPAWN_RATE": "30", "DURATION": "4", "THINK": "1,2", "LOGIN_SHARE": "0",
           "CAPACITY_STEPS": "100", "COOLDOWN": "1", "SERVICE_WORKERS": "1", "OUT": str(out),
           "LT_PG_URL": g["pg_url"], "LT_SCHEMA": g["run"]["staging_schema"], "LT_MAPPING": g["mapping"],
           "LT_PB_DATA": snap}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "loadtest" / "run.py")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(Path(proc.stdout.strip().splitlines()[-1]).read_text())
    for backend in ("pocketbase", "postgres"):
        ends = result[backend]["endpoints"]
        assert {"history", "inventory", "match_result", "leaderboard"} <= set(ends), (backend, ends)
        assert all(e["requests"] > 0 and e["failures"] == 0 for e in ends.values()), (backend, ends)
