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
        # Queries as text, once: a Composed object is rendered again on every execute (its
        # identifiers re-quoted), which was 4-7 % of the service's CPU under load.
        async with self.pool.connection() as conn:
            await self._prepare_writes(conn)
            for name in ("q_profile", "q_board", "q_login", "q_history", "q_inventory", "q_match"):
                setattr(self, name, getattr(self, name).as_string(conn))

    async def _column_types(self, conn: psycopg.AsyncConnection, table: str) -> dict[str, str]:
        cur = await conn.execute(
            "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a JOIN pg_class c "
            "ON c.oid = a.attrelid JOIN pg_namespace s ON s.oid = c.relnamespace WHERE s.nspname = %s "
            "AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped", (self.schema, table))
        return dict(await cur.fetchall())

    async def _prepare_writes(self, conn: psycopg.AsyncConnection) -> None:
        """The match result as one statement (see `record_match`).

        Data-modifying CTEs: the game, its junction rows, a session per player, the stats upserted
        and the xp added run as one statement, so one round trip and one implicit transaction (the
        foreign keys are checked at its end, when the game row exists). The per-player values come
        as arrays cast to the columns' own types, so the mapping's types are the target's."""
        n = self.game.names
        m, p, s, u = "matches", "participants", "user_stats", "users"

        def arr(role: str, fieldname: str, types: dict[str, str]) -> sql.Composable:
            return sql.SQL("%s::{}[]").format(sql.SQL(types[n.col(role, fieldname)]))

        tp = await self._column_types(conn, n.table(p))
        ts = await self._column_types(conn, n.table(s))
        parts = [sql.SQL("m AS (INSERT INTO {} ({}, {}, {}, {}, {}, {}, {}, {}, {}, {}) "
                         "VALUES (%s, %s, %s, 'finished', %s, %s, now(), now(), now(), now()))").format(
            self._t(m), *(self._c(m, f) for f in ("id", "season", "mode", "status", "map", "winner",
                                                  "started", "ended", "created", "updated")))]
        junction = n.junctions.get("matches.players")
        self.has_junction = bool(junction)
        if junction:
            jt, owner, target = junction
            tj = await self._column_types(conn, jt)
            parts.append(sql.SQL("j AS (INSERT INTO {}.{} ({}, {}, position) SELECT %s, x.who, x.pos - 1 "
                                 "FROM unnest(%s::{}[]) WITH ORDINALITY AS x(who, pos))").format(
                sql.Identifier(self.schema), sql.Identifier(jt), sql.Identifier(owner), sql.Identifier(target),
                sql.SQL(tj[target])))
        parts.append(sql.SQL("p AS (INSERT INTO {} ({}, {}, {}, {}, {}, {}, {}, {}) "
                             "SELECT x.id, %s, x.who, x.team, x.score, x.placement, now(), now() "
                             "FROM unnest({}, {}, {}, {}, {}) AS x(id, who, team, score, placement))").format(
            self._t(p), *(self._c(p, f) for f in ("id", "match", "user", "team", "score", "placement",
                                                  "created", "updated")),
            *(arr(p, f, tp) for f in ("id", "user", "team", "score", "placement"))))
        su, ss = self._c(s, "user"), self._c(s, "season")
        gp, w, lo, r = (self._c(s, f) for f in ("games_played", "wins", "losses", "rating"))
        parts.append(sql.SQL(
            "s AS (INSERT INTO {t} ({id}, {su}, {ss}, {gp}, {w}, {lo}, {r}, {cr}, {up}) "
            "SELECT x.id, x.who, %s, 1, x.w, x.l, 1000 + x.d, now(), now() "
            "FROM unnest({ids}, {whos}, {ws}, {ls}, {ds}) AS x(id, who, w, l, d) "
            "ON CONFLICT ({su}, {ss}) DO UPDATE SET {gp} = {t}.{gp} + 1, {w} = {t}.{w} + EXCLUDED.{w}, "
            "{lo} = {t}.{lo} + EXCLUDED.{lo}, {r} = {t}.{r} + (EXCLUDED.{r} - 1000), {up} = now() "
            "RETURNING {su}, {r})"
        ).format(t=self._t(s), id=self._c(s, "id"), su=su, ss=ss, gp=gp, w=w, lo=lo, r=r,
                 cr=self._c(s, "created"), up=self._c(s, "updated"), ids=arr(s, "id", ts), whos=arr(s, "user", ts),
                 ws=arr(s, "wins", ts), ls=arr(s, "losses", ts), ds=arr(s, "rating", ts)))
        parts.append(sql.SQL("xp AS (UPDATE {} SET {} = {} + %s, {} = now() WHERE {} = ANY(%s))").format(
            self._t(u), self._c(u, "xp"), self._c(u, "xp"), self._c(u, "updated"), self._c(u, "id")))
        self.q_match = sql.SQL("WITH {} SELECT * FROM s").format(sql.SQL(", ").join(parts))

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
        # One statement: one round trip, its own transaction (see `_prepare_writes`). Players in
        # id order, so two results sharing players lock their stats rows in the same order.
        game_id = new_id()
        order = sorted(players, key=lambda x: -scores.get(x, 0.0))
        placement = {pid: i for i, pid in enumerate(order, start=1)}
        team = {pid: 1 + i % 2 for i, pid in enumerate(players)}
        ids = sorted(players)
        args: list[Any] = [game_id, season, mode, map_name, winner]
        if self.has_junction:
            args += [game_id, list(players)]
        args += [game_id, [new_id() for _ in ids], ids, [team[x] for x in ids],
                 [float(scores.get(x, 0.0)) for x in ids], [placement[x] for x in ids]]
        args += [season, [new_id() for _ in ids], ids, [int(x == winner) for x in ids],
                 [int(x != winner) for x in ids], [RATING_STEP if x == winner else -RATING_STEP for x in ids]]
        args += [XP_PER_GAME, ids]
        async with self.pool.connection() as conn:
            cur = await conn.execute(self.q_match, args)
            ratings = {str(who): float(rating) for who, rating in await cur.fetchall()}
        return game_id, ratings
