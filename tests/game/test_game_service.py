"""The game API service on a migrated sample: a real PocketBase, PostgreSQL, Redis and uvicorn.

One PocketBase builds the sample and keeps serving it; the engine migrates it into a database of
this module; the service runs as a child process. Each test sets the flag it needs.
"""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
import redis
import requests

from pbdev.pbserver import PocketBaseServer, check
from pbdev.sample import SEASONS, build_sample
from pbgame.testbed import GameServer, migrate, shadow_counts
from tests.conftest import REDIS_TEST_URL, _create_db, _drop_db

NEW_PASSWORD = "changed-before-migration-1"


class Stack:
    url: str
    pg_url: str
    schema: str
    password: str
    players: list[dict[str, str]]
    changed: dict[str, str]  # the player whose password PocketBase changed before the migration
    avatar: tuple[str, str, bytes]  # record id, file name, bytes
    redis: redis.Redis
    server: GameServer

    def flag(self, backend: str) -> None:
        self.redis.set("pbm:backend", backend)
        time.sleep(0.35)  # the service caches the flag for 0.2 s here

    def login(self, email: str, password: str | None = None, ip: str = "10.0.0.1") -> requests.Response:
        return requests.post(self.url + "/api/login", json={"email": email, "password": password or self.password},
                             headers={"X-Forwarded-For": ip}, timeout=10)

    def auth(self, email: str) -> dict[str, str]:
        resp = self.login(email, ip=f"10.1.{uuid.uuid4().int % 250}.{uuid.uuid4().int % 250}")
        assert resp.status_code == 200, resp.text
        return {"Authorization": "Bearer " + resp.json()["token"]}

    def get(self, path: str, headers: dict[str, str]) -> tuple[int, Any]:
        r = requests.get(self.url + path, headers=headers, timeout=10)
        return r.status_code, r.json()

    def metrics(self) -> str:
        return requests.get(self.url + "/metrics", timeout=10).text


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("game")
    info = build_sample(tmp / "sample", rows=4000, api_users=3)
    db = f"pbm_game_{uuid.uuid4().hex[:8]}"
    st = Stack()
    st.pg_url, st.password = _create_db(db), info["player_password"]
    st.redis = redis.Redis.from_url(REDIS_TEST_URL, decode_responses=True)
    st.redis.flushdb()
    su = info["superuser"]
    try:
        with PocketBaseServer(info["pb_data"]) as pb:
            admin = pb.session(su["email"], su["password"])
            users = check(admin.get("/api/collections/users/records",
                                    params={"perPage": 40, "sort": "email", "fields": "id,email,avatar"}))["items"]
            st.players = [{"id": u["id"], "email": u["email"]} for u in users]
            changed = check(admin.get("/api/collections/users/records", params={
                "filter": "email='player1@example.com'", "fields": "id,email"}))["items"][0]
            st.players = [p for p in st.players if p["id"] != changed["id"]]
            check(admin.patch(f"/api/collections/users/records/{changed['id']}",
                              json={"password": NEW_PASSWORD, "passwordConfirm": NEW_PASSWORD}))
            st.changed = {"id": changed["id"], "email": changed["email"]}
            with_avatar = next(u for u in users if u["avatar"])
            body = pb.session(su["email"], su["password"]).get(
                f"/api/files/users/{with_avatar['id']}/{with_avatar['avatar']}").content
            st.avatar = (with_avatar["id"], with_avatar["avatar"], body)
            files = tmp / "files"  # the file store the files issue fills: <root>/<collection>/<record>/<name>
            (files / "users" / with_avatar["id"]).mkdir(parents=True)
            (files / "users" / with_avatar["id"] / with_avatar["avatar"]).write_bytes(body)

            run = migrate(info["pb_data"], st.pg_url, REDIS_TEST_URL, work_dir=tmp / "work")
            st.schema = run["staging_schema"]
            env = {"PBG_PG_URL": st.pg_url, "PBG_REDIS_URL": REDIS_TEST_URL, "PBG_SCHEMA": run["target_schema"],
                   "PBG_POCKETBASE_URL": pb.url, "PBG_POCKETBASE_EMAIL": su["email"],
                   "PBG_POCKETBASE_PASSWORD": su["password"], "PBG_FILES_ROOT": str(files),
                   "PBG_FLAG_TTL": "0.2", "PBG_TRUST_PROXY": "1", "PBG_LOGIN_LIMIT": "20"}
            with GameServer(env, log_path=tmp / "service.log") as server:
                st.server, st.url = server, server.url
                yield st
            log = (tmp / "service.log").read_text()
            for secret in ("$2a$", "$2b$", NEW_PASSWORD, info["player_password"]):
                assert secret not in log  # secrets never reach the logs
    finally:
        st.redis.flushdb()
        st.redis.close()
        _drop_db(db)
        shutil.rmtree(tmp, ignore_errors=True)


