"""The cache layer's runtime classes, synchronous (scripts, workers, tests): the game's Redis use.

Sessions, cache-aside profiles over PostgreSQL, leaderboards, game state, rate limiting and
matchmaking, on the key schema of `pbmigrate.cache.keys` (which the migration's warm-up writes, so a
warmed key and a key this layer fills look the same). The game API service uses the asyncio twin
`pbgame.acache`, which runs the very same Lua scripts defined here.

Every class works unchanged with ``redis.Redis`` and ``redis.cluster.RedisCluster``
(`pbmigrate.cache.client.connect` builds either). Atomic steps are Lua scripts registered with
``register_script`` (single-slot, so cluster-safe).
"""

from __future__ import annotations

import json
import random
import secrets
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg
from psycopg import sql

from pbmigrate.cache.client import RedisClient
from pbmigrate.cache.keys import (
    GAME_STATE_TTL,
    LEADERBOARD_TTL,
    MATCHMAKING_KEY,
    MISSING_FIELD,
    PROFILE_JITTER,
    PROFILE_MISSING_TTL,
    PROFILE_TTL,
    PROFILE_VERSION_TTL,
    RATELIMIT_WINDOW,
    SESSION_TTL,
    SWAP_LEADERBOARD,
    LeaderboardSpec,
    ProfileSpec,
    check_columns,
    colocated_key,
    game_state_key,
    key_part,
    leaderboard_key,
    leaderboard_query,
    profile_key,
    profile_mapping,
    profile_query,
    ratelimit_key,
    reply_text,
    session_key,
)

# --------------------------------------------------------------------------- sessions


class SessionStore:
    """``session:{token}`` -> JSON, 24 h. A read can slide the expiry (GETEX, one atomic step)."""

    def __init__(self, client: RedisClient, *, ttl: int = SESSION_TTL) -> None:
        self.client = client
        self.ttl = ttl

    def create(self, data: Mapping[str, Any], token: str | None = None) -> str:
        """Store a new session and return its token (a fresh random one unless given)."""
        token = token or secrets.token_urlsafe(32)
        self.put(token, data)
        return token

    def put(self, token: str, data: Mapping[str, Any]) -> None:
        self.client.set(session_key(token), json.dumps(data, separators=(",", ":")), ex=self.ttl)

    def get(self, token: str, *, touch: bool = False) -> dict[str, Any] | None:
        """The session, or None if unknown or expired; `touch` restarts its 24 h."""
        key = session_key(token)
        raw = self.client.getex(key, ex=self.ttl) if touch else self.client.get(key)
        return None if raw is None else json.loads(raw)

    def delete(self, token: str) -> bool:
        return bool(self.client.delete(session_key(token)))


# --------------------------------------------------------------------------- profiles

