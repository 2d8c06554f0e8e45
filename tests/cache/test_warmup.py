"""Warm-up from migrated tables into a real Redis and a real three-master Redis Cluster.

The tables are created here as the loader will create them (players with their secrets,
player_stats, games), in a schema of the session's test database.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator

import psycopg
import pytest
import redis

from pbmigrate.cache.client import RedisClient, connect
from pbmigrate.cache.keys import game_state_key, leaderboard_key, profile_key
from pbmigrate.cache.warmup import (
    keys_by_pattern,
    parse_cache_config,
    warm_all,
    warm_game_states,
    warm_leaderboards,
    warm_profiles,
)
from pbmigrate.errors import MappingError, TargetError
from pbmigrate.plan.mapping import secret_reason

pytest_plugins = ["tests.redis_cluster"]

PLAYERS = 900
SEASONS = ("2024-S4", "2025-S1", "2025-S2")
CONFIG = {
    "chunk_size": 128,  # several chunks and several script calls per chunk, even on small data
    "profiles": {"table": "players", "fields": ["display_name", "level", "xp", "country", "avatar"]},
    "leaderboards": {"table": "player_stats", "season": "season", "member": "player_id", "score": "rating", "top": 100},
    "game_state": {"table": "games", "state": "state", "where": "status = 'in_progress'"},
}
SECRET_VALUES = ("$2a$10$", "tokenkey-", "@example.com")


@pytest.fixture(scope="module")
def schema(pg_url: str) -> Iterator[str]:
    """Migrated-looking tables: 900 players, 3 seasons of stats (ties included), 60 games."""
    name = f"warm_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {name}")
        conn.execute(
            f"""CREATE TABLE {name}.players (id text PRIMARY KEY, display_name text, level bigint, xp bigint,
                country text, avatar text, email text, password_hash text, token_key text,
                created timestamptz, updated timestamptz)"""
        )
        conn.execute(
            f"""INSERT INTO {name}.players
                SELECT 'pl' || lpad(g::text, 13, '0'), 'Player ' || g, g % 50, g * 37,
                       CASE WHEN g % 7 = 0 THEN NULL ELSE 'VN' END, 'avatar' || g || '.png',
                       'player' || g || '@example.com', '$2a$10$' || md5(g::text), 'tokenkey-' || md5(g::text),
                       now(), now()
                FROM generate_series(1, {PLAYERS}) g"""
        )
        conn.execute(
            f"""CREATE TABLE {name}.player_stats (id text PRIMARY KEY, player_id text, season text,
                games_played bigint, wins bigint, losses bigint, rating double precision)"""
        )
        # Ratings repeat (g % 97), so ties straddle the top-100 boundary; some stats rows are NULL.
        conn.execute(
            f"""INSERT INTO {name}.player_stats
                SELECT 'st' || s || '-' || g, 'pl' || lpad(g::text, 13, '0'), season, g % 30, g % 13, g % 11,
                       CASE WHEN g % 101 = 0 THEN NULL ELSE 1000 + ((g * (s + 3)) % 97) * 7.5 END
                FROM generate_series(1, {PLAYERS}) g,
                     unnest(ARRAY{list(SEASONS)}) WITH ORDINALITY AS t(season, s)
                WHERE g % (s + 1) <> 0"""
        )
        conn.execute(
            f"""CREATE TABLE {name}.games (id text PRIMARY KEY, season text, status text, state jsonb,
                created timestamptz)"""
        )
        conn.execute(
            f"""INSERT INTO {name}.games
                SELECT 'gm' || g, '2025-S2', CASE WHEN g % 3 = 0 THEN 'finished' ELSE 'in_progress' END,
                       jsonb_build_object('turn', g, 'players', jsonb_build_array('pl' || g, 'pl' || (g + 1)),
                                          'note', 'quote '' and % sign'),
                       now()
                FROM generate_series(1, 60) g"""
        )
        yield name
        conn.execute(f"DROP SCHEMA {name} CASCADE")


@pytest.fixture(params=["single", "cluster"])
def rclient(request: pytest.FixtureRequest) -> Iterator[RedisClient]:
    url = request.getfixturevalue("redis_url" if request.param == "single" else "redis_cluster_url")
    client = connect(url)
    yield client
    client.close()


def _sql_ranking(pg: psycopg.Connection, schema: str, season: str, top: int) -> list[tuple[str, float]]:
    """The ranking written independently of pbmigrate: best rating first, ties by id descending."""
    rows = pg.execute(
        f"""SELECT player_id, max(rating) FROM {schema}.player_stats
            WHERE season = %s AND rating IS NOT NULL GROUP BY player_id
            ORDER BY 2 DESC, player_id COLLATE "C" DESC LIMIT %s""",
        (season, top),
    ).fetchall()
    return [(m, float(v)) for m, v in rows]


def _snapshot(client: RedisClient) -> dict[str, object]:
    """Every key with its content (not its TTL), for comparing two runs."""
    out: dict[str, object] = {}
    for key in client.scan_iter(count=1000):
        kind = client.type(key)
        if kind == "hash":
            out[key] = client.hgetall(key)
        elif kind == "zset":
            out[key] = client.zrange(key, 0, -1, withscores=True)
        else:
            out[key] = client.get(key)
    return out


def test_warm_all_writes_every_pattern_with_its_ttl(
    rclient: RedisClient, pg: psycopg.Connection, schema: str
) -> None:
    results = warm_all(pg, schema, CONFIG, rclient)
    live_games = pg.execute(f"SELECT count(*) FROM {schema}.games WHERE status = 'in_progress'").fetchone()[0]
    assert keys_by_pattern(results) == {
        "user:{id}:profile": PLAYERS,
        "leaderboard:{season}:top": len(SEASONS),
        "game:{id}:state": live_games,
    }
    assert results["leaderboards"].items == len(SEASONS) * 100
    total = sum(1 for _ in rclient.scan_iter(count=1000))
    assert total == PLAYERS + len(SEASONS) + live_games  # no temp or stray keys

    p7 = rclient.hgetall(profile_key("pl0000000000007"))
    assert p7 == {"display_name": "Player 7", "level": "7", "xp": "259",
                  "avatar": "avatar7.png"}  # fmt: skip  (country is NULL for 7: left out)
    assert 3240 - 1 <= rclient.ttl(profile_key("pl0000000000001")) <= 3600
    ttls = {rclient.ttl(profile_key(f"pl{i:013d}")) for i in range(1, 60)}
    assert len(ttls) > 5  # jitter spreads expiries

    assert 295 <= rclient.ttl(leaderboard_key("2025-S1")) <= 300

    state = json.loads(rclient.get(game_state_key("gm1")))
    assert state == pg.execute(f"SELECT state FROM {schema}.games WHERE id = 'gm1'").fetchone()[0]
    assert rclient.ttl(game_state_key("gm1")) == -1  # until the game ends
    assert not rclient.exists(game_state_key("gm3"))  # finished games are not warmed


def test_warmed_leaderboard_equals_the_sql_ranking(rclient: RedisClient, pg: psycopg.Connection, schema: str) -> None:
    warm_leaderboards(pg, schema, CONFIG, rclient)
    for season in SEASONS:
        cached = rclient.zrevrange(leaderboard_key(season), 0, -1, withscores=True)
        expected = _sql_ranking(pg, schema, season, 100)
        assert len(expected) == 100
        assert [(m, float(v)) for m, v in cached] == expected, season


def test_no_warmed_key_holds_a_secret(rclient: RedisClient, pg: psycopg.Connection, schema: str) -> None:
    warm_all(pg, schema, CONFIG, rclient)
    seen = 0
    for key in rclient.scan_iter(count=1000):
        seen += 1
        kind = rclient.type(key)
        if kind == "hash":
            data = rclient.hgetall(key)
            texts = [*data, *data.values()]
            for field in data:
                assert secret_reason(field) is None, (key, field)
        elif kind == "zset":
            texts = [m for m, _ in rclient.zrange(key, 0, -1, withscores=True)]
        else:
            texts = [rclient.get(key)]
        for text in texts:
            assert not any(secret in text for secret in SECRET_VALUES), (key, text)
    assert seen > PLAYERS


def test_warm_up_is_idempotent_and_replaces_stale_content(
    rclient: RedisClient, pg: psycopg.Connection, schema: str
) -> None:
    warm_all(pg, schema, CONFIG, rclient)
    first = _snapshot(rclient)
    warm_all(pg, schema, CONFIG, rclient)
    assert _snapshot(rclient) == first

    # Changes in PostgreSQL show after a re-run: a field that became NULL disappears, and a
    # leaderboard is replaced whole (a player who dropped out of the top 100 is gone).
    leader = _sql_ranking(pg, schema, "2025-S1", 1)[0][0]
    with pg.transaction():
        pg.execute(f"UPDATE {schema}.players SET avatar = NULL WHERE id = 'pl0000000000001'")
        pg.execute(
            f"UPDATE {schema}.player_stats SET rating = 0 WHERE player_id = %s AND season = '2025-S1'", (leader,)
        )
    try:
        warm_all(pg, schema, CONFIG, rclient)
        assert "avatar" not in rclient.hgetall(profile_key("pl0000000000001"))
        assert rclient.zscore(leaderboard_key("2025-S1"), leader) is None
        cached = rclient.zrevrange(leaderboard_key("2025-S1"), 0, -1, withscores=True)
        assert [(m, float(v)) for m, v in cached] == _sql_ranking(pg, schema, "2025-S1", 100)
    finally:
        with pg.transaction():
            pg.execute(f"UPDATE {schema}.players SET avatar = 'avatar1.png' WHERE id = 'pl0000000000001'")
            pg.execute(
                f"""UPDATE {schema}.player_stats SET rating = 1000 + ((substr(player_id, 3)::int * 5) %% 97) * 7.5
                    WHERE player_id = %s AND season = '2025-S1'""",
                (leader,),
            )


def test_secret_and_unknown_fields_are_refused_before_any_write(
    redis_url: str, pg: psycopg.Connection, schema: str
) -> None:
    client = connect(redis_url)
    for field in ("password_hash", "passwordHash", "token_key", "tokenKey", "email"):
        cfg = {"profiles": {"table": "players", "fields": ["display_name", field]}}
        with pytest.raises(MappingError, match=repr(field)):
            warm_profiles(pg, schema, cfg, client)
    with pytest.raises(MappingError, match="'nickname'"):
        warm_profiles(pg, schema, {"profiles": {"table": "players", "fields": ["nickname"]}}, client)
    with pytest.raises(MappingError, match="unknown key"):
        parse_cache_config({"profiles": {"table": "players", "fields": ["xp"], "colour": 1}})
    assert client.dbsize() == 0

    allowed = {"profiles": {"table": "players", "fields": ["display_name", "email"], "allow_email": True}}
    warm_profiles(pg, schema, allowed, client)
    assert client.hget(profile_key("pl0000000000002"), "email") == "player2@example.com"
    client.close()


def test_the_mapping_files_cache_section_is_accepted() -> None:
    from pbmigrate.plan.mapping import load_mapping

    cfg = parse_cache_config(load_mapping("game.yaml").cache)
    assert cfg.profiles and cfg.leaderboards and cfg.game_state
    assert cfg.leaderboards.top == 100 and "password_hash" not in cfg.profiles.fields


def test_redis_down_retries_then_fails(pg: psycopg.Connection, schema: str, caplog: pytest.LogCaptureFixture) -> None:
    from tests.redis_cluster import free_port

    port = free_port()  # nothing listens there
    client = connect(f"redis://127.0.0.1:{port}/0", retries=0, connect_timeout=1)
    cfg = {**CONFIG, "retries": 2, "retry_backoff": 0.01}
    caplog.set_level(logging.WARNING, logger="pbmigrate")
    started = time.monotonic()
    with pytest.raises(TargetError, match="after 3 attempt"):
        warm_game_states(pg, schema, cfg, client)
    assert time.monotonic() - started < 10
    assert sum("retry" in r.getMessage() for r in caplog.records) == 2


def test_connections_killed_mid_warm_up_are_replayed(
    pg: psycopg.Connection, schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A private Redis whose client connections are killed over and over during the warm-up:
    the unanswered chunks are replayed and the end state is exactly a clean run's."""
    from tests.redis_cluster import running_server

    caplog.set_level(logging.WARNING, logger="pbmigrate")
    with running_server() as url:
        client = connect(url)
        cfg = {**CONFIG, "chunk_size": 50, "retries": 50, "retry_backoff": 0.001}
        warm_all(pg, schema, cfg, client)
        clean = _snapshot(client)

        stop = threading.Event()

        def killer() -> None:
            with redis.Redis.from_url(url) as admin:
                while not stop.is_set():
                    admin.client_kill_filter(_type="normal", skipme=True)
                    time.sleep(0.002)

        for _ in range(3):  # until a kill has really hit the writer mid-chunk (almost always at once)
            client.flushall()
            caplog.clear()
            stop.clear()
            thread = threading.Thread(target=killer)
            thread.start()
            try:
                results = warm_all(pg, schema, cfg, client)
            finally:
                stop.set()
                thread.join()
            if any("retry" in r.getMessage() for r in caplog.records):
                break
        assert any("retry" in r.getMessage() for r in caplog.records), "no write was interrupted"
        assert keys_by_pattern(results)["user:{id}:profile"] == PLAYERS
        assert _snapshot(client) == clean
        client.close()