def _reads(st: Stack, email: str) -> dict[str, tuple[int, Any]]:
    h = st.auth(email)
    other = st.players[-1]["id"]
    out = {p: st.get(p, h) for p in ("/api/players/me", f"/api/players/{other}", "/api/players/me/matches",
                                     "/api/players/me/inventory", "/api/players/nosuchplayer0000")}
    for season in SEASONS:
        out[f"/api/leaderboards/{season}"] = st.get(f"/api/leaderboards/{season}?limit=100", h)
    return out


def test_journeys_answer_the_same_on_both_backends_and_shadow_counts_no_mismatch(stack: Stack) -> None:
    emails = [p["email"] for p in stack.players[:6] if p["email"] != stack.changed["email"]]
    answers = {}
    for backend in ("pocketbase", "postgres"):
        stack.flag(backend)
        answers[backend] = {e: _reads(stack, e) for e in emails}
    assert answers["pocketbase"] == answers["postgres"]
    some = answers["postgres"][emails[0]]
    assert some["/api/players/nosuchplayer0000"][0] == 404
    assert some["/api/players/me"][1]["display_name"] and "email" not in some["/api/players/me"][1]
    assert any(answers["postgres"][e]["/api/players/me/matches"][1] for e in emails)
    assert any(answers["postgres"][e]["/api/players/me/inventory"][1] for e in emails)
    assert len(some[f"/api/leaderboards/{SEASONS[0]}"][1]) == 100

    stack.flag("shadow")
    before = shadow_counts(stack.metrics())
    shadowed = {e: _reads(stack, e) for e in emails}
    assert shadowed == answers["pocketbase"]  # shadow serves PocketBase's answers
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        after = shadow_counts(stack.metrics())
        compared = sum(v - before.get(k, 0) for k, v in after.items() if k[1] in ("match", "mismatch"))
        if compared >= 9 * len(emails):
            break
        time.sleep(0.1)
    assert compared == 9 * len(emails)  # every read was run on PostgreSQL + Redis too
    assert all(v == before.get(k, 0) for k, v in after.items() if k[1] != "match")  # no mismatch, no error


def test_shadow_counts_a_mismatch_and_logs_only_the_record_id(stack: Stack) -> None:
    victim = stack.players[2]
    with psycopg.connect(stack.pg_url, autocommit=True) as conn:
        conn.execute(f'UPDATE "{stack.schema}".players SET display_name = %s WHERE id = %s',
                     ("Drifted Secret Name", victim["id"]))
    stack.redis.delete(f"user:{{{victim['id']}}}:profile")
    stack.flag("shadow")
    before = shadow_counts(stack.metrics()).get(("profile", "mismatch"), 0)
    h = stack.auth(stack.players[0]["email"])
    assert stack.get(f"/api/players/{victim['id']}", h)[1]["display_name"] != "Drifted Secret Name"
    deadline = time.monotonic() + 5
    while shadow_counts(stack.metrics()).get(("profile", "mismatch"), 0) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert shadow_counts(stack.metrics()).get(("profile", "mismatch"), 0) == before + 1
    log = stack.server.log_path.read_text()
    assert victim["id"] in log and "Drifted Secret Name" not in log