# KEYS: profile, version. ARGV: version seen before reading PostgreSQL, ttl, field, value, ...
# Refuses the fill if the profile was invalidated meanwhile: a reader that loaded the old row
# before a writer committed must not put it back for an hour.
FILL_PROFILE = """
if (redis.call('GET', KEYS[2]) or '0') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS: profile, version. ARGV: version ttl.
INVALIDATE_PROFILE = """
redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], ARGV[1])
return redis.call('DEL', KEYS[1])
"""


class ProfileSource(Protocol):
    """Where profiles come from and go to: PostgreSQL in production (`PostgresProfiles`)."""

    def load(self, player_id: str) -> dict[str, str] | None: ...

    def update(self, player_id: str, changes: Mapping[str, Any]) -> bool: ...


class PostgresProfiles:
    """Reads public profile fields from the players table and writes changes back.

    The connection should be in autocommit mode: `update` commits before the cache is
    invalidated, or a reader could cache the row as it was before the write.
    """

    def __init__(self, conn: psycopg.Connection, schema: str, spec: ProfileSpec | None = None) -> None:
        self.conn = conn
        self.schema = schema
        self.spec = spec or ProfileSpec()
        spec = self.spec
        self._columns = check_columns(conn, schema, spec.table, (spec.id, *spec.fields), "cache.profiles")
        self._select = profile_query(schema, self.spec, self._columns, one=True)

    def load(self, player_id: str) -> dict[str, str] | None:
        row = self.conn.execute(self._select, (player_id,)).fetchone()
        return None if row is None else profile_mapping(self.spec, row)

    def update(self, player_id: str, changes: Mapping[str, Any]) -> bool:
        """Write `changes` (any columns of the table, secret ones too: they stay in PostgreSQL)."""
        bad = [c for c in changes if c not in self._columns or c == self.spec.id]
        if bad or not changes:
            raise ValueError(f"cannot update column(s) {bad or '(none given)'} of {self.schema}.{self.spec.table}")
        stmt = sql.SQL("UPDATE {}.{} SET {} WHERE {} = %s").format(
            sql.Identifier(self.schema),
            sql.Identifier(self.spec.table),
            sql.SQL(", ").join(sql.SQL("{} = %s").format(sql.Identifier(c)) for c in changes),
            sql.Identifier(self.spec.id),
        )
        with self.conn.transaction():
            count = self.conn.execute(stmt, (*changes.values(), player_id)).rowcount
        if not self.conn.autocommit:
            self.conn.commit()
        return count == 1


def jittered(ttl: int, jitter: float) -> int:
    """A TTL in ``[ttl * (1 - jitter), ttl]``, so keys written together do not expire together."""
    return max(1, int(ttl * (1.0 - jitter * random.random())))


class ProfileCache:
    """Cache-aside for ``user:{id}:profile`` over PostgreSQL, 1 h with jitter, invalidated on write.

    The hash holds the configured public fields that are not NULL, nothing else.
    Hit: one HGETALL. Miss: read the version counter, load the row, then fill through a script
    that refuses if a write invalidated the profile in between. Unknown ids are cached as
    missing for `missing_ttl` seconds (0 turns that off). Values are text, as the warm-up writes
    them: JSON's spelling of numbers, booleans and timestamps.
    """

    def __init__(
        self,
        client: RedisClient,
        source: ProfileSource,
        *,
        ttl: int = PROFILE_TTL,
        jitter: float = PROFILE_JITTER,
        missing_ttl: int = PROFILE_MISSING_TTL,
    ) -> None:
        self.client = client
        self.source = source
        self.ttl = ttl
        self.jitter = jitter
        self.missing_ttl = missing_ttl
        self._fill = client.register_script(FILL_PROFILE)
        self._invalidate = client.register_script(INVALIDATE_PROFILE)

    @staticmethod
    def keys(player_id: str) -> tuple[str, str]:
        key = profile_key(player_id)
        return key, colocated_key(key, "ver")

    def get(self, player_id: str) -> dict[str, str] | None:
        """The public profile, or None if the player does not exist."""
        key, ver_key = self.keys(player_id)
        cached = self.client.hgetall(key)
        if cached:
            cached = {reply_text(k): reply_text(v) for k, v in cached.items()}
            return None if MISSING_FIELD in cached else cached
        seen = reply_text(self.client.get(ver_key)) or "0"
        row = self.source.load(player_id)
        if row is None:
            if self.missing_ttl > 0:
                self._fill(keys=[key, ver_key], args=[seen, self.missing_ttl, MISSING_FIELD, "1"])
            return None
        if row:  # a player without any public field set has no hash to cache (Redis has no empty hash)
            args: list[Any] = [seen, jittered(self.ttl, self.jitter)]
            for field, value in row.items():
                args += (field, value)
            self._fill(keys=[key, ver_key], args=args)
        return row

    def invalidate(self, player_id: str) -> None:
        """Drop the cached profile and make any fill already in flight a no-op."""
        self._invalidate(keys=list(self.keys(player_id)), args=[PROFILE_VERSION_TTL])

    def update(self, player_id: str, changes: Mapping[str, Any]) -> bool:
        """Write through to PostgreSQL, then invalidate; True if the player exists."""
        try:
            return self.source.update(player_id, changes)
        finally:
            self.invalidate(player_id)


# --------------------------------------------------------------------------- leaderboards

# KEYS: lock. ARGV: token. Release only a lock we still hold.
RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

Entry = tuple[str, float]


def temp_leaderboard_key(season: object) -> str:
    """A private build key with the season's hash tag, so RENAME stays in one slot."""
    return colocated_key(leaderboard_key(season), f"tmp:{uuid.uuid4().hex}")


