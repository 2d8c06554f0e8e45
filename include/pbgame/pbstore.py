"""The journeys on PocketBase's REST API: what the game does today, forwarded by the service.

The service calls PocketBase as a trusted game server, with a superuser token (the sample's
collections keep PocketBase's default rules, superuser only); a player's password is checked by
PocketBase itself (``auth-with-password``). Answers are put in the shape `pbgame.pgstore` gives:
PostgreSQL column names from the mapping, PocketBase's own JSON values and date text.

Writes use PocketBase's batch API (0.23+, one transaction, enabled at start) and its ``field+``
number modifiers, so a match result is applied atomically on this side too.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import httpx

from pbgame.pgstore import RATING_STEP, XP_PER_GAME, new_id
from pbgame.schema import ROLES, GameSchema, ShapeError, missing, shape_error

SAFE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")  # ids and seasons go into PocketBase filters


def safe(value: str) -> str:
    if not SAFE.match(value):
        raise ValueError("bad identifier")
    return value


def pb_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


class PbStore:
    """An async client for one PocketBase; `start` signs in the superuser and enables batches."""

    def __init__(self, url: str, email: str, password: str, game: GameSchema, *, timeout: float = 10.0,
                 max_connections: int = 100) -> None:
        self.url = url.rstrip("/")
        self.game = game
        self._creds = {"identity": email, "password": password}
        self.client = httpx.AsyncClient(base_url=self.url, timeout=timeout,
                                        limits=httpx.Limits(max_connections=max_connections,
                                                            max_keepalive_connections=max_connections))
        self._token = ""

    async def start(self) -> None:
        await self._auth()
        await self.check_shape()
        r = await self._req("PATCH", "/api/settings", json={"batch": {"enabled": True, "maxRequests": 100,
                                                                      "timeout": 10}})
        r.raise_for_status()

    async def check_shape(self) -> None:
        """Every collection and field the journeys use exists in this PocketBase, or one line naming what does not."""
        n = self.game.names
        have: dict[str, set[str]] = {}
        page = 1
        while True:
            r = await self._req("GET", "/api/collections", params={"page": page, "perPage": 200})
            r.raise_for_status()
            body = r.json()
            for c in body["items"]:
                have[c["name"]] = {f["name"] for f in c.get("fields") or c.get("schema") or []} | {"id"}
                if "fields" not in c:  # 0.22: created/updated, and an auth collection's own fields, are implicit
                    have[c["name"]] |= {"created", "updated"} | (
                        {"email", "password", "tokenKey", "emailVisibility", "verified", "username"}
                        if c.get("type") == "auth" else set())
            if page >= body.get("totalPages", 1):
                break
            page += 1
        need: dict[str, list[str]] = {n.coll(role): [n.src(role, f) for f in frs] for role, frs in ROLES.items()}
        need[n.coll("users")] += [f for f in self.game.profile_fields_pb if f not in need[n.coll("users")]]
        gaps = missing(have, need)
        if gaps:
            raise ShapeError(shape_error(f"PocketBase {self.url}", gaps, self.game.mapping))

    async def close(self) -> None:
        await self.client.aclose()

    async def _auth(self) -> None:
        r = await self.client.post("/api/collections/_superusers/auth-with-password", json=self._creds)
        r.raise_for_status()
        self._token = r.json()["token"]

    async def _req(self, method: str, path: str, **kw: Any) -> httpx.Response:
        for attempt in (0, 1):
            r = await self.client.request(method, path, headers={"Authorization": self._token}, **kw)
            if r.status_code != 401 or attempt:
                return r
            await self._auth()  # the superuser token expired: sign in again, once
        return r

    async def _list(self, collection: str, **params: Any) -> list[dict[str, Any]]:
        r = await self._req("GET", f"/api/collections/{collection}/records", params={"skipTotal": 1, **params})
        r.raise_for_status()
        return r.json()["items"]

    def _rename(self, role: str, item: dict[str, Any], fields: Sequence[str]) -> dict[str, Any]:
        n = self.game.names
        return {n.col(role, f): item.get(n.src(role, f)) for f in fields}

    def _src(self, role: str, fields: Sequence[str]) -> str:
        return ",".join(self.game.names.src(role, f) for f in fields)

    async def login(self, email: str, password: str) -> str | None:
        r = await self.client.post(f"/api/collections/{self.game.names.coll('users')}/auth-with-password",
                                   json={"identity": email, "password": password})
        if r.status_code in (400, 401, 403, 404):
            return None
        r.raise_for_status()
        return r.json()["record"]["id"]

    async def profile(self, player_id: str) -> dict[str, Any] | None:
        fields = self.game.profile_fields_pb
        r = await self._req("GET", f"/api/collections/{self.game.names.coll('users')}/records/{safe(player_id)}",
                            params={"fields": ",".join(("id", *fields))})
        if r.status_code == 404:
            return None
        r.raise_for_status()
        item = r.json()
        return {"id": item["id"], **{c: item.get(f) for f, c in zip(fields, self.game.profile.fields)
                                     if item.get(f) not in (None, "")}}  # as PostgreSQL: empty is NULL

    async def leaderboard(self, season: str, n: int) -> list[dict[str, Any]]:
        spec, names = self.game.leaderboard, self.game.names
        user, rating, field = (names.field_of("user_stats", c) for c in (spec.member, spec.score, spec.season))
        items = await self._list(names.coll("user_stats"), filter=f"{field}='{safe(season)}'", perPage=n,
                                 sort=f"-{rating},-{user}", fields=f"{user},{rating}")
        return [{spec.member: it[user], spec.score: float(it[rating])} for it in items]

    async def history(self, player_id: str, n: int) -> list[dict[str, Any]]:
        fields, p, src = ("id", "match", "team", "score", "placement", "created"), "participants", self.game.names.src
        items = await self._list(self.game.names.coll(p), filter=f"{src(p, 'user')}='{safe(player_id)}'", perPage=n,
                                 sort=f"-{src(p, 'created')},-id", fields=self._src(p, fields))
        return [self._rename(p, it, fields) for it in items]

    async def inventory(self, player_id: str, n: int) -> list[dict[str, Any]]:
        fields, i = ("id", "item", "quantity", "equipped", "attributes", "acquired"), "inventory"
        src = self.game.names.src
        items = await self._list(self.game.names.coll(i), filter=f"{src(i, 'user')}='{safe(player_id)}'", perPage=n,
                                 sort="id", fields=self._src(i, fields))
        return [self._rename(i, it, fields) for it in items]

    async def record_match(self, season: str, mode: str, map_name: str, players: Sequence[str], winner: str,
                           scores: dict[str, float]) -> tuple[str, dict[str, float]]:
        """The same changes as `PgStore.record_match`, in one PocketBase batch (a transaction)."""
        n = self.game.names
        m, pa, st, us = (n.coll(r) for r in ("matches", "participants", "user_stats", "users"))

        def body(role: str, **values: Any) -> dict[str, Any]:  # field roles -> this PocketBase's fields
            return {n.src(role, k.rstrip("+")) + ("+" if k.endswith("+") else ""): v for k, v in values.items()}

        s_user, s_season, s_rating = (n.src("user_stats", f) for f in ("user", "season", "rating"))
        who = " || ".join(f"{s_user}='{safe(p)}'" for p in players)
        stats = {it[s_user]: it for it in await self._list(st, filter=f"{s_season}='{safe(season)}' && ({who})",
                                                           perPage=len(players), fields=f"id,{s_user},{s_rating}")}
        game_id, now = new_id(), pb_now()
        placement = {pid: i for i, pid in enumerate(sorted(players, key=lambda x: -scores.get(x, 0.0)), start=1)}
        reqs: list[dict[str, Any]] = [{"method": "POST", "url": f"/api/collections/{m}/records", "body": body(
            "matches", id=game_id, season=season, mode=mode, status="finished", map=map_name, players=list(players),
            winner=winner, started=now, ended=now)}]
        ratings: dict[str, float] = {}
        for i, pid in enumerate(players):
            won = pid == winner
            delta = RATING_STEP if won else -RATING_STEP
            reqs.append({"method": "POST", "url": f"/api/collections/{pa}/records", "body": body(
                "participants", match=game_id, user=pid, team=1 + i % 2, score=float(scores.get(pid, 0.0)),
                placement=placement[pid])})
            if pid in stats:
                ratings[pid] = float(stats[pid][s_rating]) + delta
                reqs.append({"method": "PATCH", "url": f"/api/collections/{st}/records/{stats[pid]['id']}",
                             "body": body("user_stats", **{"games_played+": 1, "wins+": int(won),
                                                           "losses+": int(not won), "rating+": delta})})
            else:
                ratings[pid] = 1000 + delta
                reqs.append({"method": "POST", "url": f"/api/collections/{st}/records", "body": body(
                    "user_stats", user=pid, season=season, games_played=1, wins=int(won), losses=int(not won),
                    rating=1000 + delta)})
            reqs.append({"method": "PATCH", "url": f"/api/collections/{us}/records/{pid}",
                         "body": body("users", **{"xp+": XP_PER_GAME})})
        r = await self._req("POST", "/api/batch", json={"requests": reqs})
        if r.status_code >= 400:
            raise RuntimeError(f"PocketBase batch failed with HTTP {r.status_code}")
        return game_id, ratings

    async def file(self, collection: str, record: str, name: str) -> httpx.Response:
        return await self._req("GET", f"/api/files/{safe(collection)}/{safe(record)}/{name}")