def test_login_works_with_a_password_set_through_pocketbase_before_the_migration(stack: Stack) -> None:
    for backend in ("pocketbase", "postgres"):
        stack.flag(backend)
        ok = stack.login(stack.changed["email"], NEW_PASSWORD, ip="10.2.0.1")
        assert ok.status_code == 200, (backend, ok.text)
        assert ok.json()["player_id"] == stack.changed["id"] and "$2" not in ok.text
        assert stack.login(stack.changed["email"], stack.password, ip="10.2.0.2").status_code == 401
        token = ok.json()["token"]
        assert stack.redis.ttl(f"session:{{{token}}}") > 23 * 3600  # session:{token}, 24 h
        me = stack.get("/api/players/me", {"Authorization": f"Bearer {token}"})
        assert me == (200, me[1]) and me[1]["id"] == stack.changed["id"]
    assert stack.get("/api/players/me", {"Authorization": "Bearer not-a-session"})[0] == 401


def test_login_is_rate_limited_per_ip(stack: Stack) -> None:
    stack.flag("postgres")
    codes = [stack.login("nobody@example.com", "x", ip="10.3.0.1").status_code for _ in range(21)]
    assert codes == [401] * 20 + [429]
    assert stack.login(stack.players[0]["email"], ip="10.3.0.2").status_code == 200  # another IP is not affected
    assert 0 < stack.redis.pttl("ratelimit:{10.3.0.1}:{login}") <= 60_000


def _count(st: Stack, sql: str, *args: Any) -> int:
    with psycopg.connect(st.pg_url) as conn:
        return conn.execute(sql.replace("S.", f'"{st.schema}".'), args).fetchone()[0]


def test_a_match_result_is_one_transaction_then_the_profile_and_the_board_follow(stack: Stack) -> None:
    stack.flag("postgres")
    me, other = stack.players[3], stack.players[4]
    h = stack.auth(me["email"])
    season = SEASONS[1]
    xp = stack.get("/api/players/me", h)[1]["xp"]  # now cached in Redis
    assert stack.redis.exists(f"user:{{{me['id']}}}:profile")
    stack.get(f"/api/leaderboards/{season}?limit=10", h)
    games = _count(stack, "SELECT count(*) FROM S.games")
    body = {"season": season, "mode": "ranked", "map": "Frostpeak", "players": [me["id"], other["id"]],
            "winner": me["id"], "scores": {me["id"]: 4000, other["id"]: 10}}
    r = requests.post(stack.url + "/api/matches", json=body, headers={**h, "X-Forwarded-For": "10.4.0.1"}, timeout=10)
    assert r.status_code == 201, r.text
    game_id = r.json()["id"]
    assert _count(stack, "SELECT count(*) FROM S.game_sessions WHERE game_id = %s", game_id) == 2
    assert _count(stack, "SELECT count(*) FROM S.game_players WHERE game_id = %s", game_id) == 2
    assert stack.get("/api/players/me", h)[1]["xp"] == xp + 10  # the cached profile was invalidated
    assert stack.get("/api/players/me/matches?limit=1", h)[1][0]["game_id"] == game_id
    with psycopg.connect(stack.pg_url) as conn:
        rating = conn.execute(f'SELECT rating FROM "{stack.schema}".player_stats WHERE player_id = %s AND season = %s',
                              (me["id"], season)).fetchone()[0]
    assert stack.redis.zscore(f"leaderboard:{{{season}}}:top", me["id"]) == rating

    bad = {**body, "players": [me["id"], "zzzzzzzzzzzzzzz"], "winner": me["id"]}  # no such player: FK fails
    r = requests.post(stack.url + "/api/matches", json=bad, headers={**h, "X-Forwarded-For": "10.4.0.1"}, timeout=10)
    assert r.status_code == 502
    assert _count(stack, "SELECT count(*) FROM S.games") == games + 1  # the failed one left nothing
    r = requests.post(stack.url + "/api/matches", json={**body, "winner": "x"}, headers=h, timeout=10)
    assert r.status_code == 400


def test_matchmaking_through_the_service(stack: Stack) -> None:
    headers = [stack.auth(p["email"]) for p in stack.players[5:8]]
    joined = [requests.post(stack.url + "/api/matchmaking/join", headers=h, timeout=10).json() for h in headers]
    assert [j["queued"] for j in joined] == [True] * 3
    again = requests.post(stack.url + "/api/matchmaking/join", headers=headers[0], timeout=10).json()
    assert again == {"queued": False, "position": 0}
    pop = requests.post(stack.url + "/api/matchmaking/pop", json={"size": 2}, headers=headers[0], timeout=10).json()
    assert pop["players"] == [p["id"] for p in stack.players[5:7]]
    assert requests.post(stack.url + "/api/matchmaking/pop", json={"size": 2}, headers=headers[0],
                         timeout=10).json() == {"players": []}


