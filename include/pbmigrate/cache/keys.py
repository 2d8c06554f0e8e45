"""The Redis key schema the migration writes and the game reads: the user's patterns and TTLs.

    use                          key                          lifetime
    session storage              session:{token}              24 h (SESSION_TTL)
    player profile, cache-aside  user:{id}:profile            1 h minus up to 10 % jitter, invalidated on write
    leaderboard                  leaderboard:{season}:top     5 min (LEADERBOARD_TTL)
    game state                   game:{id}:state              until the game ends
    rate limiting                ratelimit:{ip}:{action}      1 min fixed window (RATELIMIT_WINDOW)
    matchmaking queue            matchmaking:queue            none
    backend feature flag         pbm:backend                  none; "pocketbase", "shadow" or "postgres"

The engine keeps only what its warm-up and cut-over need: the keys, the flag, the secret checks,
the specs of the mapping's ``cache:`` section and the queries that turn tables into cache text.
The runtime classes a game server uses (sessions, cache-aside profiles, leaderboards, game
state, rate limit, matchmaking) live in the application package ``pbgame.cache`` and its
asyncio twin ``pbgame.acache``; Airflow never needs them.

The braces are written literally: ``user:{abc}:profile`` is the key. In a Redis Cluster the part
between the first ``{`` and ``}`` is the hash tag, so every key of one player (profile and its
version counter), of one season (leaderboard and its temp copy) or of one IP hashes to one slot.
That is intended: multi-key scripts and RENAME need one slot, and the spread over players,
seasons and IPs is still even. The matchmaking queue's counter is ``{matchmaking:queue}:seq``,
whose tag is the queue's whole name, the same slot as ``matchmaking:queue`` (`colocated_key`).
"""

from __future__ import annotations

import binascii
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from pbmigrate.cache.client import RedisClient
from pbmigrate.errors import MappingError, PbmError
from pbmigrate.plan.mapping import closest, secret_reason

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
BACKENDS = ("pocketbase", "shadow", "postgres")  # shadow: PocketBase serves, PostgreSQL is compared

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


def key_part(name: str, value: object) -> str:
    """A key component as text; empty is refused because ``{}`` is no hash tag in a cluster."""
    text = value if isinstance(value, str) else str(value)
    if not text:
        raise ValueError(f"{name} must not be empty")
    return text


def session_key(token: str) -> str:
    return f"session:{{{key_part('token', token)}}}"


def profile_key(player_id: object) -> str:
    return f"user:{{{key_part('player id', player_id)}}}:profile"


def leaderboard_key(season: object) -> str:
    return f"leaderboard:{{{key_part('season', season)}}}:top"


def game_state_key(game_id: object) -> str:
    return f"game:{{{key_part('game id', game_id)}}}:state"


def ratelimit_key(ip: str, action: str) -> str:
    return f"ratelimit:{{{key_part('ip', ip)}}}:{{{key_part('action', action)}}}"


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


def reply_text(value: Any) -> Any:
    """Text from a reply, whether or not the client decodes responses."""
    return value.decode() if isinstance(value, bytes) else value


def check_public_fields(fields: Iterable[str], *, allow_email: bool = False, where: str = "fields") -> None:
    """Refuse, naming the field, anything that must never be cached (DESIGN: secrets stay secret)."""
    for field in fields:
        reason = secret_reason(field, allow_email=allow_email)
        if reason:
            raise MappingError(f"{where}: field {field!r} {reason}; it is never written to Redis")


# --------------------------------------------------------------------------- feature flag


def get_backend(client: RedisClient, default: str = "pocketbase") -> str:
    """Which backend the game server should use; `default` until the flag was ever set."""
    value = reply_text(client.get(BACKEND_FLAG_KEY))
    if value is None:
        return default
    if value not in BACKENDS:
        raise PbmError(f"Redis key {BACKEND_FLAG_KEY} holds {value!r}, expected one of {BACKENDS}")
    return value


def set_backend(client: RedisClient, backend: str) -> str | None:
    """Flip the flag (no TTL: runbooks rely on it staying); returns the previous value."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
    return reply_text(client.set(BACKEND_FLAG_KEY, backend, get=True))


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


def check_columns(conn: psycopg.Connection, schema: str, table: str, columns: Iterable[str | tuple[str, str]],
                  where: str) -> dict[str, str]:
    """The columns a cache section reads, checked before anything is read: a missing table or
    column fails with the mapping key and a did-you-mean, not with a SQL error mid-warm-up.
    `columns` are names, or (mapping key, name) pairs so that the message names the key.
    Returns the table's column types (see `table_columns`)."""
    have = table_columns(conn, schema, table)
    if not have:
        tables = [name for (name,) in conn.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relkind IN ('r', 'v', 'm')", (schema,))]
        raise MappingError(f"{where}.table: the migration makes no table or view {table!r}" + closest(table, tables))
    for item in columns:
        key, column = item if isinstance(item, tuple) else ("", item)
        if column not in have:
            raise MappingError(f"{where}{'.' + key if key else ''}: {table!r} has no column {column!r}"
                               + closest(column, have))
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



# --------------------------------------------------------------------------- leaderboards

# KEYS: temp, leaderboard. ARGV: ttl. Swaps the finished temp set in, atomically; a retry after
# a lost reply finds no temp key and does nothing.
SWAP_LEADERBOARD = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('RENAME', KEYS[1], KEYS[2])
return 1
"""