def test_warm_up_and_cache_aside_write_the_same_text(
    rclient: RedisClient, pg: psycopg.Connection, schema: str
) -> None:
    """Both paths share one query, so a profile looks the same whoever cached it."""
    from pbgame.cache import PostgresProfiles, ProfileCache
    from pbmigrate.cache.keys import ProfileSpec

    pg.execute(
        f"""CREATE TABLE IF NOT EXISTS {schema}.typed (id text PRIMARY KEY, nick varchar(20), active boolean,
            joined timestamptz, meta jsonb, ratio double precision, amount numeric, born date, lvl integer)"""
    )
    pg.execute(
        f"""INSERT INTO {schema}.typed VALUES ('t1', 'nick', true, '2024-05-06 07:08:09.5+00',
            '{{"a": [1, 2]}}', 0.1, 12.50, '2000-01-02', 3) ON CONFLICT DO NOTHING"""
    )
    fields = ["nick", "active", "joined", "meta", "ratio", "amount", "born", "lvl"]
    warm_profiles(pg, schema, {"profiles": {"table": "typed", "fields": fields}}, rclient)
    warmed = rclient.hgetall(profile_key("t1"))
    assert warmed == {
        "nick": "nick", "active": "true", "joined": "2024-05-06T07:08:09.5Z",
        "meta": '{"a": [1, 2]}', "ratio": "0.1", "amount": "12.50", "born": "2000-01-02", "lvl": "3",
    }  # fmt: skip
    rclient.delete(profile_key("t1"))
    pg.execute("SET TimeZone = 'Asia/Ho_Chi_Minh'")  # the game server's session may differ: same text
    cache = ProfileCache(rclient, PostgresProfiles(pg, schema, ProfileSpec(table="typed", fields=tuple(fields))))
    assert cache.get("t1") == warmed
    assert rclient.hgetall(profile_key("t1")) == warmed
    pg.execute("RESET TimeZone")


