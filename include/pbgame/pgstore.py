"""The journeys on PostgreSQL (psycopg's async pool): the new stack's side of every answer.

Answers have one shape on both backends (see `pbgame.pbstore`): PostgreSQL column names, JSON
values typed as PocketBase returns them, dates in PocketBase's ``YYYY-MM-DD HH:MM:SS.sssZ``.
Reads that the cache serves (profiles, leaderboards) return the raw rows the cache stores.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from pbgame.schema import GameSchema, ShapeError, missing, required_columns, shape_error
from pbmigrate.cache.keys import leaderboard_query, profile_mapping, profile_query
from pbmigrate.plan.ddl import staging_schema

T = TypeVar("T")

_ID = "abcdefghijklmnopqrstuvwxyz0123456789"
RATING_STEP = 16.0  # a win adds it, a loss takes it away
XP_PER_GAME = 10


def new_id() -> str:
    """A PocketBase-style record id (15 chars of [a-z0-9]), so both stores can hold it."""
    return "".join(secrets.choice(_ID) for _ in range(15))


def _date(col: str) -> sql.Composable:
    return sql.SQL("coalesce(to_char({} AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.MS\"Z\"'), '')").format(
        sql.Identifier(col))


def typed(value: str, pg_type: str | None) -> Any:
    """Cache text back to the JSON value PocketBase would return for the column."""
    if pg_type in ("bigint", "integer", "smallint"):
        return int(value)
    if pg_type in ("double precision", "real", "numeric"):
        return float(value)
    if pg_type == "boolean":
        return value == "true"
    return value


class PgStore:
    """Queries built from the mapping's names, run on a shared async pool.

    The schema served is the live one (``game``) if it exists, else its staging schema
    (``game_staging``, what the shadow period compares before the first cut-over). The cut-over
    renames staging to live in one transaction: a query that then finds no table re-resolves the
    schema and runs again, so the swap fails no request.
    """

    def __init__(self, pool: AsyncConnectionPool, schema: str, game: GameSchema) -> None:
        self.pool = pool
        self.live = schema
        self.schema = schema
        self.game = game
        self.profile_types: dict[str, str] = {}
        self._lock = asyncio.Lock()

    def _t(self, collection: str) -> sql.Composable:
        return sql.SQL("{}.{}").format(sql.Identifier(self.schema), sql.Identifier(self.game.names.table(collection)))

    def _c(self, collection: str, fieldname: str) -> sql.Identifier:
        return sql.Identifier(self.game.names.col(collection, fieldname))

    async def resolve(self) -> str:
        """Pick live or staging (see the class), then build the queries for it.

        All of it under the lock: a request that failed on the old schema waits here until the
        new queries exist, instead of finding the schema switched and retrying a stale query."""
        async with self._lock:
            async with self.pool.connection() as conn:
                cur = await conn.execute("SELECT nspname FROM pg_namespace WHERE nspname = ANY(%s)",
                                         ([self.live, staging_schema(self.live)],))
                found = {r[0] for r in await cur.fetchall()}
            schema = self.live if self.live in found or not found else staging_schema(self.live)
            if schema != self.schema or not self.profile_types:
                self.schema = schema
                await self.prepare()
            return self.schema

    async def _retry(self, fn: Callable[[], Awaitable[T]]) -> T:
        try:
            return await fn()
        except psycopg.errors.UndefinedTable:  # staging was just renamed to live, or back
            await self.resolve()
            return await fn()

    async def check_shape(self) -> None:
        """Every table and column the queries use exists in the served schema, or one line naming what does not."""
        need = required_columns(self.game)
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT c.relname, a.attname FROM pg_class c JOIN pg_namespace s ON s.oid = c.relnamespace "
                "JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped "
                "WHERE s.nspname = %s AND c.relname = ANY(%s)", (self.schema, list(need)))
            have: dict[str, set[str]] = {}
            for table, column in await cur.fetchall():
                have.setdefault(table, set()).add(column)
        gaps = missing(have, need)
        if gaps:
            raise ShapeError(shape_error(f"PostgreSQL schema {self.schema}", gaps, self.game.mapping))

    async def prepare(self) -> None:
        """Read the profile columns' types (the cache's text needs them) and build the queries."""
        n, spec = self.game.names, self.game.profile
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT a.attname, format_type(a.atttypid, NULL) FROM pg_attribute a JOIN pg_class c "
                "ON c.oid = a.attrelid JOIN pg_namespace s ON s.oid = c.relnamespace WHERE s.nspname = %s "
                "AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped", (self.schema, spec.table))
            self.profile_types = dict(await cur.fetchall())
        await self.check_shape()
        self.q_profile = profile_query(self.schema, spec, self.profile_types, one=True)
        self.q_board = leaderboard_query(self.schema, self.game.leaderboard, one_season=True)
        u = "users"
        self.q_login = sql.SQL("SELECT {}::text, {} FROM {} WHERE lower({}) = lower(%s) AND {} <> ''").format(
            self._c(u, "id"), self._c(u, "password"), self._t(u), self._c(u, "email"), self._c(u, "email"))
        p = "participants"
        self.q_history = sql.SQL(
            "SELECT {id} AS id, {match} AS game_id, {team} AS team, {score} AS score, {placement} AS placement, "
            "{created} AS created FROM {t} WHERE {user} = %s ORDER BY {cr} DESC, {id} COLLATE \"C\" DESC LIMIT %s"
        ).format(id=self._c(p, "id"), match=self._c(p, "match"), team=self._c(p, "team"),
                 score=self._c(p, "score"), placement=self._c(p, "placement"),
                 created=_date(n.col(p, "created")), cr=self._c(p, "created"), t=self._t(p), user=self._c(p, "user"))
        i = "inventory"
        self.q_inventory = sql.SQL(
            "SELECT {id} AS id, {item} AS item, {qty} AS quantity, {eq} AS equipped, {attrs} AS attributes, "
            "{acq} AS acquired FROM {t} WHERE {user} = %s ORDER BY {id} COLLATE \"C\" LIMIT %s"
        ).format(id=self._c(i, "id"), item=self._c(i, "item"), qty=self._c(i, "quantity"),
                 eq=self._c(i, "equipped"), attrs=self._c(i, "attributes"), acq=_date(n.col(i, "acquired")),
                 t=self._t(i), user=self._c(i, "user"))
        self._prepare_writes()
        # Queries as text, once: a Composed object is rendered again on every execute (its
        # identifiers re-quoted), which was 4-7 % of the service's CPU under load.
        async with self.pool.connection() as conn:
            for name in ("q_profile", "q_board", "q_login", "q_history", "q_inventory", "q_match", "q_junction",
                         "q_participant", "q_stats", "q_xp"):
                query = getattr(self, name)
                if query is not None:
                    setattr(self, name, query.as_string(conn))

    def _prepare_writes(self) -> None:
        """The match result's statements (see `record_match`)."""
        n = self.game.names
        m, p, s, u = "matches", "participants", "user_stats", "users"
        self.q_match = sql.SQL("INSERT INTO {} ({}, {}, {}, {}, {}, {}, {}, {}, {}, {}) "
                               "VALUES (%s, %s, %s, 'finished', %s, %s, now(), now(), now(), now())").format(
            self._t(m), *(self._c(m, f) for f in ("id", "season", "mode", "status", "map", "winner",
                                                  "started", "ended", "created", "updated")))
        junction = n.junctions.get("matches.players")
        self.q_junction = None
        if junction:
            jt, owner, target = junction
            self.q_junction = sql.SQL("INSERT INTO {}.{} ({}, {}, position) VALUES (%s, %s, %s)").format(
                sql.Identifier(self.schema), sql.Identifier(jt), sql.Identifier(owner), sql.Identifier(target))
        self.q_participant = sql.SQL("INSERT INTO {} ({}, {}, {}, {}, {}, {}, {}, {}) "
                                     "VALUES (%s, %s, %s, %s, %s, %s, now(), now())").format(
            self._t(p), *(self._c(p, f) for f in ("id", "match", "user", "team", "score", "placement",
                                                  "created", "updated")))
        su, ss = self._c(s, "user"), self._c(s, "season")
        gp, w, lo, r = (self._c(s, f) for f in ("games_played", "wins", "losses", "rating"))
        self.q_stats = sql.SQL(
            "INSERT INTO {t} ({id}, {su}, {ss}, {gp}, {w}, {lo}, {r}, {cr}, {up}) "
            "VALUES (%s, %s, %s, 1, %s, %s, 1000 + %s, now(), now()) "
            "ON CONFLICT ({su}, {ss}) DO UPDATE SET {gp} = {t}.{gp} + 1, {w} = {t}.{w} + EXCLUDED.{w}, "
            "{lo} = {t}.{lo} + EXCLUDED.{lo}, {r} = {t}.{r} + %s, {up} = now() RETURNING {su}, {r}"
        ).format(t=self._t(s), id=self._c(s, "id"), su=su, ss=ss, gp=gp, w=w, lo=lo, r=r,
                 cr=self._c(s, "created"), up=self._c(s, "updated"))
        self.q_xp = sql.SQL("UPDATE {} SET {} = {} + %s, {} = now() WHERE {} = ANY(%s)").format(
            self._t(u), self._c(u, "xp"), self._c(u, "xp"), self._c(u, "updated"), self._c(u, "id"))

    def typed_profile(self, player_id: str, row: dict[str, str]) -> dict[str, Any]:
        return {"id": player_id, **{k: typed(v, self.profile_types.get(k)) for k, v in row.items() if v != ""}}

    async def login_row(self, email: str) -> tuple[str, str] | None:
        return await self._retry(lambda: self._login_row(email))

    async def _login_row(self, email: str) -> tuple[str, str] | None:
        async with self.pool.connection() as conn:
            cur = await conn.execute(self.q_login, (email,))
            row = await cur.fetchone()
        return None if row is None else (row[0], row[1] or "")

    async def profile_row(self, player_id: str) -> dict[str, str] | None:
        return await self._retry(lambda: self._profile_row(player_id))

    async def _profile_row(self, player_id: str) -> dict[str, str] | None:
        async with self.pool.connection() as conn:
            cur = await conn.execute(self.q_profile, (player_id,))
            row = await cur.fetchone()
        return None if row is None else profile_mapping(self.game.profile, row)

    async def board(self, season: str) -> list[tuple[str, float]]:
        return await self._retry(lambda: self._board(season))

    async def _board(self, season: str) -> list[tuple[str, float]]:
        async with self.pool.connection() as conn:
            cur = await conn.execute(self.q_board, (season,))
            return [(m, v) for _, m, v in await cur.fetchall()]

    async def _rows(self, query: sql.Composable, args: tuple) -> list[dict[str, Any]]:
        async with self.pool.connection() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(query, args)
            return list(await cur.fetchall())

    async def history(self, player_id: str, limit: int) -> list[dict[str, Any]]:
        return await self._retry(lambda: self._rows(self.q_history, (player_id, limit)))

    async def inventory(self, player_id: str, limit: int) -> list[dict[str, Any]]:
        return await self._retry(lambda: self._rows(self.q_inventory, (player_id, limit)))

    async def record_match(self, season: str, mode: str, map_name: str, players: Sequence[str], winner: str,
                           scores: dict[str, float]) -> tuple[str, dict[str, float]]:
        """The game, its sessions, the players' stats and xp in one transaction; new ratings back."""
        return await self._retry(lambda: self._record_match(season, mode, map_name, players, winner, scores))

    async def _record_match(self, season: str, mode: str, map_name: str, players: Sequence[str], winner: str,
                            scores: dict[str, float]) -> tuple[str, dict[str, float]]:
        # One transaction; each executemany is pipelined (one round trip for all its rows).
        game_id = new_id()
        placement = {pid: i for i, pid in enumerate(sorted(players, key=lambda x: -scores.get(x, 0.0)), start=1)}
        ratings: dict[str, float] = {}
        async with self.pool.connection() as conn, conn.transaction():
            await conn.execute(self.q_match, (game_id, season, mode, map_name, winner))
            async with conn.cursor() as cur:
                if self.q_junction:
                    await cur.executemany(self.q_junction, [(game_id, pid, i) for i, pid in enumerate(players)])
                await cur.executemany(self.q_participant, [
                    (new_id(), game_id, pid, 1 + i % 2, float(scores.get(pid, 0.0)), placement[pid])
                    for i, pid in enumerate(players)])
                deltas = [RATING_STEP if pid == winner else -RATING_STEP for pid in players]
                await cur.executemany(self.q_stats, [
                    (new_id(), pid, season, int(pid == winner), int(pid != winner), d, d)
                    for pid, d in zip(players, deltas)], returning=True)
                while True:
                    for player, rating in await cur.fetchall():
                        ratings[player] = float(rating)
                    if not cur.nextset():
                        break
            await conn.execute(self.q_xp, (XP_PER_GAME, list(players)))
        return game_id, ratings
