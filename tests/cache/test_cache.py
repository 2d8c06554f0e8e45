"""The game server's cache layer, against a real Redis and a real three-master Redis Cluster.

Every test runs twice (`rclient` is parametrised): a logical db of the local Redis, and the
session's cluster started by tests/redis_cluster.py. TTLs are checked with TTL/PTTL ranges,
never by sleeping for hours; only the rate-limit window test sleeps, for a 0.3 s window.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
from redis.crc import key_slot as redis_key_slot

from pbgame.cache import (
    GameStateStore,
    Leaderboard,
    MatchmakingQueue,
    PostgresLeaderboards,
    PostgresProfiles,
    ProfileCache,
    RateLimiter,
    SessionStore,
)
from pbmigrate.cache.client import RedisClient, connect, is_cluster, parse_cluster_url
from pbmigrate.cache.keys import (
    BACKEND_FLAG_KEY,
    MATCHMAKING_KEY,
    ProfileSpec,
    colocated_key,
    game_state_key,
    get_backend,
    key_slot,
    leaderboard_key,
    profile_key,
    ratelimit_key,
    session_key,
    set_backend,
)
from pbmigrate.errors import MappingError, PbmError
from pbmigrate.plan.mapping import secret_reason

pytest_plugins = ["tests.redis_cluster"]


@pytest.fixture(params=["single", "cluster"])
def rclient(request: pytest.FixtureRequest) -> Iterator[RedisClient]:
    url = request.getfixturevalue("redis_url" if request.param == "single" else "redis_cluster_url")
    client = connect(url)
    assert is_cluster(client) == (request.param == "cluster")
    yield client
    client.close()


@pytest.fixture
def players(pg: psycopg.Connection) -> Iterator[str]:
    """A schema with the migrated players table (secrets included) and stats; dropped afterwards."""
    schema = f"cache_{uuid.uuid4().hex[:8]}"
    pg.execute(f"CREATE SCHEMA {schema}")
    pg.execute(
        f"""CREATE TABLE {schema}.players (id text PRIMARY KEY, display_name text, level bigint, xp bigint,
            country text, avatar text, email text, password_hash text, token_key text,
            created timestamptz, updated timestamptz)"""
    )
    pg.execute(
        f"""INSERT INTO {schema}.players VALUES
            ('p1', 'Alice', 7, 1200, 'VN', 'a.png', 'alice@example.com', '$2a$10$alicehash', 'tk-alice',
             '2024-01-02 03:04:05+00', now()),
            ('p2', 'Bob', 3, 80, NULL, NULL, 'bob@example.com', '$2a$10$bobhash', 'tk-bob', now(), now())"""
    )
    pg.execute(
        f"""CREATE TABLE {schema}.player_stats (id text PRIMARY KEY, player_id text, season text,
            games_played bigint, wins bigint, losses bigint, rating double precision)"""
    )
    pg.execute(
        f"""INSERT INTO {schema}.player_stats VALUES ('s1', 'p1', 'S1', 10, 6, 4, 1500),
            ('s2', 'p2', 'S1', 10, 4, 6, 1400), ('s3', 'p3', 'S1', 1, 1, 0, 1500), ('s4', 'p1', 'S2', 1, 1, 0, 9)"""
    )
    yield schema
    pg.execute(f"DROP SCHEMA {schema} CASCADE")


# --------------------------------------------------------------------------- keys and URLs


def test_keys_follow_the_users_patterns_and_hash_tags() -> None:
    assert session_key("tok") == "session:{tok}"
    assert profile_key("abc") == "user:{abc}:profile"
    assert leaderboard_key("2025-S1") == "leaderboard:{2025-S1}:top"
    assert game_state_key("g1") == "game:{g1}:state"
    assert ratelimit_key("10.0.0.1", "login") == "ratelimit:{10.0.0.1}:{login}"
    # Braces are hash tags: a player's companion keys share the profile's slot...
    version = colocated_key("user:{abc}:profile", "ver").encode()
    assert redis_key_slot(b"user:{abc}:profile") == redis_key_slot(b"abc") == redis_key_slot(version)
    # ...and an untagged key is tagged with its whole name, so the queue's counter shares its slot.
    seq = colocated_key(MATCHMAKING_KEY, "seq")
    assert seq == "{matchmaking:queue}:seq" and redis_key_slot(seq.encode()) == redis_key_slot(MATCHMAKING_KEY.encode())
    with pytest.raises(ValueError):
        profile_key("")  # "{}" is no hash tag: companion keys would land elsewhere
    for key in ("user:{abc}:profile", "plain", "a{}b{c}", "{", "x{y", "é{ü}", "{{a}}", ""):
        assert key_slot(key) == redis_key_slot(key.encode()), key  # the C-speed slot used by the warm-up


def test_cluster_url_forms() -> None:
    nodes, opts = parse_cluster_url("redis+cluster://u:p%40ss@h1:7000,h2,[::1]:7002")
    assert nodes == [("h1", 7000), ("h2", 6379), ("::1", 7002)]
    assert opts == {"username": "u", "password": "p@ss"}
    assert parse_cluster_url("rediss+cluster://h:1")[1] == {"ssl": True}
    client = connect("redis://127.0.0.1:6379/13?cluster=false")
    assert not is_cluster(client)
    client.close()


def test_secret_looking_fields_are_named_and_refused() -> None:
    for name in ("password", "password_hash", "passwordHash", "token_key", "tokenKey", "api_secret", "email"):
        assert secret_reason(name), name
    for name in ("display_name", "level", "xp", "tokens", "email_visibility", "emailVisibility", "avatar"):
        assert secret_reason(name) is None, name
    assert secret_reason("email", allow_email=True) is None
    with pytest.raises(MappingError, match="'passwordHash'"):
        ProfileSpec(fields=("display_name", "passwordHash"))


# --------------------------------------------------------------------------- feature flag, sessions


def test_backend_flag(rclient: RedisClient) -> None:
    assert get_backend(rclient) == "pocketbase"
    assert set_backend(rclient, "postgres") is None
    assert set_backend(rclient, "postgres") == "postgres"
    assert get_backend(rclient) == "postgres"
    assert set_backend(rclient, "shadow") == "postgres"  # the application's shadow period
    assert get_backend(rclient) == "shadow"
    assert rclient.ttl(BACKEND_FLAG_KEY) == -1
    with pytest.raises(ValueError):
        set_backend(rclient, "mysql")
    rclient.set(BACKEND_FLAG_KEY, "garbage")
    with pytest.raises(PbmError, match="garbage"):
        get_backend(rclient)


def test_session_lives_24h_and_a_touch_restarts_it(rclient: RedisClient) -> None:
    store = SessionStore(rclient)
    token = store.create({"player_id": "p1", "roles": ["player"]})
    key = session_key(token)
    assert 86400 - 5 <= rclient.ttl(key) <= 86400
    assert store.get(token) == {"player_id": "p1", "roles": ["player"]}
    rclient.expire(key, 100)
    assert store.get(token)["player_id"] == "p1" and rclient.ttl(key) <= 100
    store.get(token, touch=True)
    assert rclient.ttl(key) > 86400 - 5
    assert store.delete(token) and store.get(token) is None


# --------------------------------------------------------------------------- profiles


class CountingSource:
    """The real PostgreSQL source, counting loads (to tell a cache hit from a miss)."""

    def __init__(self, inner: PostgresProfiles) -> None:
        self.inner = inner
        self.loads = 0
        self.before_return = None

    def load(self, player_id: str) -> dict[str, str] | None:
        self.loads += 1
        row = self.inner.load(player_id)
        if self.before_return:
            hook, self.before_return = self.before_return, None
            hook()
        return row

    def update(self, player_id: str, changes: dict) -> bool:
        return self.inner.update(player_id, changes)


def test_profile_cache_aside_miss_hit_and_invalidation(
    rclient: RedisClient, pg: psycopg.Connection, players: str
) -> None:
    source = CountingSource(PostgresProfiles(pg, players))
    cache = ProfileCache(rclient, source)
    key = profile_key("p1")

    first = cache.get("p1")  # miss: loaded from PostgreSQL, then cached
    alice = {"display_name": "Alice", "level": "7", "xp": "1200", "country": "VN", "avatar": "a.png"}
    assert first == alice
    assert source.loads == 1
    assert 3600 * 0.9 - 1 <= rclient.ttl(key) <= 3600  # 1 h minus up to 10 % jitter
    assert cache.get("p1") == first and source.loads == 1  # hit

    pg.execute(f"UPDATE {players}.players SET level = 8 WHERE id = 'p1'")  # behind the cache's back
    assert cache.get("p1")["level"] == "7"  # still the cached copy: proves the hit came from Redis

    assert cache.update("p1", {"level": 9, "display_name": "Alice II"})  # write through + invalidate
    assert not rclient.exists(key)
    assert cache.get("p1")["display_name"] == "Alice II" and source.loads == 2
    assert pg.execute(f"SELECT level FROM {players}.players WHERE id = 'p1'").fetchone()[0] == 9

    assert cache.get("p2") == {"display_name": "Bob", "level": "3", "xp": "80"}  # NULLs left out
    pg.execute(f"INSERT INTO {players}.players (id, email) VALUES ('p4', 'ghost@example.com')")
    assert cache.get("p4") == {} and not rclient.exists(profile_key("p4"))  # no public field: nothing cached
    assert cache.get("nobody") is None and cache.get("nobody") is None
    assert source.loads == 5  # the unknown id was loaded once, then cached as missing
    assert 0 < rclient.ttl(profile_key("nobody")) <= 30

    for field in rclient.hkeys(key):
        assert secret_reason(field) is None


def test_profile_fill_after_a_concurrent_write_is_refused(
    rclient: RedisClient, pg: psycopg.Connection, players: str
) -> None:
    """A reader that loaded the row before a writer committed must not cache the old row."""
    source = CountingSource(PostgresProfiles(pg, players))
    cache = ProfileCache(rclient, source)
    source.before_return = lambda: cache.update("p1", {"display_name": "Renamed"})
    stale = cache.get("p1")
    assert stale["display_name"] == "Alice"  # this reader saw the old row...
    assert not rclient.exists(profile_key("p1"))  # ...but did not cache it
    assert cache.get("p1")["display_name"] == "Renamed"


def test_profile_ttls_are_spread_by_jitter(rclient: RedisClient, pg: psycopg.Connection, players: str) -> None:
    pg.execute(f"INSERT INTO {players}.players (id, display_name) SELECT 'j' || g, 'J' FROM generate_series(1, 40) g")
    cache = ProfileCache(rclient, PostgresProfiles(pg, players))
    ttls = set()
    for i in range(1, 41):
        cache.get(f"j{i}")
        ttls.add(rclient.ttl(profile_key(f"j{i}")))
    assert len(ttls) > 5 and min(ttls) >= 3240 - 1 and max(ttls) <= 3600


# --------------------------------------------------------------------------- leaderboards, game state


def test_leaderboard_replace_top_and_rebuild(rclient: RedisClient, pg: psycopg.Connection, players: str) -> None:
    board = Leaderboard(rclient)
    board.replace("S9", [("a", 10), ("b", 30), ("c", 20)])
    assert board.top("S9", 2) == [("b", 30.0), ("c", 20.0)]
    assert 295 <= rclient.ttl(leaderboard_key("S9")) <= 300
    board.replace("S9", [("z", 1)])  # replaced whole, not merged
    assert board.top("S9") == [("z", 1.0)]
    assert [k for k in rclient.scan_iter(match="leaderboard:*")] == [leaderboard_key("S9")]  # no temp key left

    source = PostgresLeaderboards(pg, players)
    calls = []
    rebuilding = Leaderboard(rclient, lambda s: calls.append(s) or source(s))
    # Equal ratings rank by player id, descending (ZREVRANGE's order), as the SQL source does.
    assert rebuilding.top("S1") == [("p3", 1500.0), ("p1", 1500.0), ("p2", 1400.0)]
    assert rebuilding.top("S1") and calls == ["S1"]  # rebuilt once, then served from Redis
    assert rebuilding.rank("S1", "p2") == 2
    assert 295 <= rclient.ttl(leaderboard_key("S1")) <= 300


def test_game_state_lives_until_the_game_ends(rclient: RedisClient) -> None:
    games = GameStateStore(rclient)
    games.save("g1", {"turn": 3, "board": [[0, 1], [1, 0]]})
    assert rclient.ttl(game_state_key("g1")) == -1  # no expiry: the game decides
    assert games.load("g1") == {"turn": 3, "board": [[0, 1], [1, 0]]}
    assert games.end("g1") and games.load("g1") is None
    capped = GameStateStore(rclient, ttl=7200)
    capped.save("g2", {})
    assert 7195 <= rclient.ttl(game_state_key("g2")) <= 7200


# --------------------------------------------------------------------------- rate limiting


def test_rate_limit_exactly_at_its_boundary(rclient: RedisClient) -> None:
    limiter = RateLimiter(rclient, limit=5)  # the user's 1-minute window
    decisions = [limiter.hit("10.0.0.1", "login") for _ in range(6)]
    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    assert decisions[4].remaining == 0 and decisions[5].count == 6
    assert 59_000 < rclient.pttl(ratelimit_key("10.0.0.1", "login")) <= 60_000
    assert limiter.hit("10.0.0.1", "chat").allowed  # per action
    assert limiter.hit("10.0.0.2", "login").allowed  # per IP

    short = RateLimiter(rclient, limit=3, window=0.3)
    assert [short.hit("ip", "a").allowed for _ in range(4)] == [True, True, True, False]
    denied = short.hit("ip", "a")
    assert not denied.allowed and 0 < denied.reset_after <= 0.3
    time.sleep(denied.reset_after + 0.05)  # the window closes...
    fresh = short.hit("ip", "a")
    assert fresh.allowed and fresh.count == 1  # ...and a new one opens with the next hit


def test_rate_limit_is_atomic_under_concurrency(rclient: RedisClient) -> None:
    limiter = RateLimiter(rclient, limit=37)
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda _: limiter.hit("1.2.3.4", "spin").allowed, range(120)))
    assert sum(results) == 37


# --------------------------------------------------------------------------- matchmaking


def test_matchmaking_is_fifo_and_pops_whole_groups(rclient: RedisClient) -> None:
    queue = MatchmakingQueue(rclient)
    for p in ("c", "a", "b"):
        assert queue.join(p)
    assert not queue.join("a")  # already queued
    assert queue.pop_group(4) == [] and len(queue) == 3  # a partial group stays queued
    assert queue.join("d") and queue.position("d") == 3
    assert queue.leave("a") and queue.join("e")
    assert queue.pop_group(4) == ["c", "b", "d", "e"]  # arrival order, not name order
    assert len(queue) == 0
    assert rclient.ttl(MATCHMAKING_KEY) in (-1, -2)  # never an expiry


def test_matchmaking_under_many_threads_matches_everyone_once(rclient: RedisClient) -> None:
    queue = MatchmakingQueue(rclient)
    size, players = 4, [f"p{i}" for i in range(480)]
    groups: list[list[str]] = []
    lock = threading.Lock()
    joined = threading.Event()

    def join(chunk: list[str]) -> None:
        for p in chunk:
            assert queue.join(p)

    def pop() -> None:
        while True:
            done = joined.is_set()
            group = queue.pop_group(size)
            if group:
                assert len(group) == size
                with lock:
                    groups.append(group)
            elif done:
                return

    poppers = [threading.Thread(target=pop) for _ in range(6)]
    for t in poppers:
        t.start()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(join, [players[i::8] for i in range(8)]))
    joined.set()
    for t in poppers:
        t.join(timeout=30)
    matched = [p for g in groups for p in g]
    assert len(matched) == len(set(matched)), "a player was matched twice"
    assert sorted(matched + list(queue.waiting())) == sorted(players), "a player was lost"
    assert len(matched) == len(players)  # 480 is a multiple of 4: nobody is left waiting
