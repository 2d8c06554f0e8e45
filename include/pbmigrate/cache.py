"""The Redis cache layer the game server uses after the move: the user's key patterns and TTLs.

    use                          key                          lifetime
    session storage              session:{token}              24 h (SESSION_TTL)
    player profile, cache-aside  user:{id}:profile            1 h minus up to 10 % jitter, invalidated on write
    leaderboard                  leaderboard:{season}:top     5 min (LEADERBOARD_TTL)
    game state                   game:{id}:state              until the game ends (GameStateStore.end)
    rate limiting                ratelimit:{ip}:{action}      1 min fixed window (RATELIMIT_WINDOW)
    matchmaking queue            matchmaking:queue            none
    backend feature flag         pbm:backend                  none; "pocketbase" or "postgres"

The braces are written literally: ``user:{abc}:profile`` is the key. In a Redis Cluster the part
between the first ``{`` and ``}`` is the hash tag, so every key of one player (profile and its
version counter), of one season (leaderboard and its temp copy) or of one IP hashes to one slot.
That is intended: multi-key scripts and RENAME need one slot, and the spread over players,
seasons and IPs is still even. The matchmaking queue's counter is ``{matchmaking:queue}:seq``,
whose tag is the queue's whole name, the same slot as ``matchmaking:queue`` (`colocated_key`).
Every class works unchanged with ``redis.Redis`` and ``redis.cluster.RedisCluster``
(`pbmigrate.redisconn.connect` builds either).

Atomic steps are Lua scripts registered with ``register_script`` (single-slot, so cluster-safe).
"""

from __future__ import annotations

import binascii
import json
import random
import re
import secrets
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg
from psycopg import sql

from pbmigrate.errors import MappingError, PbmError
from pbmigrate.redisconn import RedisClient

SESSION_TTL = 24 * 3600
PROFILE_TTL = 3600
PROFILE_JITTER = 0.1
PROFILE_MISSING_TTL = 30
PROFILE_VERSION_TTL = 24 * 3600
LEADERBOARD_TTL = 300
LEADERBOARD_TOP = 100
RATELIMIT_WINDOW = 60.0
GAME_STATE_TTL: int | None = None  # "for the session": deleted when the game ends
MATCHMAKING_KEY = "matchmaking:queue"
BACKEND_FLAG_KEY = "pbm:backend"
BACKENDS = ("pocketbase", "postgres")

PATTERNS = {
    "session": "session:{token}",
    "profile": "user:{id}:profile",
    "leaderboard": "leaderboard:{season}:top",
    "game_state": "game:{id}:state",
    "ratelimit": "ratelimit:{ip}:{action}",
    "matchmaking": MATCHMAKING_KEY,
    "backend": BACKEND_FLAG_KEY,
}

MISSING_FIELD = "__missing__"  # a cached "no such player", so misses on bad ids spare PostgreSQL


# --------------------------------------------------------------------------- keys


def _part(name: str, value: object) -> str:
    """A key component as text; empty is refused because ``{}`` is no hash tag in a cluster."""
    text = value if isinstance(value, str) else str(value)
    if not text:
        raise ValueError(f"{name} must not be empty")
    return text


def session_key(token: str) -> str:
    return f"session:{{{_part('token', token)}}}"


def profile_key(player_id: object) -> str:
    return f"user:{{{_part('player id', player_id)}}}:profile"


def leaderboard_key(season: object) -> str:
    return f"leaderboard:{{{_part('season', season)}}}:top"


def game_state_key(game_id: object) -> str:
    return f"game:{{{_part('game id', game_id)}}}:state"


def ratelimit_key(ip: str, action: str) -> str:
    return f"ratelimit:{{{_part('ip', ip)}}}:{{{_part('action', action)}}}"


def hash_tag(key: str) -> str:
    """The part of `key` Redis Cluster hashes: the first non-empty ``{...}``, else the whole key."""
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key


def key_slot(key: str) -> int:
    """The cluster slot of `key`: CRC16 (XMODEM, which ``binascii.crc_hqx`` computes in C) mod 16384."""
    return binascii.crc_hqx(hash_tag(key).encode(), 0) % 16384


def colocated_key(key: str, suffix: str) -> str:
    """A companion key in the same cluster slot as `key`, for multi-key scripts."""
    if hash_tag(key) != key:
        return f"{key}:{suffix}"  # appending after the tag keeps the tag
    return f"{{{key}}}:{suffix}"  # an untagged key hashes on its whole name: tag it with that name