class Leaderboard:
    """``leaderboard:{season}:top`` sorted sets, 5 min, rebuilt from player stats.

    Readers never see a half-built board: a rebuild fills a temp key with the same hash tag and
    RENAMEs it over the old one. When the key has expired, `top` rebuilds it from `source` under
    a short lock so that one game server, not all of them, queries PostgreSQL.
    Equal scores rank by member, descending byte order (ZREVRANGE's rule).
    """

    def __init__(
        self,
        client: RedisClient,
        source: Callable[[str], Iterable[Entry]] | None = None,
        *,
        ttl: int = LEADERBOARD_TTL,
        chunk: int = 1000,
        lock_ttl: float = 10.0,
        wait: float = 2.0,
    ) -> None:
        self.client = client
        self.source = source
        self.ttl = ttl
        self.chunk = chunk
        self.lock_ttl = lock_ttl
        self.wait = wait
        self._swap = client.register_script(SWAP_LEADERBOARD)
        self._release = client.register_script(RELEASE_LOCK)

    def build(self, temp: str, entries: Iterable[Entry]) -> int:
        """ZADD `entries` into `temp` in pipelined chunks; the temp key expires if never swapped."""
        count = 0
        batch: dict[str, float] = {}
        for member, score in entries:
            batch[member] = score
            if len(batch) >= self.chunk:
                count += self._zadd(temp, batch)
                batch = {}
        if batch:
            count += self._zadd(temp, batch)
        return count

    def _zadd(self, temp: str, batch: dict[str, float]) -> int:
        pipe = self.client.pipeline(transaction=False)
        pipe.zadd(temp, batch)
        pipe.expire(temp, self.ttl + 600)
        pipe.execute()
        return len(batch)

    def swap(self, temp: str, season: object) -> bool:
        return bool(self._swap(keys=[temp, leaderboard_key(season)], args=[self.ttl]))

    def replace(self, season: object, entries: Iterable[Entry]) -> int:
        """Atomically replace the season's board; an empty board deletes the key."""
        temp = temp_leaderboard_key(season)
        count = self.build(temp, entries)
        if count == 0:
            self.client.delete(leaderboard_key(season))
        else:
            self.swap(temp, season)
        return count

    def _read(self, season: object, n: int) -> list[Entry]:
        rows = self.client.zrevrange(leaderboard_key(season), 0, n - 1, withscores=True)
        return [(reply_text(m), float(v)) for m, v in rows]

    def top(self, season: object, n: int = 10) -> list[Entry]:
        """The best `n` (member, score); rebuilt from the source if the board expired."""
        rows = self._read(season, n)
        if rows or self.source is None:
            return rows
        lock = colocated_key(leaderboard_key(season), "lock")
        token = uuid.uuid4().hex
        if self.client.set(lock, token, nx=True, px=int(self.lock_ttl * 1000)):
            try:
                self.replace(season, self.source(str(season)))
            finally:
                self._release(keys=[lock], args=[token])
            return self._read(season, n)
        deadline = time.monotonic() + self.wait
        while time.monotonic() < deadline:  # another server is rebuilding: wait for its result
            time.sleep(0.02)
            rows = self._read(season, n)
            if rows:
                return rows
        ranked = sorted(self.source(str(season)), key=lambda e: (e[1], e[0].encode()), reverse=True)
        return ranked[:n]

    def rank(self, season: object, member: str) -> int | None:
        """0-based position of `member` in the cached board, None if not on it."""
        return self.client.zrevrank(leaderboard_key(season), member)


class PostgresLeaderboards:
    """Player stats ranked per season in SQL, the same query the warm-up streams."""

    def __init__(self, conn: psycopg.Connection, schema: str, spec: LeaderboardSpec | None = None) -> None:
        self.conn = conn
        self.schema = schema
        self.spec = spec or LeaderboardSpec()
        s = self.spec
        check_columns(conn, schema, s.table, (s.season, s.member, s.score), "cache.leaderboards")
        self._one = leaderboard_query(schema, s, one_season=True)

    def __call__(self, season: str) -> list[Entry]:
        return [(m, v) for _, m, v in self.conn.execute(self._one, (season,))]


# --------------------------------------------------------------------------- game state


