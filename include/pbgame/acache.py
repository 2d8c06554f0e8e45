"""The cache layer for the asyncio game service: the same keys and Lua scripts as `pbgame.cache`.

A request handler must not block the event loop, so the service talks to Redis through
redis-py's asyncio client (a single Redis or a Redis Cluster, `connect`). Every atomic step is
the very script the synchronous classes run, so both can serve one Redis side by side.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import redis.asyncio as aredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.backoff import ExponentialWithJitterBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError
from redis.retry import Retry

from pbgame.cache import (
    FILL_PROFILE,
    INVALIDATE_PROFILE,
    MM_JOIN,
    MM_POP,
    RATE_HIT,
    RELEASE_LOCK,
    RateDecision,
    jittered,
    temp_leaderboard_key,
)
from pbmigrate.cache.client import CLUSTER_SCHEMES, parse_cluster_url
from pbmigrate.cache.keys import (
    BACKEND_FLAG_KEY,
    BACKENDS,
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
    colocated_key,
    key_part,
    leaderboard_key,
    profile_key,
    ratelimit_key,
    session_key,
)

log = logging.getLogger("pbgame")
AsyncRedis = aredis.Redis | RedisCluster
Entry = tuple[str, float]
ScriptCall = tuple[AsyncScript, list[str], list[Any]]

# Only if the board exists: a ZADD on an expired board would make a one-member board that
# looks complete; the next read rebuilds it from PostgreSQL instead.
_BOARD_UPDATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
for i = 1, #ARGV, 2 do redis.call('ZADD', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
"""


def connect(url: str, *, max_connections: int = 64) -> AsyncRedis:
    """An asyncio client for the URL forms of `pbmigrate.cache.client` (single or cluster)."""
    scheme = url.partition("://")[0]
    query = dict(parse_qsl(urlsplit(url).query)) if "?" in url else {}
    common: dict[str, Any] = {"decode_responses": True, "socket_timeout": 5.0, "socket_connect_timeout": 5.0,
                              "retry": Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), 3)}
    if scheme in CLUSTER_SCHEMES or query.get("cluster", "").lower() in ("1", "true", "yes", "on"):
        nodes, options = parse_cluster_url(url)
        return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in nodes], max_connections=max_connections,
                            **options, **common)
    if "cluster" in query:
        parts = urlsplit(url)
        url = urlunsplit(parts._replace(query="&".join(f"{k}={v}" for k, v in parse_qsl(parts.query)
                                                       if k != "cluster")))
    # Blocking: under a burst, wait for a free connection instead of failing the request.
    pool = aredis.BlockingConnectionPool.from_url(url, max_connections=max_connections, timeout=5.0, **common)
    return aredis.Redis(connection_pool=pool)


async def run_scripts(client: AsyncRedis, calls: list[ScriptCall]) -> list[Any]:
    """Several scripts in one round trip (a pipeline) on a single Redis.

    On a Cluster their keys may live on different nodes, so they run one by one. A Redis that
    lost its script cache (restarted, SCRIPT FLUSH) answers NOSCRIPT: then they run one by one,
    which loads them; the scripts this runs (invalidate, board update) are idempotent."""
    if isinstance(client, RedisCluster):
        return [await script(keys=keys, args=args) for script, keys, args in calls]
    pipe = client.pipeline(transaction=False)
    for script, keys, args in calls:
        pipe.evalsha(script.sha, len(keys), *keys, *args)
    try:
        return await pipe.execute()
    except NoScriptError:
        return [await script(keys=keys, args=args) for script, keys, args in calls]


class BackendFlag:
    """``pbm:backend`` read at most once per `ttl` seconds; a Redis hiccup keeps the last value."""

    def __init__(self, client: AsyncRedis, *, ttl: float = 1.0, default: str = "pocketbase") -> None:
        self.client = client
        self.ttl = ttl
        self.value = default
        self._at = -1e9

    async def get(self) -> str:
        now = time.monotonic()
        if now - self._at >= self.ttl:
            self._at = now
            try:
                raw = await self.client.get(BACKEND_FLAG_KEY)
            except Exception as exc:  # keep serving on the last known backend
                log.warning("cannot read %s (%s); staying on %s", BACKEND_FLAG_KEY, type(exc).__name__, self.value)
                return self.value
            if raw in BACKENDS:
                self.value = raw
        return self.value