def _s(value: Any) -> Any:
    """Text from a reply, whether or not the client decodes responses."""
    return value.decode() if isinstance(value, bytes) else value


# --------------------------------------------------------------------------- secrets

_SECRET_PARTS = ("password", "passwd", "secret", "apikey", "privatekey")
_SECRET_ENDS = ("token", "tokenkey", "salt", "hash")  # not "tokens": a game's currency is no secret


def secret_reason(field: str, *, allow_email: bool = False) -> str | None:
    """Why `field` looks secret (password, token key, email...), or None if it looks public.

    Names are compared without case, ``_`` or ``-``: ``password_hash``, ``passwordHash`` and
    ``token_key`` all match. Emails are personal data: refused unless the mapping allows them.
    """
    norm = re.sub(r"[^a-z0-9]", "", field.lower())
    for part in _SECRET_PARTS:
        if part in norm:
            return f"looks like a secret ({part})"
    for end in _SECRET_ENDS:
        if norm.endswith(end):
            return f"looks like a secret ({end})"
    if norm in ("otp", "totp", "mfa"):
        return "looks like a secret (one-time password)"
    if norm.endswith("email") and not allow_email:
        return "is an email address (set allow_email: true to cache it)"
    return None


def check_public_fields(fields: Iterable[str], *, allow_email: bool = False, where: str = "fields") -> None:
    """Refuse, naming the field, anything that must never be cached (DESIGN: secrets stay secret)."""
    for field in fields:
        reason = secret_reason(field, allow_email=allow_email)
        if reason:
            raise MappingError(f"{where}: field {field!r} {reason}; it is never written to Redis")


# --------------------------------------------------------------------------- feature flag


def get_backend(client: RedisClient, default: str = "pocketbase") -> str:
    """Which backend the game server should use; `default` until the flag was ever set."""
    value = _s(client.get(BACKEND_FLAG_KEY))
    if value is None:
        return default
    if value not in BACKENDS:
        raise PbmError(f"Redis key {BACKEND_FLAG_KEY} holds {value!r}, expected one of {BACKENDS}")
    return value


