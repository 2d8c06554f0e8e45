"""The game API service: player journeys served by PocketBase or PostgreSQL + Redis, per the flag.

The game points at this service once. Every request reads ``pbm:backend`` (cached for about a
second): ``pocketbase`` forwards the journey to PocketBase's REST API, ``postgres`` serves it from
PostgreSQL + Redis, ``shadow`` serves from PocketBase and, in the background, runs the same read
on PostgreSQL + Redis and counts matches and mismatches per endpoint (mismatched record ids are
logged, never values). Cut-over and roll-back are the flag flips the DAGs already make.

Sessions (``session:{token}``), the rate limit and matchmaking live in Redis whatever the flag
says, so a flip never logs a player out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import mimetypes
import os
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from psycopg_pool import AsyncConnectionPool
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from pbgame.acache import BackendFlag, Leaderboards, Matchmaking, Profiles, RateLimit, Sessions, connect, run_scripts
from pbgame.dispatch import Dispatch
from pbgame.pbstore import SAFE, PbStore
from pbgame.pgstore import PgStore
from pbgame.schema import GameSchema, ShapeError, load_schema

log = logging.getLogger("pbgame")
MAX_LIMIT = 100


@dataclass
class Settings:
    """What the service needs; `from_env` reads ``PBG_*`` variables (no secret is ever logged)."""

    pg_url: str
    redis_url: str
    pocketbase_url: str = ""
    pocketbase_email: str = ""
    pocketbase_password: str = ""
    schema: str = "game"
    mapping: str = "game.yaml"
    files_root: str = ""
    flag_ttl: float = 1.0
    login_limit: int = 20  # per IP per minute
    write_limit: int = 60
    trust_proxy: bool = False  # take the client IP from X-Forwarded-For (behind a load balancer)
    pool_max: int = 10
    bcrypt_threads: int = 1  # password checks at once per process (see Game.pg_login)
    shadow_max_inflight: int = 200
    board_memo: float = 1.0  # seconds a process reuses a leaderboard answer (Game.pg_leaderboard); 0: off

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        e = dict(os.environ if env is None else env)
        return cls(
            pg_url=e.get("PBG_PG_URL", "postgresql://postgres@127.0.0.1:5432/pbmigrate_demo"),
            redis_url=e.get("PBG_REDIS_URL", "redis://127.0.0.1:6379/2"),
            pocketbase_url=e.get("PBG_POCKETBASE_URL", ""),
            pocketbase_email=e.get("PBG_POCKETBASE_EMAIL", ""),
            pocketbase_password=e.get("PBG_POCKETBASE_PASSWORD", ""),
            schema=e.get("PBG_SCHEMA", "game"),
            mapping=e.get("PBG_MAPPING", "game.yaml"),
            files_root=e.get("PBG_FILES_ROOT", ""),
            flag_ttl=float(e.get("PBG_FLAG_TTL", "1.0")),
            login_limit=int(e.get("PBG_LOGIN_LIMIT", "20")),
            write_limit=int(e.get("PBG_WRITE_LIMIT", "60")),
            trust_proxy=e.get("PBG_TRUST_PROXY", "").lower() in ("1", "true", "yes"),
            pool_max=int(e.get("PBG_POOL_MAX", "10")),
            bcrypt_threads=int(e.get("PBG_BCRYPT_THREADS", "1")),
            board_memo=float(e.get("PBG_BOARD_MEMO", "1.0")),
        )


class Metrics:
    """Prometheus series of one service process (its own registry, so tests can run several)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("pbgame_requests", "Requests by endpoint, backend and status class",
                                ["endpoint", "backend", "status"], registry=self.registry)
        self.latency = Histogram("pbgame_request_seconds", "Request latency by endpoint and backend",
                                 ["endpoint", "backend"], registry=self.registry,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        self.shadow = Counter("pbgame_shadow_compares", "Shadow reads by endpoint and result "
                              "(match, mismatch, error, skipped)", ["endpoint", "result"], registry=self.registry)
        self.backend = Gauge("pbgame_backend", "1 for the backend the flag selects", ["backend"],
                             registry=self.registry)


class HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _ids(value: Any) -> set[str]:
    """Record ids in an answer, for the mismatch log (never the values)."""
    if isinstance(value, dict):
        return {str(value.get("id") or value.get("player_id") or "")} - {""}
    if isinstance(value, list):
        out: set[str] = set()
        for v in value:
            out |= _ids(v)
        return out
    return set()


def mismatched_ids(a: Any, b: Any) -> list[str]:
    """Ids whose records differ (or exist on one side only)."""
    if isinstance(a, list) and isinstance(b, list):
        left = {str(x.get("id") or x.get("player_id")): x for x in a if isinstance(x, dict)}
        right = {str(x.get("id") or x.get("player_id")): x for x in b if isinstance(x, dict)}
        bad = {k for k in left.keys() | right.keys() if left.get(k) != right.get(k)}
        if not bad and [*left] != [*right]:
            bad = {"(order)"}
        return sorted(bad)
    return sorted(_ids(a) | _ids(b)) or ["(none)"]


class Game:
    """The journeys, each with a PocketBase and a PostgreSQL + Redis implementation."""

    def __init__(self, settings: Settings, game: GameSchema | None = None) -> None:
        self.settings = settings
        self.game = game or load_schema(settings.mapping)
        self.metrics = Metrics()
        self._shadow_inflight = 0
        self._tasks: set[asyncio.Task] = set()
        self._boards: dict[tuple[str, int], tuple[float, list[dict[str, Any]]]] = {}
        self._bcrypt = ThreadPoolExecutor(max_workers=max(1, settings.bcrypt_threads), thread_name_prefix="bcrypt")

    async def start(self) -> None:
        s = self.settings
        self.redis = connect(s.redis_url)
        self.flag = BackendFlag(self.redis, ttl=s.flag_ttl)
        await self.redis.ping()  # fail at start, not on the first player, when Redis is unreachable
        await self.flag.get()
        self.sessions = Sessions(self.redis)
        self.ratelimit = RateLimit(self.redis, {"login": s.login_limit, "write": s.write_limit})
        self.matchmaking = Matchmaking(self.redis)
        self.pool = AsyncConnectionPool(s.pg_url, min_size=1, max_size=s.pool_max, open=False,
                                        kwargs={"autocommit": True})
        await self.pool.open(wait=True, timeout=30)
        self.pg = PgStore(self.pool, s.schema, self.game)
        await self.pg.resolve()
        spec = self.game.profile
        self.profiles = Profiles(self.redis, self.pg.profile_row, ttl=spec.ttl, jitter=spec.jitter)
        self.boards = Leaderboards(self.redis, self.pg.board, ttl=self.game.leaderboard.ttl)
        self.pb: PbStore | None = None
        if s.pocketbase_url:
            self.pb = PbStore(s.pocketbase_url, s.pocketbase_email, s.pocketbase_password, self.game)
            await self.pb.start()

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self.pb:
            await self.pb.close()
        await self.pool.close()
        await self.redis.aclose()
        self._bcrypt.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ the new stack's side

    async def pg_profile(self, player_id: str) -> dict[str, Any] | None:
        row = await self.profiles.get(player_id)
        return None if row is None else self.pg.typed_profile(player_id, row)

    async def pg_leaderboard(self, season: str, n: int) -> list[dict[str, Any]]:
        """The board's top `n`, remembered for `board_memo` seconds per process.

        A third of the game's calls are this read, and the same few seasons' top 10 are asked
        hundreds of times a second: the answer a process computed in the last second saves the
        Redis round trip. A process forgets a season's answers when it records a match in it, so
        a player sees their own result at once; another process shows it within `board_memo` s."""
        ttl = self.settings.board_memo
        now = time.monotonic()
        hit = self._boards.get((season, n)) if ttl > 0 else None
        if hit and hit[0] > now:
            return hit[1]
        spec = self.game.leaderboard
        answer = [{spec.member: m, spec.score: v} for m, v in await self.boards.top(season, n)]
        if ttl > 0:
            if len(self._boards) >= 1000:  # seasons are the client's to name: stay bounded
                self._boards.clear()
            self._boards[(season, n)] = (now + ttl, answer)
        return answer

    def _forget_boards(self, season: str) -> None:
        for key in [k for k in self._boards if k[0] == season]:
            self._boards.pop(key, None)

    async def pg_login(self, email: str, password: str) -> str | None:
        row = await self.pg.login_row(email)
        if row is None or not row[1].startswith("$2"):
            return None
        # bcrypt costs ~55 ms of CPU and releases the GIL; with many threads checking at once, the
        # OS would give the event loop (every other request) only a thread's share of the CPU, so
        # checks run one at a time per process: logins queue, the other journeys stay fast.
        loop = asyncio.get_running_loop()
        ok = await loop.run_in_executor(self._bcrypt, bcrypt.checkpw, password.encode(), row[1].encode())
        return row[0] if ok else None

    async def pg_record(self, season: str, mode: str, map_name: str, players: list[str], winner: str,
                        scores: dict[str, float]) -> str:
        game_id, ratings = await self.pg.record_match(season, mode, map_name, players, winner, scores)
        # The players' profiles invalidated and the live board updated in one Redis round trip.
        await run_scripts(self.redis, [*(self.profiles.invalidate_call(p) for p in players),
                                       self.boards.update_call(season, ratings)])
        self._forget_boards(season)
        return game_id

    # ------------------------------------------------------------------ routing

    def pocketbase(self) -> PbStore:
        if self.pb is None:
            raise HTTPError(503, "the flag selects PocketBase, but no PBG_POCKETBASE_URL is configured")
        return self.pb

    async def read(self, endpoint: str, backend: str, pb_call: Callable[[PbStore], Awaitable[Any]],
                   pg_call: Callable[[], Awaitable[Any]]) -> Any:
        if backend == "postgres":
            return await pg_call()
        result = await pb_call(self.pocketbase())
        if backend == "shadow":
            self._shadow(endpoint, result, pg_call)
        return result

    def _shadow(self, endpoint: str, expected: Any, pg_call: Callable[[], Awaitable[Any]]) -> None:
        if self._shadow_inflight >= self.settings.shadow_max_inflight:
            self.metrics.shadow.labels(endpoint, "skipped").inc()
            return

        async def compare() -> None:
            self._shadow_inflight += 1
            try:
                got = await pg_call()
            except Exception as exc:  # the new stack failing is what the shadow period is for
                self.metrics.shadow.labels(endpoint, "error").inc()
                log.warning("shadow %s: PostgreSQL side failed: %s", endpoint, type(exc).__name__)
                return
            finally:
                self._shadow_inflight -= 1
            if got == expected:
                self.metrics.shadow.labels(endpoint, "match").inc()
            else:
                self.metrics.shadow.labels(endpoint, "mismatch").inc()
                log.warning("shadow %s: mismatch on record ids %s", endpoint, mismatched_ids(expected, got)[:20])

        task = asyncio.get_running_loop().create_task(compare())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


# ---------------------------------------------------------------------- HTTP layer


def client_ip(request: Request, trust_proxy: bool) -> str:
    if trust_proxy:
        fwd = request.headers.get("x-forwarded-for")
        if fwd:
            return fwd.split(",")[0].strip()
    return request.client.host if request.client else "unknown"


def _limit(request: Request, default: int = 10) -> int:
    try:
        n = int(request.query_params.get("limit", default))
    except ValueError:
        raise HTTPError(400, "limit must be a number") from None
    if not 1 <= n <= MAX_LIMIT:
        raise HTTPError(400, f"limit must be between 1 and {MAX_LIMIT}")
    return n


def _safe(value: str, what: str) -> str:
    if not SAFE.match(value):
        raise HTTPError(400, f"bad {what}")
    return value


async def _json(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise HTTPError(400, "the body must be JSON") from None
    if not isinstance(body, dict):
        raise HTTPError(400, "the body must be a JSON object")
    return body


def build_app(settings: Settings | None = None, game: GameSchema | None = None) -> Dispatch:
    """The ASGI app; `settings` default to the environment (``python -m pbgame``)."""
    svc = Game(settings or Settings.from_env(), game)
    m = svc.metrics

    async def session_player(request: Request) -> str:
        auth = request.headers.get("authorization", "")
        token = auth[7:] if auth.lower().startswith("bearer ") else auth
        sess = await svc.sessions.get(token) if token else None
        if not sess:
            raise HTTPError(401, "log in first")
        return sess["player_id"]

    async def limited(request: Request, action: str) -> None:
        decision = await svc.ratelimit.hit(client_ip(request, svc.settings.trust_proxy), action)
        if not decision.allowed:
            raise HTTPError(429, f"too many {action} requests; retry in {decision.reset_after:.0f} s")

    def endpoint(name: str, handler: Callable[[Request, str], Awaitable[Any]]):
        # The labelled children, found once: labels() hashes its arguments under a lock per call.
        counted: dict[tuple[str, int], Any] = {}
        timed: dict[str, Any] = {}

        async def run(request: Request) -> Response:
            started = time.perf_counter()
            backend = await svc.flag.get()
            try:
                result = await handler(request, backend)
                response = result if isinstance(result, Response) else JSONResponse(result)
            except HTTPError as exc:
                response = JSONResponse({"message": exc.message}, status_code=exc.status)
            except Exception as exc:
                log.exception("%s on %s failed", name, backend)
                response = JSONResponse({"message": f"{type(exc).__name__}"}, status_code=502)
            status = response.status_code // 100
            counter = counted.get((backend, status))
            if counter is None:
                counter = counted[(backend, status)] = m.requests.labels(name, backend, f"{status}xx")
            counter.inc()
            hist = timed.get(backend)
            if hist is None:
                hist = timed[backend] = m.latency.labels(name, backend)
            hist.observe(time.perf_counter() - started)
            return response

        return run

    async def login(request: Request, backend: str) -> Any:
        await limited(request, "login")
        body = await _json(request)
        email, password = str(body.get("email", "")), str(body.get("password", ""))
        if not email or not password:
            raise HTTPError(400, "email and password are required")
        if backend == "postgres":
            player = await svc.pg_login(email, password)
        else:
            player = await svc.pocketbase().login(email, password)
        if player is None:
            raise HTTPError(401, "wrong email or password")
        return {"token": await svc.sessions.create({"player_id": player}), "player_id": player}

    async def profile_of(player_id: str, backend: str) -> Any:
        _safe(player_id, "player id")
        got = await svc.read("profile", backend, lambda pb: pb.profile(player_id),
                             lambda: svc.pg_profile(player_id))
        if got is None:
            raise HTTPError(404, "no such player")
        return got

    async def me(request: Request, backend: str) -> Any:
        return await profile_of(await session_player(request), backend)

    async def player(request: Request, backend: str) -> Any:
        await session_player(request)
        return await profile_of(request.path_params["player_id"], backend)

    async def leaderboard(request: Request, backend: str) -> Any:
        season, n = _safe(request.path_params["season"], "season"), _limit(request)
        return await svc.read("leaderboard", backend, lambda pb: pb.leaderboard(season, n),
                              lambda: svc.pg_leaderboard(season, n))

    async def history(request: Request, backend: str) -> Any:
        pid, n = await session_player(request), _limit(request, 20)
        return await svc.read("history", backend, lambda pb: pb.history(pid, n), lambda: svc.pg.history(pid, n))

    async def inventory(request: Request, backend: str) -> Any:
        pid, n = await session_player(request), _limit(request, 100)
        return await svc.read("inventory", backend, lambda pb: pb.inventory(pid, n),
                              lambda: svc.pg.inventory(pid, n))

    async def post_match(request: Request, backend: str) -> Any:
        pid = await session_player(request)
        await limited(request, "write")
        body = await _json(request)
        players = [str(p) for p in body.get("players") or []]
        winner = str(body.get("winner", ""))
        scores = {str(k): float(v) for k, v in (body.get("scores") or {}).items()}
        season, mode, map_name = (str(body.get(k, "")) for k in ("season", "mode", "map"))
        if pid not in players or winner not in players or len(set(players)) != len(players) or len(players) > 10:
            raise HTTPError(400, "players must be distinct, at most 10, and include you and the winner")
        for p in players:
            _safe(p, "player id")
        _safe(season, "season")
        if backend == "postgres":
            game_id = await svc.pg_record(season, mode, map_name, players, winner, scores)
        else:  # shadow writes go to PocketBase only; the re-sync carries them to PostgreSQL
            game_id, _ = await svc.pocketbase().record_match(season, mode, map_name, players, winner, scores)
        return JSONResponse({"id": game_id}, status_code=201)

    async def mm_join(request: Request, backend: str) -> Any:
        pid = await session_player(request)
        await limited(request, "write")
        added, position = await svc.matchmaking.join(pid)
        return {"queued": added, "position": position}

    async def mm_pop(request: Request, backend: str) -> Any:
        await session_player(request)
        body = await _json(request)
        size = body.get("size", 2)
        if not isinstance(size, int) or not 1 <= size <= 10:
            raise HTTPError(400, "size must be a whole number from 1 to 10")
        return {"players": await svc.matchmaking.pop(size)}

    async def files(request: Request, backend: str) -> Any:
        coll, rec, name = (request.path_params[k] for k in ("collection", "record", "name"))
        _safe(coll, "collection")
        _safe(rec, "record")
        if "/" in name or name in ("", ".", "..") or "\x00" in name:
            raise HTTPError(400, "bad file name")
        if backend == "postgres":
            root = svc.settings.files_root
            path = Path(root, coll, rec, name) if root else None
            if path is None or not path.is_file():
                raise HTTPError(404, "no such file")
            return FileResponse(path, media_type=mimetypes.guess_type(name)[0] or "application/octet-stream")
        r = await svc.pocketbase().file(coll, rec, name)
        if r.status_code == 404:
            raise HTTPError(404, "no such file")
        return Response(r.content, status_code=r.status_code,
                        media_type=r.headers.get("content-type", "application/octet-stream"))

    async def health(request: Request) -> Response:
        backend = await svc.flag.get()
        checks = {}
        try:
            checks["redis"] = bool(await svc.redis.ping())
        except Exception:
            checks["redis"] = False
        try:
            async with svc.pool.connection() as conn:
                await conn.execute("SELECT 1")
            checks["postgres"] = True
        except Exception:
            checks["postgres"] = False
        ok = checks["redis"] and (checks["postgres"] or backend == "pocketbase")
        return JSONResponse({"status": "ok" if ok else "degraded", "backend": backend, **checks},
                            status_code=200 if ok else 503)

    async def metrics(request: Request) -> Response:
        backend = await svc.flag.get()
        for b in ("pocketbase", "shadow", "postgres"):
            m.backend.labels(b).set(1.0 if b == backend else 0.0)
        return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        try:
            await svc.start()
        except ShapeError as exc:  # one line naming what is missing, not a traceback around it
            log.error("%s", exc)
            raise SystemExit(3) from None
        try:
            yield
        finally:
            await svc.stop()

    eps = {name: endpoint(name, fn) for name, fn in (
        ("login", login), ("profile_me", me), ("history", history), ("inventory", inventory), ("profile", player),
        ("leaderboard", leaderboard), ("match_result", post_match), ("matchmaking_join", mm_join),
        ("matchmaking_pop", mm_pop), ("files", files))}
    routes = [
        Route("/api/login", eps["login"], methods=["POST"]),
        Route("/api/players/me", eps["profile_me"]),
        Route("/api/players/me/matches", eps["history"]),
        Route("/api/players/me/inventory", eps["inventory"]),
        Route("/api/players/{player_id}", eps["profile"]),
        Route("/api/leaderboards/{season}", eps["leaderboard"]),
        Route("/api/matches", eps["match_result"], methods=["POST"]),
        Route("/api/matchmaking/join", eps["matchmaking_join"], methods=["POST"]),
        Route("/api/matchmaking/pop", eps["matchmaking_pop"], methods=["POST"]),
        Route("/api/files/{collection}/{record}/{name}", eps["files"]),
        Route("/health", health),
        Route("/metrics", metrics),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.game = svc
    # The journeys' hot paths, found by one dict lookup (see pbgame.dispatch), derived from the
    # routes above, which serve the rest.
    return Dispatch.for_routes(app, hot=set(eps.values()))
