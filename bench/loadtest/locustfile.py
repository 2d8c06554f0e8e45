"""The player journeys as Locust users: one against PocketBase's REST API, one against the game service.

Both do the same thing on the same data with the same mix (``LT_MIX``; by default mostly profile
and leaderboard reads, about one write in ten). Run by `bench/loadtest/run.py`, which writes the
seed file (``LT_SEED``): the players, the seasons, the PocketBase game-server token, and the
sessions of returning players.

Logins: bcrypt costs tens of milliseconds of CPU on either side, so a share of the players
(``LT_LOGIN_SHARE``) log in with their password when they arrive, spread over the ramp, and the
others are returning players whose 24 h session is still valid (PocketBase: the game server's
token; the service: a ``session:{token}`` made by the runner, as an earlier login would have).
Think time: ``LT_THINK`` "min,max" seconds; ``LT_RATE`` (requests/s per player) replaces it for
the capacity steps.
"""

from __future__ import annotations

import json
import os
import random

import gevent
from locust import between, task
from locust.contrib.fasthttp import FastHttpUser

SEED = json.loads(open(os.environ["LT_SEED"]).read()) if os.environ.get("LT_SEED") else {}  # noqa: SIM115
TARGET = os.environ.get("LT_TARGET", "service")  # "pocketbase" or "service"
LOGIN_SHARE = float(os.environ.get("LT_LOGIN_SHARE", "0.05"))
MIX = dict(
    (k, int(v)) for k, v in (part.split("=") for part in os.environ.get(
        "LT_MIX", "profile_me=3,profile_other=2,leaderboard=3,history=1,inventory=1,match_result=1").split(","))
)
THINK = tuple(float(x) for x in os.environ.get("LT_THINK", "20,40").split(","))
RATE = float(os.environ.get("LT_RATE", "0"))
# PocketBase's names for the journeys' roles (the runner puts the mapping's into the seed; the
# sample's are the default), so the reference answers a game of another shape too.
PB = SEED.get("pb") or {"coll": {}, "src": {}, "leaderboard": {
    "collection": "leaderboard", "season": "season", "sort": "rank", "fields": "user,rank,rating"},
    "profile_fields": "id,display_name,level,xp,country,avatar"}
PROFILE_FIELDS = PB["profile_fields"]


def C(role: str) -> str:
    """The PocketBase collection playing `role`."""
    return PB["coll"].get(role, role)


def F(role: str, name: str) -> str:
    """The PocketBase field playing field `name` of `role`."""
    return PB["src"].get(role, {}).get(name, name)


def fields(role: str, *names: str) -> str:
    return ",".join(F(role, n) for n in names)
RANKED = {season: set(ids) for season, ids in SEED.get("ranked", {}).items()}


def _wait():
    """Think time between two calls of one player.

    Capacity steps (``LT_RATE``): a uniform wait of mean 1/rate, so players stay independent.
    Locust's constant_throughput keeps every player on the schedule it started with, and players
    spawned within a second or two then call in lock-step: the server sees the step's whole
    second of requests as one burst, and the queue behind that burst (not the rate) set the
    p95 of the earlier runs."""
    if RATE > 0:
        return lambda user: random.uniform(0.0, 2.0 / RATE)
    return between(*THINK)


class Player(FastHttpUser):
    """A simulated player; subclasses say how each journey is asked for."""

    abstract = True
    wait_time = _wait()
    connection_timeout = 10.0
    network_timeout = 15.0

    def on_start(self) -> None:
        players = SEED["players"]
        self.me = random.choice(players)
        self.ip = f"10.{random.randrange(256)}.{random.randrange(256)}.{random.randrange(1, 255)}"
        # A season this player has stats in, and opponents who have too: PocketBase has no upsert, so
        # a match between players without stats would race to create the same (user, season) row.
        mine = [s for s, ids in SEED["ranked"].items() if self.me["id"] in RANKED[s]]
        self.season = random.choice(mine or SEED["seasons"])
        self.fresh_login = random.random() < LOGIN_SHARE
        self.login()
        if RATE > 0:  # a random phase: players spawned in the same second do not call in the same instant
            gevent.sleep(random.uniform(0.0, 1.0 / RATE))

    def other(self) -> str:
        return random.choice(SEED["players"])["id"]

    def match_body(self) -> dict:
        me, pool = self.me["id"], SEED["ranked"].get(self.season) or [p["id"] for p in SEED["players"]]
        other = random.choice(pool)
        while other == me:
            other = random.choice(pool)
        winner = random.choice((me, other))
        return {"season": self.season, "mode": "ranked", "map": "Old Quarter", "players": [me, other],
                "winner": winner, "scores": {me: round(random.uniform(0, 5000), 2),
                                             other: round(random.uniform(0, 5000), 2)}}