class Sessions:
    """``session:{token}`` -> JSON, 24 h; a found session is remembered in-process for `local_ttl`.

    Every journey needs the session first: remembering it for a few seconds saves one Redis
    round trip per request. A session deleted in Redis is still honoured for at most
    `local_ttl` seconds by a process that saw it (0 turns the memory off).
    """

    def __init__(self, client: AsyncRedis, *, ttl: int = SESSION_TTL, local_ttl: float = 5.0,
                 local_max: int = 200_000) -> None:
        self.client = client
        self.ttl = ttl
        self.local_ttl = local_ttl
        self.local_max = local_max
        self._local: dict[str, tuple[float, dict[str, Any]]] = {}

    async def create(self, data: Mapping[str, Any]) -> str:
        token = secrets.token_urlsafe(32)
        await self.client.set(session_key(token), json.dumps(data, separators=(",", ":")), ex=self.ttl)
        return token

    async def get(self, token: str) -> dict[str, Any] | None:
        if not token:
            return None
        now = time.monotonic()
        hit = self._local.get(token)
        if hit and hit[0] > now:
            return hit[1]
        raw = await self.client.get(session_key(token))
        if raw is None:
            self._local.pop(token, None)
            return None
        data = json.loads(raw)
        if self.local_ttl > 0:
            if len(self._local) >= self.local_max:
                self._local.clear()
            self._local[token] = (now + self.local_ttl, data)
        return data

    async def delete(self, token: str) -> bool:
        self._local.pop(token, None)
        return bool(await self.client.delete(session_key(token)))


class Profiles:
    """Cache-aside ``user:{id}:profile`` over `load` (an async PostgreSQL read), as `ProfileCache`."""

    def __init__(self, client: AsyncRedis, load: Callable[[str], Awaitable[dict[str, str] | None]], *,
                 ttl: int = PROFILE_TTL, jitter: float = PROFILE_JITTER, missing_ttl: int = PROFILE_MISSING_TTL):
        self.client = client
        self.load = load
        self.ttl = ttl
        self.jitter = jitter
        self.missing_ttl = missing_ttl
        self._fill = client.register_script(FILL_PROFILE)
        self._invalidate = client.register_script(INVALIDATE_PROFILE)

    @staticmethod
    def keys(player_id: str) -> list[str]:
        key = profile_key(player_id)
        return [key, colocated_key(key, "ver")]

    async def get(self, player_id: str) -> dict[str, str] | None:
        keys = self.keys(player_id)
        cached = await self.client.hgetall(keys[0])
        if cached:
            return None if MISSING_FIELD in cached else cached
        seen = await self.client.get(keys[1]) or "0"
        row = await self.load(player_id)
        if row is None:
            if self.missing_ttl > 0:
                await self._fill(keys=keys, args=[seen, self.missing_ttl, MISSING_FIELD, "1"])
            return None
        if row:
            args: list[Any] = [seen, jittered(self.ttl, self.jitter)]
            for k, v in row.items():
                args += (k, v)
            await self._fill(keys=keys, args=args)
        return row

    async def invalidate(self, player_id: str) -> None:
        await run_scripts(self.client, [self.invalidate_call(player_id)])

    def invalidate_call(self, player_id: str) -> ScriptCall:
        """The invalidation as a script call, to batch with others (`run_scripts`)."""
        return self._invalidate, self.keys(player_id), [PROFILE_VERSION_TTL]