def test_warm_run_is_what_a_dag_task_calls(redis_url: str, pg_url: str, schema: str) -> None:
    """URLs and the run dict in, a JSON report out; the config is the mapping's cache: section."""
    from pbmigrate.cache.warmup import warm_run

    run = {"params": {"mapping": "game.yaml"}, "staging_schema": schema}
    reports = [warm_run(run, section, pg_url=pg_url, redis_url=redis_url) for section in ("profiles", "game_state")]
    assert json.loads(json.dumps(reports)) == reports
    assert reports[0]["pattern"] == "user:{id}:profile" and reports[0]["keys"] == PLAYERS
    assert reports[1]["pattern"] == "game:{id}:state" and reports[1]["keys"] == 40
    with pytest.raises(ValueError, match="unknown cache section"):
        warm_run(run, "inventory", pg_url=pg_url, redis_url=redis_url)


def test_warm_sections_warms_every_section_and_raises_the_first_failure_after_all_end(
        redis_url: str, pg_url: str, schema: str) -> None:
    """The DAG's one warm-up task: every section's report; a section that fails does not stop the
    others, and its error is raised once they have ended."""
    from pbmigrate.cache.warmup import SECTIONS, warm_sections

    run = {"params": {"mapping": "game.yaml"}, "staging_schema": schema}
    reports = warm_sections(run, pg_url=pg_url, redis_url=redis_url)
    assert list(reports) == list(SECTIONS)
    assert reports["profiles"]["keys"] == PLAYERS and reports["game_state"]["keys"] == 40

    client = redis.Redis.from_url(redis_url)
    states = client.keys(game_state_key("*"))
    assert len(states) == 40
    client.delete(*states)
    with psycopg.connect(pg_url, autocommit=True) as conn:  # the profiles' table gone: that section fails
        conn.execute(f'ALTER TABLE "{schema}".players RENAME TO players_gone')
    try:
        with pytest.raises(Exception, match="players"):
            warm_sections(run, pg_url=pg_url, redis_url=redis_url)
        assert len(client.keys(game_state_key("*"))) == 40  # the other sections ran to their end
    finally:
        client.close()
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(f'ALTER TABLE "{schema}".players_gone RENAME TO players')