class GameStateStore:
    """``game:{id}:state`` -> JSON text, kept until `end` (optionally a safety `ttl`)."""

    def __init__(self, client: RedisClient, *, ttl: int | None = GAME_STATE_TTL) -> None:
        self.client = client
        self.ttl = ttl

    def save(self, game_id: object, state: Any) -> None:
        self.save_text(game_id, json.dumps(state, separators=(",", ":")))

    def save_text(self, game_id: object, text: str) -> None:
        """Store JSON text as is; a plain SET also clears any TTL a previous value had."""
        self.client.set(game_state_key(game_id), text, ex=self.ttl)

    def load(self, game_id: object) -> Any | None:
        raw = self.client.get(game_state_key(game_id))
        return None if raw is None else json.loads(raw)

    def end(self, game_id: object) -> bool:
        """The game is over: its state leaves the cache."""
        return bool(self.client.delete(game_state_key(game_id)))


# --------------------------------------------------------------------------- rate limiting

# KEYS: counter. ARGV: cost, window ms. A fixed window that starts at the first hit; the
# expiry is set in the same atomic step, so a counter can never be left without one.
RATE_HIT = """
local count = redis.call('INCRBY', KEYS[1], ARGV[1])
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  ttl = tonumber(ARGV[2])
end
return {count, ttl}
"""


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    count: int
    limit: int
    reset_after: float  # seconds until the window closes

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.count)


class RateLimiter:
    """``ratelimit:{ip}:{action}``: at most `limit` hits per `window` seconds (1 min), atomic.

    A fixed window opened by the first hit (the user's design: a counter that expires after a
    minute). Refused hits still count, so hammering does not reopen the window early.
    """

    def __init__(self, client: RedisClient, limit: int, *, window: float = RATELIMIT_WINDOW) -> None:
        if limit < 1 or window <= 0:
            raise ValueError("limit must be >= 1 and window > 0")
        self.client = client
        self.limit = limit
        self.window_ms = max(1, int(window * 1000))
        self._hit = client.register_script(RATE_HIT)

    def hit(self, ip: str, action: str, cost: int = 1) -> RateDecision:
        count, ttl = self._hit(keys=[ratelimit_key(ip, action)], args=[cost, self.window_ms])
        count = int(count)
        return RateDecision(count <= self.limit, count, self.limit, int(ttl) / 1000.0)

    def reset(self, ip: str, action: str) -> None:
        self.client.delete(ratelimit_key(ip, action))


# --------------------------------------------------------------------------- matchmaking

# KEYS: queue, seq. ARGV: player. FIFO by a counter in the queue's slot; joining twice is a no-op.
MM_JOIN = """
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], redis.call('INCR', KEYS[2]), ARGV[1])
return 1
"""

# KEYS: queue. ARGV: group size. All or nothing: a partial group stays queued.
MM_POP = """
local n = tonumber(ARGV[1])
if redis.call('ZCARD', KEYS[1]) < n then return {} end
local group = redis.call('ZRANGE', KEYS[1], 0, n - 1)
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, n - 1)
return group
"""


class MatchmakingQueue:
    """``matchmaking:queue``: players in arrival order; `pop_group` takes a whole match at once.

    Sorted set scored by a counter (``{matchmaking:queue}:seq``, same slot), so order is exact
    and a player is queued once. Both steps are scripts: many servers can pop concurrently and
    no player is matched twice or lost.
    """

    def __init__(self, client: RedisClient, key: str = MATCHMAKING_KEY) -> None:
        self.client = client
        self.key = key
        self.seq_key = colocated_key(key, "seq")
        self._join = client.register_script(MM_JOIN)
        self._pop = client.register_script(MM_POP)

    def join(self, player_id: str) -> bool:
        """Queue a player; False if already queued."""
        return bool(self._join(keys=[self.key, self.seq_key], args=[key_part("player id", player_id)]))

    def leave(self, player_id: str) -> bool:
        return bool(self.client.zrem(self.key, player_id))

    def pop_group(self, size: int) -> list[str]:
        """The `size` longest-waiting players, removed together; [] if fewer are waiting."""
        if size < 1:
            raise ValueError("group size must be >= 1")
        return [reply_text(m) for m in self._pop(keys=[self.key], args=[size])]

    def position(self, player_id: str) -> int | None:
        return self.client.zrank(self.key, player_id)

    def __len__(self) -> int:
        return int(self.client.zcard(self.key))

    def waiting(self) -> Iterator[str]:
        for member in self.client.zrange(self.key, 0, -1):
            yield reply_text(member)