class PocketBasePlayer(Player):
    """The game today: PocketBase's REST API, reads as the game server (superuser rules)."""

    abstract = TARGET != "pocketbase"

    def login(self) -> None:
        self.auth = {"Authorization": SEED["pb_token"]}
        if self.fresh_login:
            self.client.post(f"/api/collections/{C('users')}/auth-with-password", name="login",
                             json={"identity": self.me["email"], "password": SEED["password"]})

    def _get(self, path: str, name: str, **params) -> None:
        self.client.get(path, params=params, headers=self.auth, name=name)

    @task(MIX.get("profile_me", 0))
    def profile_me(self) -> None:
        self._get(f"/api/collections/{C('users')}/records/{self.me['id']}", "profile_me", fields=PROFILE_FIELDS)

    @task(MIX.get("profile_other", 0))
    def profile_other(self) -> None:
        self._get(f"/api/collections/{C('users')}/records/{self.other()}", "profile_other", fields=PROFILE_FIELDS)

    @task(MIX.get("leaderboard", 0))
    def leaderboard(self) -> None:  # the sample's own leaderboard collection (indexed season, rank) if it has one
        lb = PB["leaderboard"]
        self._get(f"/api/collections/{lb['collection']}/records", "leaderboard",
                  filter=f"{lb['season']}='{self.season}'", sort=lb["sort"], perPage=10, skipTotal=1,
                  fields=lb["fields"])

    @task(MIX.get("history", 0))
    def history(self) -> None:
        p = "participants"
        self._get(f"/api/collections/{C(p)}/records", "history", filter=f"{F(p, 'user')}='{self.me['id']}'",
                  sort=f"-{F(p, 'created')},-id", perPage=20, skipTotal=1,
                  fields=fields(p, "id", "match", "team", "score", "placement", "created"))

    @task(MIX.get("inventory", 0))
    def inventory(self) -> None:
        i = "inventory"
        self._get(f"/api/collections/{C(i)}/records", "inventory", filter=f"{F(i, 'user')}='{self.me['id']}'",
                  sort="id", perPage=100, skipTotal=1,
                  fields=fields(i, "id", "item", "quantity", "equipped", "attributes", "acquired"))

    @task(MIX.get("match_result", 0))
    def match_result(self) -> None:
        """What the service's PocketBase side does: read the two stats rows, then one batch."""
        body = self.match_body()
        s, pa, m, u = "user_stats", "participants", "matches", "users"
        who = " || ".join(f"{F(s, 'user')}='{p}'" for p in body["players"])
        with self.client.get(f"/api/collections/{C(s)}/records", headers=self.auth, name="match_result_lookup",
                             params={"filter": f"{F(s, 'season')}='{self.season}' && ({who})",
                                     "fields": fields(s, "id", "user", "rating"), "skipTotal": 1},
                             catch_response=True) as resp:
            stats = {it[F(s, "user")]: it["id"] for it in resp.json()["items"]} if resp.status_code == 200 else {}
        game_id = "".join(random.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(15))
        reqs = [{"method": "POST", "url": f"/api/collections/{C(m)}/records", "body": {
            F(m, "id"): game_id, F(m, "season"): self.season, F(m, "mode"): "ranked", F(m, "status"): "finished",
            F(m, "map"): body["map"], F(m, "players"): body["players"], F(m, "winner"): body["winner"]}}]
        for i, pid in enumerate(body["players"]):
            won = pid == body["winner"]
            reqs.append({"method": "POST", "url": f"/api/collections/{C(pa)}/records", "body": {
                F(pa, "match"): game_id, F(pa, "user"): pid, F(pa, "team"): 1 + i, F(pa, "score"): body["scores"][pid],
                F(pa, "placement"): 1 + i}})
            if pid in stats:
                reqs.append({"method": "PATCH", "url": f"/api/collections/{C(s)}/records/{stats[pid]}", "body": {
                    F(s, "games_played") + "+": 1, F(s, "wins") + "+": int(won), F(s, "losses") + "+": int(not won),
                    F(s, "rating") + "+": 16 if won else -16}})
            else:
                reqs.append({"method": "POST", "url": f"/api/collections/{C(s)}/records", "body": {
                    F(s, "user"): pid, F(s, "season"): self.season, F(s, "games_played"): 1, F(s, "wins"): int(won),
                    F(s, "losses"): int(not won), F(s, "rating"): 1016 if won else 984}})
            reqs.append({"method": "PATCH", "url": f"/api/collections/{C(u)}/records/{pid}",
                         "body": {F(u, "xp") + "+": 10}})
        self.client.post("/api/batch", json={"requests": reqs}, headers=self.auth, name="match_result")


class ServicePlayer(Player):
    """The game on the service (the flag says which backend serves it)."""

    abstract = TARGET != "service"

    def login(self) -> None:
        self.auth = {"X-Forwarded-For": self.ip}
        token = SEED.get("sessions", {}).get(self.me["id"], "")
        if self.fresh_login or not token:
            with self.client.post("/api/login", name="login", headers=self.auth, catch_response=True,
                                  json={"email": self.me["email"], "password": SEED["password"]}) as resp:
                if resp.status_code == 200:  # a failed login is counted; the player goes on with the
                    token = resp.json()["token"]  # session it had, as the PocketBase player goes on
        self.auth = {"X-Forwarded-For": self.ip, "Authorization": f"Bearer {token}"}

    @task(MIX.get("profile_me", 0))
    def profile_me(self) -> None:
        self.client.get("/api/players/me", headers=self.auth, name="profile_me")

    @task(MIX.get("profile_other", 0))
    def profile_other(self) -> None:
        self.client.get(f"/api/players/{self.other()}", headers=self.auth, name="profile_other")

    @task(MIX.get("leaderboard", 0))
    def leaderboard(self) -> None:
        self.client.get(f"/api/leaderboards/{self.season}?limit=10", headers=self.auth, name="leaderboard")

    @task(MIX.get("history", 0))
    def history(self) -> None:
        self.client.get("/api/players/me/matches?limit=20", headers=self.auth, name="history")

    @task(MIX.get("inventory", 0))
    def inventory(self) -> None:
        self.client.get("/api/players/me/inventory?limit=100", headers=self.auth, name="inventory")

    @task(MIX.get("match_result", 0))
    def match_result(self) -> None:
        self.client.post("/api/matches", json=self.match_body(), headers=self.auth, name="match_result")
