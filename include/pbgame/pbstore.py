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
from pbgame.schema import GameSchema

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
        r = await self._req("PATCH", "/api/settings", json={"batch": {"enabled": True, "maxRequests": 100,
                                                                      "timeout": 10}})
        r.raise_for_status()

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

    def _rename(self, collection: str, item: dict[str, Any], fields: Sequence[str]) -> dict[str, Any]:
        col = self.game.names.col
        return {col(collection, f): item.get(f) for f in fields}

    async def login(self, email: str, password: str) -> str | None:
        r = await self.client.post("/api/collections/users/auth-with-password",
                                   json={"identity": email, "password": password})
        if r.status_code in (400, 401, 403, 404):
            return None
        r.raise_for_status()
        return r.json()["record"]["id"]

    async def profile(self, player_id: str) -> dict[str, Any] | None:
        fields = self.game.profile_fields_pb
        r = await self._req("GET", f"/api/collections/users/records/{safe(player_id)}",
                            params={"fields": ",".join(("id", *fields))})
        if r.status_code == 404:
            return None
        r.raise_for_status()
        item = r.json()
        return {"id": item["id"], **{c: item.get(f) for f, c in zip(fields, self.game.profile.fields)
                                     if item.get(f) not in (None, "")}}  # as PostgreSQL: empty is NULL

    async def leaderboard(self, season: str, n: int) -> list[dict[str, Any]]:
        spec = self.game.leaderboard
        user, rating = (self.game.names.field_of("user_stats", c) for c in (spec.member, spec.score))
        items = await self._list("user_stats", filter=f"{spec.season}='{safe(season)}'", perPage=n,
                                 sort=f"-{rating},-{user}", fields=f"{user},{rating}")
        return [{spec.member: it[user], spec.score: float(it[rating])} for it in items]

    async def history(self, player_id: str, n: int) -> list[dict[str, Any]]:
        fields = ("id", "match", "team", "score", "placement", "created")
        items = await self._list("participants", filter=f"user='{safe(player_id)}'", perPage=n,
                                 sort="-created,-id", fields=",".join(fields))
        return [self._rename("participants", it, fields) for it in items]

    async def inventory(self, player_id: str, n: int) -> list[dict[str, Any]]:
        fields = ("id", "item", "quantity", "equipped", "attributes", "acquired")
        items = await self._list("inventory", filter=f"user='{safe(player_id)}'", perPage=n, sort="id",
                                 fields=",".join(fields))
        return [self._rename("inventory", it, fields) for it in items]

    async def record_match(self, season: str, mode: str, map_name: str, players: Sequence[str], winner: str,
                           scores: dict[str, float]) -> tuple[str, dict[str, float]]:
        """The same changes as `PgStore.record_match`, in one PocketBase batch (a transaction)."""
        who = " || ".join(f"user='{safe(p)}'" for p in players)
        stats = {it["user"]: it for it in await self._list("user_stats", filter=f"season='{safe(season)}' && ({who})",
                                                           perPage=len(players), fields="id,user,rating")}
        game_id, now = new_id(), pb_now()
        placement = {pid: i for i, pid in enumerate(sorted(players, key=lambda x: -scores.get(x, 0.0)), start=1)}
        reqs: list[dict[str, Any]] = [{"method": "POST", "url": "/api/collections/matches/records", "body": {
            "id": game_id, "season": season, "mode": mode, "status": "finished", "map": map_name,
            "players": list(players), "winner": winner, "started": now, "ended": now}}]
        ratings: dict[str, float] = {}
        for i, pid in enumerate(players):
            won = pid == winner
            delta = RATING_STEP if won else -RATING_STEP
            reqs.append({"method": "POST", "url": "/api/collections/participants/records", "body": {
                "match": game_id, "user": pid, "team": 1 + i % 2, "score": float(scores.get(pid, 0.0)),
                "placement": placement[pid]}})
            if pid in stats:
                ratings[pid] = float(stats[pid]["rating"]) + delta
                reqs.append({"method": "PATCH", "url": f"/api/collections/user_stats/records/{stats[pid]['id']}",
                             "body": {"games_played+": 1, "wins+": int(won), "losses+": int(not won),
                                      "rating+": delta}})
            else:
                ratings[pid] = 1000 + delta
                reqs.append({"method": "POST", "url": "/api/collections/user_stats/records", "body": {
                    "user": pid, "season": season, "games_played": 1, "wins": int(won), "losses": int(not won),
                    "rating": 1000 + delta}})
            reqs.append({"method": "PATCH", "url": f"/api/collections/users/records/{pid}",
                         "body": {"xp+": XP_PER_GAME}})
        r = await self._req("POST", "/api/batch", json={"requests": reqs})
        if r.status_code >= 400:
            raise RuntimeError(f"PocketBase batch failed with HTTP {r.status_code}")
        return game_id, ratings

    async def file(self, collection: str, record: str, name: str) -> httpx.Response:
        return await self._req("GET", f"/api/files/{safe(collection)}/{safe(record)}/{name}")