def test_files_come_from_the_file_store_or_from_pocketbase(stack: Stack) -> None:
    record, name, body = stack.avatar
    for backend in ("pocketbase", "postgres"):
        stack.flag(backend)
        r = requests.get(f"{stack.url}/api/files/users/{record}/{name}", timeout=10)
        assert (r.status_code, r.content) == (200, body), backend
        assert r.headers["content-type"].startswith("image/png")
        assert requests.get(f"{stack.url}/api/files/users/{record}/missing.png", timeout=10).status_code == 404
    assert requests.get(f"{stack.url}/api/files/users/{record}/..%2F..%2Fetc", timeout=10).status_code in (400, 404)


def test_health_metrics_and_redis_hold_no_secret(stack: Stack) -> None:
    stack.flag("postgres")
    health = requests.get(stack.url + "/health", timeout=10).json()
    assert health == {"status": "ok", "backend": "postgres", "redis": True, "postgres": True}
    text = stack.metrics()
    assert 'pbgame_requests_total{backend="postgres",endpoint="profile_me",status="2xx"}' in text
    assert 'pbgame_backend{backend="postgres"} 1.0' in text
    for key in stack.redis.scan_iter("user:*:profile"):
        assert not set(stack.redis.hkeys(key)) & {"email", "password_hash", "token_key"}
    dump = text + "".join(str(stack.redis.hgetall(k)) for k in stack.redis.scan_iter("user:*:profile"))
    assert "$2a$" not in dump and "@example.com" not in dump


def test_flipping_the_flag_and_swapping_the_schema_under_load_fail_no_request(stack: Stack) -> None:
    """The cut-over's two moves under load: the flag flips, and staging is renamed to live."""
    stack.flag("pocketbase")
    heads = [stack.auth(p["email"]) for p in stack.players[8:14]]
    stop = threading.Event()
    results: Counter[int] = Counter()
    lock = threading.Lock()

    def player(h: dict[str, str]) -> None:
        s = requests.Session()
        paths = ("/api/players/me", f"/api/leaderboards/{SEASONS[0]}?limit=10", "/api/players/me/matches",
                 "/api/players/me/inventory")
        i = 0
        while not stop.is_set():
            code = s.get(stack.url + paths[i % len(paths)], headers=h, timeout=10).status_code
            i += 1
            with lock:
                results[code] += 1

    before = stack.metrics()
    threads = [threading.Thread(target=player, args=(h,)) for h in heads]
    for t in threads:
        t.start()
    try:
        for backend in ("shadow", "postgres", "pocketbase", "postgres"):  # cut over, roll back, cut over
            time.sleep(1.0)
            stack.redis.set("pbm:backend", backend)
        time.sleep(0.5)
        live = stack.schema.removesuffix("_staging")
        with psycopg.connect(stack.pg_url, autocommit=True) as conn:  # what cutover.swap does, in one statement
            conn.execute(f'ALTER SCHEMA "{stack.schema}" RENAME TO "{live}"')
        stack.schema = live
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(15)
    assert set(results) == {200} and results[200] > 100, results
    after = stack.metrics()

    def served(text: str, backend: str) -> float:
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("pbgame_requests_total{") and f'backend="{backend}"' in line)

    for backend in ("pocketbase", "shadow", "postgres"):
        assert served(after, backend) > served(before, backend), backend


def test_the_application_and_the_engine_stay_apart() -> None:
    """The game server needs no Airflow; the engine (what Airflow runs) needs no pbgame."""
    import subprocess
    import sys

    code = ("import sys, pbgame.service, pbgame.testbed; "
            "assert not [m for m in sys.modules if m.split('.')[0] == 'airflow'], 'airflow imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    code = ("import sys, pbmigrate.tasks, pbmigrate.cache.warmup, pbmigrate.cutover.promote, pbmigrate.cache.keys; "
            "assert 'pbgame' not in sys.modules, 'the engine imported pbgame'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
