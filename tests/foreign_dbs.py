"""PocketBase databases this project did not design, made by a real server through its API.

Why: the sample game and `game.yaml` were written together, so a feature that works on them may
work on nothing else. These games share no collection or field name with the sample: mixed-case
collections, SQL keywords as field names (`where`, `order`, `group`, `from`), a collection with no
`updated` (0.23+), a view, self relations (single and multi), a stats collection whose score is
`elo` and whose season is `ladder`, and no `leaderboard` collection at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pbdev.pbserver import PocketBaseServer

SUPERUSER = ("owner@example.com", "owner-pass-12345")
PASSWORD = "pilot-pass-1234"


@dataclass
class ForeignDB:
    pb_data: Path
    version: str
    counts: dict[str, int]  # collection -> records
    auth: str  # the auth collection players log in to
    password: str = PASSWORD


def _auth(gen22: bool, email: str, **extra: object) -> dict:
    body = {"email": email, "password": PASSWORD, "passwordConfirm": PASSWORD, "emailVisibility": True, **extra}
    if gen22:
        body["username"] = email.split("@")[0].replace(".", "_")
    return body


def build_racing(dest: Path, version: str = "0.40.6") -> ForeignDB:
    """A racing game (0.23+): Pilots (auth, mixed case), Tracks, races (self relation, entrants),
    standings (elo per ladder), lap_log (no timestamps), a view; 0.27+ adds a geoPoint."""
    pb_data = dest / "pb_data"
    with PocketBaseServer(pb_data, version=version) as pb:
        pb.create_superuser(*SUPERUSER)
        pb.session(*SUPERUSER)
        pb.create_collection({"name": "Pilots", "type": "auth", "fields": [
            {"name": "callsign", "type": "text", "required": True},
            {"name": "where", "type": "text"},
            {"name": "order", "type": "number", "onlyInt": True},
            {"name": "CamelCase", "type": "bool"},
        ]})
        pb.create_collection({"name": "Tracks", "fields": [
            {"name": "from", "type": "text", "required": True},
            {"name": "group", "type": "select", "values": ["club", "pro"]},
            {"name": "Length_km", "type": "number"},
            {"name": "pit", "type": "geoPoint"},
        ], "indexes": ["CREATE UNIQUE INDEX idx_tracks_from ON Tracks (`from`)"]})
        pb.create_collection({"name": "races", "fields": [
            {"name": "track", "type": "relation", "collection": "Tracks", "required": True},
            {"name": "entrants", "type": "relation", "collection": "Pilots", "maxSelect": 20},
            {"name": "rematch_of", "type": "relation", "collection": "races"},
            {"name": "status", "type": "select", "values": ["scheduled", "live", "finished"]},
            {"name": "state", "type": "json"},
        ]})
        pb.create_collection({"name": "standings", "fields": [
            {"name": "pilot", "type": "relation", "collection": "Pilots", "required": True,
             "cascadeDelete": True},
            {"name": "ladder", "type": "text", "required": True},
            {"name": "elo", "type": "number"},
            {"name": "wins", "type": "number", "onlyInt": True},
        ]})
        pb.create_collection({"name": "lap_log", "autodate": False, "fields": [
            {"name": "race", "type": "relation", "collection": "races", "required": True},
            {"name": "lap", "type": "number", "onlyInt": True},
            {"name": "seconds", "type": "number"},
        ]})
        pb.create_collection({"name": "fastest", "type": "view",
                              "viewQuery": "SELECT id, race, seconds FROM lap_log WHERE seconds < 90"})
        pilots = [pb.create_record("Pilots", _auth(False, f"pilot{i}@example.com", callsign=f"P-{i}",
                                                   where="grid" if i % 2 else "pits", order=i, CamelCase=i % 2 == 0))
                  ["id"] for i in range(6)]
        tracks = [pb.create_record("Tracks", {"from": name, "group": grp, "Length_km": km,
                                              "pit": {"lon": 7.4 + i, "lat": 43.7}})["id"]
                  for i, (name, grp, km) in enumerate([("Monaco", "pro", 3.337), ("Oulton", "club", 4.3)])]
        races = []
        for i in range(5):
            body = {"track": tracks[i % 2], "entrants": pilots[i:i + 3],
                    "status": ["scheduled", "live", "finished"][i % 3],
                    "state": {"lap": i, "leader": pilots[i]} if i % 3 == 1 else None}
            if races:
                body["rematch_of"] = races[-1]
            races.append(pb.create_record("races", body)["id"])
        for i, p in enumerate(pilots):
            for ladder in ("2026-S1", "2026-S2"):
                pb.create_record("standings", {"pilot": p, "ladder": ladder, "elo": 1200 + 37 * i, "wins": i})
        for i in range(12):
            pb.create_record("lap_log", {"race": races[i % 5], "lap": i, "seconds": 80 + i * 1.25})
        counts = {c: pb.total(c) for c in ("Pilots", "Tracks", "races", "standings", "lap_log")}
    return ForeignDB(pb_data, version, counts, "Pilots")


def build_farming(dest: Path, version: str = "0.22.27") -> ForeignDB:
    """A farming game (0.22: the `schema` generation): the stock `users`, Farms with a multi self
    relation and an `Order` field, crops, harvest_stats (score per season), a view."""
    pb_data = dest / "pb_data"
    with PocketBaseServer(pb_data, version=version) as pb:
        pb.create_superuser(*SUPERUSER)
        pb.session(*SUPERUSER)
        pb.create_collection({"name": "Farms", "fields": [
            {"name": "owner", "type": "relation", "collection": "users", "required": True},
            {"name": "title", "type": "text", "required": True},
            {"name": "Order", "type": "number"},
            {"name": "neighbours", "type": "relation", "collection": "Farms", "maxSelect": 5},
        ]})
        pb.create_collection({"name": "crops", "fields": [
            {"name": "farm", "type": "relation", "collection": "Farms", "required": True},
            {"name": "kind", "type": "select", "values": ["wheat", "corn", "rice"]},
            {"name": "planted", "type": "date"},
            {"name": "meta", "type": "json"},
            {"name": "from", "type": "text"},
        ]})
        pb.create_collection({"name": "harvest_stats", "fields": [
            {"name": "farmer", "type": "relation", "collection": "users", "required": True},
            {"name": "season", "type": "select", "values": ["spring", "summer", "autumn"]},
            {"name": "score", "type": "number"},
            {"name": "group", "type": "text"},
        ]})
        pb.create_collection({"name": "big_farms", "type": "view",
                              "viewQuery": "SELECT id, title FROM Farms WHERE `Order` > 2"})
        users = [pb.create_record("users", _auth(True, f"farmer{i}@example.com", name=f"Farmer {i}"))["id"]
                 for i in range(5)]
        farms: list[str] = []
        for i, u in enumerate(users):
            farms.append(pb.create_record("Farms", {"owner": u, "title": f"Farm {i} ✓", "Order": i,
                                                    "neighbours": farms[-2:]})["id"])
        for i in range(9):
            pb.create_record("crops", {"farm": farms[i % 5], "kind": ["wheat", "corn", "rice"][i % 3],
                                       "planted": f"2026-0{1 + i % 9}-0{1 + i % 7} 06:00:00.000Z",
                                       "meta": [i, {"k": None}] if i % 2 else 7, "from": "seed bank"})
        for i, u in enumerate(users):
            for season in ("spring", "summer"):
                pb.create_record("harvest_stats", {"farmer": u, "season": season, "score": 10.5 * i,
                                                   "group": "north"})
        counts = {c: pb.total(c) for c in ("users", "Farms", "crops", "harvest_stats")}
    return ForeignDB(pb_data, version, counts, "users")