class Leaderboards:
    """``leaderboard:{season}:top``: read, rebuilt from `source` under a lock when expired."""

    def __init__(self, client: AsyncRedis, source: Callable[[str], Awaitable[list[Entry]]], *,
                 ttl: int = LEADERBOARD_TTL, lock_ttl: float = 10.0, wait: float = 2.0) -> None:
        self.client = client
        self.source = source
        self.ttl = ttl
        self.lock_ttl = lock_ttl
        self.wait = wait
        self._swap = client.register_script(SWAP_LEADERBOARD)
        self._release = client.register_script(RELEASE_LOCK)
        self._update = client.register_script(_BOARD_UPDATE)

    async def _read(self, season: str, n: int) -> list[Entry]:
        rows = await self.client.zrevrange(leaderboard_key(season), 0, n - 1, withscores=True)
        return [(m, float(v)) for m, v in rows]

    async def replace(self, season: str, entries: list[Entry]) -> int:
        if not entries:
            await self.client.delete(leaderboard_key(season))
            return 0
        temp = temp_leaderboard_key(season)
        for i in range(0, len(entries), 1000):
            await self.client.zadd(temp, dict(entries[i:i + 1000]))
        await self.client.expire(temp, self.ttl + 600)
        await self._swap(keys=[temp, leaderboard_key(season)], args=[self.ttl])
        return len(entries)

    async def top(self, season: str, n: int) -> list[Entry]:
        rows = await self._read(season, n)
        if rows:
            return rows
        lock = colocated_key(leaderboard_key(season), "lock")
        token = uuid.uuid4().hex
        if await self.client.set(lock, token, nx=True, px=int(self.lock_ttl * 1000)):
            try:
                await self.replace(season, await self.source(season))
            finally:
                await self._release(keys=[lock], args=[token])
            return await self._read(season, n)
        deadline = time.monotonic() + self.wait
        while time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            rows = await self._read(season, n)
            if rows:
                return rows
        ranked = sorted(await self.source(season), key=lambda e: (e[1], e[0].encode()), reverse=True)
        return ranked[:n]

    async def update(self, season: str, scores: Mapping[str, float]) -> bool:
        """New scores into a live board (not into an expired one: that rebuilds on its next read)."""
        return bool((await run_scripts(self.client, [self.update_call(season, scores)]))[0])

    def update_call(self, season: str, scores: Mapping[str, float]) -> ScriptCall:
        """The update as a script call, to batch with others (`run_scripts`)."""
        args: list[Any] = []
        for member, score in scores.items():
            args += (score, member)
        return self._update, [leaderboard_key(season)], args


class RateLimit:
    """``ratelimit:{ip}:{action}``: at most `limit` hits a minute, the script of `RateLimiter`."""

    def __init__(self, client: AsyncRedis, limits: Mapping[str, int], *, window: float = RATELIMIT_WINDOW):
        self.client = client
        self.limits = dict(limits)
        self.window_ms = max(1, int(window * 1000))
        self._hit = client.register_script(RATE_HIT)

    async def hit(self, ip: str, action: str) -> RateDecision:
        limit = self.limits[action]
        count, ttl = await self._hit(keys=[ratelimit_key(ip, action)], args=[1, self.window_ms])
        return RateDecision(int(count) <= limit, int(count), limit, int(ttl) / 1000.0)


class Matchmaking:
    """``matchmaking:queue`` with the scripts of `MatchmakingQueue` (FIFO, whole groups)."""

    def __init__(self, client: AsyncRedis, key: str = MATCHMAKING_KEY) -> None:
        self.client = client
        self.key = key
        self.seq_key = colocated_key(key, "seq")
        self._join = client.register_script(MM_JOIN)
        self._pop = client.register_script(MM_POP)

    async def join(self, player_id: str) -> tuple[bool, int | None]:
        added = bool(await self._join(keys=[self.key, self.seq_key], args=[key_part("player id", player_id)]))
        return added, await self.client.zrank(self.key, player_id)

    async def pop(self, size: int) -> list[str]:
        if size < 1:
            raise ValueError("group size must be >= 1")
        return list(await self._pop(keys=[self.key], args=[size]))