def set_backend(client: RedisClient, backend: str) -> str | None:
    """Flip the flag (no TTL: runbooks rely on it staying); returns the previous value."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
    return _s(client.set(BACKEND_FLAG_KEY, backend, get=True))


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


# --------------------------------------------------------------------------- PostgreSQL specs


@dataclass(frozen=True)
class ProfileSpec:
    """Where public profile fields live: mapping ``cache.profiles``."""

    table: str = "players"
    fields: tuple[str, ...] = ("display_name", "level", "xp", "country", "avatar")
    id: str = "id"
    ttl: int = PROFILE_TTL
    jitter: float = PROFILE_JITTER
    allow_email: bool = False
    where: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "fields", tuple(self.fields))
        check_public_fields(self.fields, allow_email=self.allow_email, where="cache.profiles.fields")
        if not self.fields:
            raise MappingError("cache.profiles.fields: name at least one public field")
        if not 0 <= self.jitter < 1:
            raise MappingError(f"cache.profiles.jitter: {self.jitter} is not a fraction in [0, 1)")


@dataclass(frozen=True)
class LeaderboardSpec:
    """How to rank players per season: mapping ``cache.leaderboards``. `top` None keeps everyone."""

    table: str = "player_stats"
    season: str = "season"
    member: str = "player_id"
    score: str = "rating"
    top: int | None = LEADERBOARD_TOP
    ttl: int = LEADERBOARD_TTL
    where: str | None = None


@dataclass(frozen=True)
class GameStateSpec:
    """Which games are live and where their state is: mapping ``cache.game_state``."""

    table: str = "games"
    state: str = "state"
    id: str = "id"
    where: str | None = "status = 'in_progress'"
    ttl: int | None = GAME_STATE_TTL


def table_columns(conn: psycopg.Connection, schema: str, table: str) -> dict[str, str]:
    """Column name -> type name (``format_type``) of `schema.table`; empty if there is no such table."""
    rows = conn.execute(
        "SELECT a.attname, format_type(a.atttypid, NULL) FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped",
        (schema, table),
    ).fetchall()
    return dict(rows)


def check_columns(
    conn: psycopg.Connection, schema: str, table: str, columns: Iterable[str], where: str
) -> dict[str, str]:
    """Fail with the mapping key and the missing column, not with a SQL error mid-warm-up."""
    have = table_columns(conn, schema, table)
    if not have:
        raise MappingError(f"{where}: table {schema}.{table} does not exist")
    for col in columns:
        if col not in have:
            raise MappingError(f"{where}: column {col!r} is not in {schema}.{table}")
    return have


_TEXT_TYPES = {"text", "character varying", "character", "name", "citext"}
_CAST_TYPES = {"smallint", "integer", "bigint", "numeric", "real", "double precision", "json", "jsonb"}


def _as_text(column: str, pg_type: str | None = None) -> sql.Composable:
    """A column as cache text: numbers and JSON as they print, booleans ``true``/``false``,
    timestamps in ISO 8601 (JSON's spelling; with a time zone, in UTC with ``Z``), NULL kept.
    Plain casts where they give the same text: ``to_jsonb`` costs PostgreSQL more per value."""
    ident = sql.Identifier(column)
    if pg_type in _TEXT_TYPES:
        return ident
    if pg_type in _CAST_TYPES:
        return sql.SQL("{}::text").format(ident)
    if pg_type == "timestamp with time zone":  # in UTC, whatever the session's TimeZone
        return sql.SQL("(to_jsonb({} AT TIME ZONE 'UTC') #>> '{{}}') || 'Z'").format(ident)
    return sql.SQL("to_jsonb({}) #>> '{{}}'").format(ident)


def _where(*conds: sql.Composable | str | None) -> sql.Composable:
    """AND of the conditions. Text from the mapping gets its ``%`` doubled: every query built
    here is executed with a parameter tuple (an empty one when there is nothing to bind)."""
    parts = [c if isinstance(c, sql.Composable) else sql.SQL("({})".format(c.replace("%", "%%"))) for c in conds if c]
    return sql.SQL(" WHERE ") + sql.SQL(" AND ").join(parts) if parts else sql.SQL("")


def profile_query(
    schema: str, spec: ProfileSpec, types: Mapping[str, str] | None = None, *, one: bool = False
) -> sql.Composed:
    """``id, field...`` as text (`types`: column types, see `table_columns`); with `one`, for a
    single ``%s`` id (the cache-aside read). Warm-up and cache-aside share it: same text either way."""
    types = types or {}
    cols = [sql.SQL("{}::text").format(sql.Identifier(spec.id))] + [_as_text(f, types.get(f)) for f in spec.fields]
    cond = sql.SQL("{} = %s").format(sql.Identifier(spec.id)) if one else None
    return sql.SQL("SELECT {} FROM {}.{}{}").format(
        sql.SQL(", ").join(cols), sql.Identifier(schema), sql.Identifier(spec.table), _where(spec.where, cond)
    )


def profile_mapping(spec: ProfileSpec, row: Sequence[str | None]) -> dict[str, str]:
    """The cached hash of one ``id, field...`` row: the configured fields that are not NULL."""
    return {name: value for name, value in zip(spec.fields, row[1:]) if value is not None}


def leaderboard_query(schema: str, spec: LeaderboardSpec, *, one_season: bool = False) -> sql.Composed:
    """``season, member, score`` ranked like ZREVRANGE: score desc, then member desc in byte order.

    A member listed twice in a season counts with its best score; NULLs, NaN and empty seasons
    are left out.
    """
    s, m, v = (sql.Identifier(c) for c in (spec.season, spec.member, spec.score))
    base = _where(
        sql.SQL("{} IS NOT NULL AND {}::text <> '' AND {} IS NOT NULL AND {} IS NOT NULL").format(s, s, m, v),
        spec.where,
        sql.SQL("{}::text = %s").format(s) if one_season else None,
    )
    top = sql.SQL(" WHERE rn <= {}").format(sql.Literal(int(spec.top))) if spec.top else sql.SQL("")
    return sql.SQL(
        "SELECT season, member, score FROM ("
        " SELECT season, member, score, row_number() OVER"
        ' (PARTITION BY season ORDER BY score DESC, member COLLATE "C" DESC) AS rn'
        " FROM (SELECT {s}::text AS season, {m}::text AS member, max({v})::float8 AS score"
        " FROM {schema}.{table}{base} GROUP BY 1, 2) AS g WHERE score <> 'NaN'"
        ") AS ranked{top} ORDER BY season, rn"
    ).format(s=s, m=m, v=v, schema=sql.Identifier(schema), table=sql.Identifier(spec.table), base=base, top=top)


def game_state_query(schema: str, spec: GameStateSpec) -> sql.Composed:
    """``id, state`` as text; `where` is SQL from the mapping file, trusted like the rest of it."""
    return sql.SQL("SELECT {}::text, {}::text FROM {}.{}{}").format(
        sql.Identifier(spec.id),
        sql.Identifier(spec.state),
        sql.Identifier(schema),
        sql.Identifier(spec.table),
        _where(
            sql.SQL("{} IS NOT NULL AND {}::text <> ''").format(sql.Identifier(spec.state), sql.Identifier(spec.id)),
            spec.where,
        ),
    )


# --------------------------------------------------------------------------- profiles

# KEYS: profile, version. ARGV: version seen before reading PostgreSQL, ttl, field, value, ...
# Refuses the fill if the profile was invalidated meanwhile: a reader that loaded the old row
# before a writer committed must not put it back for an hour.
_FILL_PROFILE = """
if (redis.call('GET', KEYS[2]) or '0') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""

# KEYS: profile, version. ARGV: version ttl.
_INVALIDATE_PROFILE = """
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
        self._fill = client.register_script(_FILL_PROFILE)
        self._invalidate = client.register_script(_INVALIDATE_PROFILE)

    @staticmethod
    def keys(player_id: str) -> tuple[str, str]:
        key = profile_key(player_id)
        return key, colocated_key(key, "ver")

    def get(self, player_id: str) -> dict[str, str] | None:
        """The public profile, or None if the player does not exist."""
        key, ver_key = self.keys(player_id)
        cached = self.client.hgetall(key)
        if cached:
            cached = {_s(k): _s(v) for k, v in cached.items()}
            return None if MISSING_FIELD in cached else cached
        seen = _s(self.client.get(ver_key)) or "0"
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

# KEYS: temp, leaderboard. ARGV: ttl. Swaps the finished temp set in, atomically; a retry after
# a lost reply finds no temp key and does nothing.
_SWAP_LEADERBOARD = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('RENAME', KEYS[1], KEYS[2])
return 1
"""

# KEYS: lock. ARGV: token. Release only a lock we still hold.
_RELEASE = """
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
        self._swap = client.register_script(_SWAP_LEADERBOARD)
        self._release = client.register_script(_RELEASE)

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
        return [(_s(m), float(v)) for m, v in rows]

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
_RATE_HIT = """
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
        self._hit = client.register_script(_RATE_HIT)

    def hit(self, ip: str, action: str, cost: int = 1) -> RateDecision:
        count, ttl = self._hit(keys=[ratelimit_key(ip, action)], args=[cost, self.window_ms])
        count = int(count)
        return RateDecision(count <= self.limit, count, self.limit, int(ttl) / 1000.0)

    def reset(self, ip: str, action: str) -> None:
        self.client.delete(ratelimit_key(ip, action))


# --------------------------------------------------------------------------- matchmaking

# KEYS: queue, seq. ARGV: player. FIFO by a counter in the queue's slot; joining twice is a no-op.
_MM_JOIN = """
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], redis.call('INCR', KEYS[2]), ARGV[1])
return 1
"""

# KEYS: queue. ARGV: group size. All or nothing: a partial group stays queued.
_MM_POP = """
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
        self._join = client.register_script(_MM_JOIN)
        self._pop = client.register_script(_MM_POP)

    def join(self, player_id: str) -> bool:
        """Queue a player; False if already queued."""
        return bool(self._join(keys=[self.key, self.seq_key], args=[_part("player id", player_id)]))

    def leave(self, player_id: str) -> bool:
        return bool(self.client.zrem(self.key, player_id))

    def pop_group(self, size: int) -> list[str]:
        """The `size` longest-waiting players, removed together; [] if fewer are waiting."""
        if size < 1:
            raise ValueError("group size must be >= 1")
        return [_s(m) for m in self._pop(keys=[self.key], args=[size])]

    def position(self, player_id: str) -> int | None:
        return self.client.zrank(self.key, player_id)

    def __len__(self) -> int:
        return int(self.client.zcard(self.key))

    def waiting(self) -> Iterator[str]:
        for member in self.client.zrange(self.key, 0, -1):
            yield _s(member)
