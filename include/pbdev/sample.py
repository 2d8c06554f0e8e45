"""The sample game database: the user's multiplayer game (MISSION.md) in a real PocketBase.

Why this shape: the schema is created through a real server's API (so `_collections` is exactly
what PocketBase writes), ~20 players are created through the API (so their bcrypt hashes are
real), and the bulk of the rows is inserted with sqlite3 while the server is stopped, in
PocketBase's exact storage formats (POCKETBASE.md §0.1): 15-char [a-z0-9] ids, UTC
`YYYY-MM-DD HH:MM:SS.sssZ` dates, JSON arrays as text, bools 0/1. The server is then started
again and must serve every collection back with the right totals, or the build fails.

`dirty=True` plants a few bad values (listed in the result) for the assessment and reject tests.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sqlite3
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pbdev.pbserver import PBSession, PocketBaseServer, check

SUPERUSER = {"email": "admin@example.com", "password": "admin-pass-123"}
PLAYER_PASSWORD = "player-pass-123"  # every player, API-made or bulk, logs in with it
API_USERS = 20
SEASONS = ("2026-s1", "2026-s2", "2026-s3", "2026-s4")
COUNTRIES = ("VN", "US", "DE", "JP", "BR", "KR", "FR", "GB", "IN", "CA")
MODES = ("ranked", "casual", "tournament")
STATUSES = ("waiting", "in_progress", "finished", "abandoned")
ACHIEVEMENT_TAGS = ("combat", "social", "explore", "collect", "skill")
MAPS = ("Ha Long Bay", "Old Quarter", "Neon Docks", "Frostpeak", "Sunken Temple", "Dust Bowl",
        "Sky Garden", "Iron Foundry")
ITEMS = ("sword", "shield", "bow", "staff", "potion_hp", "potion_mp", "helmet", "boots",
         "ring_of_haste", "amulet", "dragon_scale", "lucky_coin", "map_fragment", "skin_neon",
         "skin_lotus", "emote_wave")
RARITIES = ("common", "uncommon", "rare", "epic", "legendary")
ENCHANTS = ("fire", "ice", "void")
ACHIEVEMENTS = tuple(f"{verb}_{n}" for verb in ("win", "play", "collect", "explore", "befriend",
                                                 "craft") for n in (1, 5, 10, 25, 50, 100, 250, 500))
FIRST = ("Nguyễn", "Trần", "Lê", "Phạm", "Hoàng", "Anna", "Lukas", "Søren", "José", "Zoë",
         "Yuki", "Min-jun", "Priya", "Chloé", "Łukasz", "O'Brien", "Ama", "Noah", "山田", "김")
LAST = ("An", "Bình", "Châu", "Dũng", "Smith", "Müller", "Silva", "Kim", "Sato", "Dubois",
        "Patel", "Tremblay", "Nowak", "Rossi", "Garcia", "太郎")

# Collection -> share of the total rows (participants come out of the matches' player lists).
SHARES = {"users": 0.05, "matches": 0.10, "participants": 0.35, "leaderboard": 0.05,
          "inventory": 0.20, "achievements": 0.15, "user_stats": 0.10}
COLLECTIONS = tuple(SHARES)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
SPAN_MS = 180 * 86_400_000  # records created over the first half of 2026
_ID = "abcdefghijklmnopqrstuvwxyz0123456789"
_TOKEN = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
# Random bytes -> alphabet in one bytes.translate (a 2M-row build makes ~2M ids and 100k tokens).
_ID_TABLE = bytes(ord(_ID[b % len(_ID)]) for b in range(256))
_TOKEN_TABLE = bytes(ord(_TOKEN[b % len(_TOKEN)]) for b in range(256))
_DAYS = [(T0 + timedelta(days=d)).strftime("%Y-%m-%d ") for d in range(400)]
_SECONDS = [f"{h:02d}:{m:02d}:{s:02d}." for h in range(24) for m in range(60) for s in range(60)]
_MILLIS = [f"{ms:03d}Z" for ms in range(1000)]
_T0_MS = int(T0.timestamp() * 1000)


def user_fields() -> list[dict]:
    """Fields added to the built-in `users` auth collection (neutral pbserver spec)."""
    return [
        {"name": "display_name", "type": "text", "required": True, "max": 100},
        {"name": "level", "type": "number", "onlyInt": True, "min": 0},
        {"name": "xp", "type": "number", "onlyInt": True, "min": 0},
        {"name": "country", "type": "select", "values": list(COUNTRIES)},
    ]


def collection_specs() -> list[dict]:
    """The game's own collections in creation order (neutral pbserver specs)."""
    def user(required: bool = True, cascade: bool = True) -> dict:
        return {"name": "user", "type": "relation", "collection": "users", "required": required,
                "cascadeDelete": cascade}

    return [
        {"name": "matches", "fields": [
            {"name": "season", "type": "text", "required": True},
            {"name": "mode", "type": "select", "values": list(MODES)},
            {"name": "status", "type": "select", "values": list(STATUSES)},
            {"name": "map", "type": "text"},
            {"name": "players", "type": "relation", "collection": "users", "maxSelect": 10},
            {"name": "winner", "type": "relation", "collection": "users"},
            {"name": "started", "type": "date"},
            {"name": "ended", "type": "date"},
            {"name": "state", "type": "json"},
        ], "indexes": ["CREATE INDEX idx_matches_status ON matches (status)",
                       "CREATE INDEX idx_matches_season ON matches (season)"]},
        {"name": "participants", "fields": [
            {"name": "match", "type": "relation", "collection": "matches", "required": True,
             "cascadeDelete": True},
            user(cascade=False),
            {"name": "team", "type": "number", "onlyInt": True},
            {"name": "score", "type": "number"},
            {"name": "placement", "type": "number", "onlyInt": True},
        ], "indexes": ["CREATE UNIQUE INDEX idx_participants_match_user ON participants (`match`, `user`)",
                       "CREATE INDEX idx_participants_user ON participants (`user`)"]},
        {"name": "leaderboard", "fields": [
            {"name": "season", "type": "text"},
            user(required=False, cascade=False),
            {"name": "rank", "type": "number", "onlyInt": True},
            {"name": "rating", "type": "number"},
        ], "indexes": ["CREATE INDEX idx_leaderboard_season_rank ON leaderboard (season, `rank`)"]},
        {"name": "inventory", "fields": [
            user(),
            {"name": "item", "type": "text", "required": True},
            {"name": "quantity", "type": "number", "onlyInt": True},
            {"name": "equipped", "type": "bool"},
            {"name": "attributes", "type": "json"},
            {"name": "acquired", "type": "date"},
        ], "indexes": ["CREATE INDEX idx_inventory_user ON inventory (`user`)"]},
        {"name": "achievements", "fields": [
            user(),
            {"name": "code", "type": "text", "required": True},
            {"name": "unlocked", "type": "date"},
            {"name": "progress", "type": "number"},
            {"name": "tags", "type": "select", "values": list(ACHIEVEMENT_TAGS), "maxSelect": 5},
        ], "indexes": ["CREATE UNIQUE INDEX idx_achievements_user_code ON achievements (`user`, code)"]},
        {"name": "user_stats", "fields": [
            user(),
            {"name": "season", "type": "text", "required": True},
            {"name": "games_played", "type": "number", "onlyInt": True},
            {"name": "wins", "type": "number", "onlyInt": True},
            {"name": "losses", "type": "number", "onlyInt": True},
            {"name": "rating", "type": "number"},
        ], "indexes": ["CREATE UNIQUE INDEX idx_user_stats_user_season ON user_stats (`user`, season)"]},
    ]


def plan_counts(rows: int, api_users: int = API_USERS) -> dict[str, int]:
    """Target rows per collection for a total of about `rows` (never fewer than the API users)."""
    counts = {name: int(rows * share) for name, share in SHARES.items()}
    counts["users"] = max(counts["users"], api_users, 1)
    counts["matches"] = max(counts["matches"], 4)
    # unique (user, season) and top-N per season need enough players
    counts["user_stats"] = min(counts["user_stats"], counts["users"] * len(SEASONS))
    counts["leaderboard"] = min(counts["leaderboard"], counts["user_stats"])
    counts["achievements"] = min(counts["achievements"], counts["users"] * len(ACHIEVEMENTS))
    return counts


def pb_date(ms: int) -> str:
    """Epoch milliseconds -> PocketBase's `YYYY-MM-DD HH:MM:SS.sssZ` (table lookups, no datetime)."""
    day, rem = divmod(ms - _T0_MS, 86_400_000)
    sec, milli = divmod(rem, 1000)
    return _DAYS[day] + _SECONDS[sec] + _MILLIS[milli]


# Every ordered subset of up to 3 achievement tags, as PocketBase stores a multi select.
_TAG_SETS = [
    json.dumps([t for b, t in enumerate(ACHIEVEMENT_TAGS) if mask >> b & 1], separators=(",", ":"))
    for mask in range(1 << len(ACHIEVEMENT_TAGS)) if mask.bit_count() <= 3
]


def _id_array(ids: Iterable[str]) -> str:
    """A JSON array of record ids as PocketBase stores it (ids need no escaping)."""
    return '["' + '","'.join(ids) + '"]' if ids else "[]"


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


class _Gen:
    """Deterministic (per seed) generators of PocketBase-shaped values."""

    def __init__(self, seed: int, taken: Iterable[str] = ()):
        self.rng = random.Random(seed)
        self.seen: set[str] = set(taken)

    def new_id(self) -> str:
        while True:
            rid = self.rng.randbytes(15).translate(_ID_TABLE).decode()
            if rid not in self.seen:
                self.seen.add(rid)
                return rid

    def ids(self, n: int) -> list[str]:
        return [self.new_id() for _ in range(n)]

    def token(self) -> str:
        return self.rng.randbytes(50).translate(_TOKEN_TABLE).decode()

    def below(self, n: int) -> int:
        """A random int in [0, n): random() is 5x faster than randrange, bias is irrelevant here."""
        return int(self.rng.random() * n)

    def distinct(self, n: int, k: int) -> list[int]:
        """k distinct ints in [0, n), in random order (k is small: a match's players)."""
        k = min(k, n)
        out: list[int] = []
        while len(out) < k:
            i = int(self.rng.random() * n)
            if i not in out:
                out.append(i)
        return out

    def pick(self, seq: Sequence[Any]) -> Any:
        return seq[int(self.rng.random() * len(seq))]

    def created_updated(self) -> tuple[str, str, int]:
        created = _T0_MS + self.below(SPAN_MS)
        if self.rng.random() < 0.4:
            return pb_date(created), pb_date(created + self.below(30 * 86_400_000)), created
        stamp = pb_date(created)
        return stamp, stamp, created


def _api_users(pb: PocketBaseServer, session: PBSession, n: int) -> list[dict]:
    """Create the first players through the API (real bcrypt hashes, two with avatars)."""
    png = bytes.fromhex("89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c489"
                        "0000000d49444154789c6360f8cfc0f01f0005000201e2263ca30000000049454e44ae426082")

    def make(i: int) -> dict:
        body = {"email": f"player{i}@example.com", "password": PLAYER_PASSWORD,
                "passwordConfirm": PLAYER_PASSWORD, "display_name": f"{FIRST[i % len(FIRST)]} {i}",
                "level": 1 + i, "xp": 100 * i, "country": COUNTRIES[i % len(COUNTRIES)],
                "emailVisibility": i % 2 == 0, "verified": i % 3 != 0}
        if pb.generation == 22:
            body["username"] = f"player{i:07d}"
        url = "/api/collections/users/records"
        if i < 2:
            form = {k: (None, str(v).lower() if isinstance(v, bool) else str(v)) for k, v in body.items()}
            form["avatar"] = (f"avatar {i}.png", png, "image/png")
            return check(session.post(url, files=form))
        return check(session.post(url, json=body))

    with ThreadPoolExecutor(max_workers=4) as pool:  # bcrypt on the server is the slow part
        return list(pool.map(make, range(n)))


def _insert(conn: sqlite3.Connection, table: str, columns: Sequence[str], rows: Iterable[tuple]) -> int:
    cols = ", ".join(f'"{c}"' for c in columns)
    marks = ", ".join("?" for _ in columns)
    before = conn.total_changes
    conn.executemany(f'INSERT INTO "{table}" ({cols}) VALUES ({marks})', rows)
    return conn.total_changes - before


def _bulk(conn: sqlite3.Connection, gen: _Gen, counts: dict[str, int], generation: int
          ) -> dict[str, list[str]]:
    """Insert every bulk row in one transaction; returns the ids of every collection."""
    rng = gen.rng
    pw_col = "passwordHash" if generation == 22 else "password"
    api_rows = conn.execute(f'SELECT id, "{pw_col}" FROM users ORDER BY rowid').fetchall()
    hashes = [h for _, h in api_rows]
    gen.seen.update(rid for rid, _ in api_rows)
    user_ids = [rid for rid, _ in api_rows] + gen.ids(counts["users"] - len(api_rows))
    n_users = len(user_ids)
    first = len(api_rows)

    def users() -> Iterator[tuple]:
        for i in range(first, n_users):
            created, updated, _ = gen.created_updated()
            name = f"{gen.pick(FIRST)} {gen.pick(LAST)}"
            level = 1 + gen.below(100)
            row = (user_ids[i], f"player{i}@example.com", int(rng.random() < 0.3),
                   int(rng.random() < 0.8), gen.token(), hashes[i % len(hashes)], name, "",
                   level, level * 1000 + gen.below(1000), gen.pick(COUNTRIES), "",
                   created, updated)
            yield (*row, f"player{i:07d}") if generation == 22 else row

    ucols = ["id", "email", "emailVisibility", "verified", "tokenKey", pw_col, "display_name",
             "name", "level", "xp", "country", "avatar", "created", "updated"]
    if generation == 22:
        ucols.append("username")
    _insert(conn, "users", ucols, users())

    match_ids = gen.ids(counts["matches"])
    in_progress = set(rng.sample(range(len(match_ids)), min(max(3, len(match_ids) // 100), 1000,
                                                           len(match_ids))))
    lineups: list[tuple[list[int], int, bool]] = []  # players, created ms, has placements
    extra_players = counts["participants"] / max(1, len(match_ids)) - 2  # beyond the minimum 2

    def matches() -> Iterator[tuple]:
        for m, mid in enumerate(match_ids):
            extra = round(rng.expovariate(1 / extra_players)) if extra_players > 0.05 else 0
            k = min(10, n_users, 2 + extra)
            players = gen.distinct(n_users, k)
            created, updated, created_ms = gen.created_updated()
            if m in in_progress:
                status = "in_progress"
            else:
                status = rng.choices(("waiting", "finished", "abandoned"), (2, 90, 8))[0]
            lineups.append((players, created_ms, status in ("finished", "abandoned")))
            started = pb_date(created_ms + 60_000) if status != "waiting" else ""
            ended = pb_date(created_ms + 300_000 + gen.below(3_300_000)) \
                if status in ("finished", "abandoned") else ""
            winner = user_ids[players[0]] if status == "finished" else ""
            state = None
            if status == "in_progress":
                state = _compact({
                    "round": 1 + gen.below(12), "turn": user_ids[rng.choice(players)],
                    "scores": {user_ids[p]: gen.below(5001) for p in players},
                    "zone": {"x": round(rng.uniform(-50, 50), 2), "y": round(rng.uniform(-50, 50), 2),
                             "radius": 5 + gen.below(96)},
                })
            yield (mid, gen.pick(SEASONS), gen.pick(MODES), status, gen.pick(MAPS),
                   _id_array([user_ids[p] for p in players]), winner, started, ended, state,
                   created, updated)

    _insert(conn, "matches", ["id", "season", "mode", "status", "map", "players", "winner",
                              "started", "ended", "state", "created", "updated"], matches())

    participant_ids: list[str] = []

    def participants() -> Iterator[tuple]:
        for m, (players, match_ms, placed) in enumerate(lineups):
            created = pb_date(match_ms + gen.below(60_000))
            updated = pb_date(match_ms + 300_000 + gen.below(3_300_000)) if placed else created
            for place, p in enumerate(players, start=1):
                pid = gen.new_id()
                participant_ids.append(pid)
                score = round(rng.uniform(0, 5000), 2) if placed else 0
                yield (pid, match_ids[m], user_ids[p], 1 + place % 2, score, place if placed else 0,
                       created, updated)

    _insert(conn, "participants", ["id", "match", "user", "team", "score", "placement", "created",
                                   "updated"], participants())

    stats_ids: list[str] = []
    ratings: dict[str, list[tuple[float, int]]] = {s: [] for s in SEASONS}

    def user_stats() -> Iterator[tuple]:
        pairs = rng.sample(range(n_users * len(SEASONS)), counts["user_stats"])
        for pair in pairs:
            u, s = divmod(pair, len(SEASONS))
            games = gen.below(301)
            wins = gen.below(games + 1)
            losses = gen.below(games - wins + 1)
            rating = round(1000 + rng.gauss(200, 250), 1)
            ratings[SEASONS[s]].append((rating, u))
            created, updated, _ = gen.created_updated()
            sid = gen.new_id()
            stats_ids.append(sid)
            yield (sid, user_ids[u], SEASONS[s], games, wins, losses, rating, created, updated)

    _insert(conn, "user_stats", ["id", "user", "season", "games_played", "wins", "losses", "rating",
                                 "created", "updated"], user_stats())

    board_ids: list[str] = []

    def leaderboard() -> Iterator[tuple]:
        per_season = -(-counts["leaderboard"] // len(SEASONS))
        left = counts["leaderboard"]
        for season in SEASONS:
            top = sorted(ratings[season], key=lambda r: (-r[0], user_ids[r[1]]))
            for rank, (rating, u) in enumerate(top[:min(per_season, left)], start=1):
                created, updated, _ = gen.created_updated()
                lid = gen.new_id()
                board_ids.append(lid)
                yield (lid, season, user_ids[u], rank, rating, created, updated)
            left -= min(per_season, len(top), left)

    _insert(conn, "leaderboard", ["id", "season", "user", "rank", "rating", "created", "updated"],
            leaderboard())

    inventory_ids = gen.ids(counts["inventory"])

    def inventory() -> Iterator[tuple]:
        for iid in inventory_ids:
            created, updated, created_ms = gen.created_updated()
            attrs = f'{{"rarity":"{gen.pick(RARITIES)}","power":{1 + gen.below(999)}'
            if rng.random() < 0.3:
                attrs += f',"enchant":{{"name":"{gen.pick(ENCHANTS)}","level":{1 + gen.below(5)}}}'
            yield (iid, user_ids[gen.below(n_users)], gen.pick(ITEMS), 1 + gen.below(99),
                   int(rng.random() < 0.2), attrs + "}", pb_date(created_ms), created, updated)

    _insert(conn, "inventory", ["id", "user", "item", "quantity", "equipped", "attributes",
                                "acquired", "created", "updated"], inventory())

    achievement_ids: list[str] = []

    def achievements() -> Iterator[tuple]:
        pairs = rng.sample(range(n_users * len(ACHIEVEMENTS)), counts["achievements"])
        for pair in pairs:
            u, a = divmod(pair, len(ACHIEVEMENTS))
            created, updated, created_ms = gen.created_updated()
            progress = 1.0 if rng.random() < 0.6 else round(rng.random(), 3)
            tags = gen.pick(_TAG_SETS)
            aid = gen.new_id()
            achievement_ids.append(aid)
            yield (aid, user_ids[u], ACHIEVEMENTS[a], pb_date(created_ms) if progress >= 1 else "",
                   progress, tags, created, updated)

    _insert(conn, "achievements", ["id", "user", "code", "unlocked", "progress", "tags", "created",
                                   "updated"], achievements())
    return {"users": user_ids, "matches": match_ids, "participants": participant_ids,
            "leaderboard": board_ids, "inventory": inventory_ids, "achievements": achievement_ids,
            "user_stats": stats_ids}


def _dirty(conn: sqlite3.Connection, gen: _Gen, ids: dict[str, list[str]]) -> list[dict]:
    """Plant one bad value of each kind in the *last* bulk rows (the API lists rows first to last)."""
    dangling = gen.new_id()  # a well-formed id that no record has
    planted = [
        ("participants", ids["participants"][-1], "user", "dangling relation",
         "UPDATE participants SET user = ? WHERE id = ?", (dangling,)),
        ("matches", ids["matches"][-1], "players", "dangling relation (multi)",
         "UPDATE matches SET players = json_insert(players, '$[#]', ?) WHERE id = ?", (dangling,)),
        ("matches", ids["matches"][-2], "started", "malformed date",
         "UPDATE matches SET started = ? WHERE id = ?", ("2026-02-30 25:61:00",)),
        ("users", ids["users"][-1], "display_name", "NUL byte in text",
         "UPDATE users SET display_name = ? WHERE id = ?", ("Bad\x00Name",)),
        ("users", ids["users"][-2], "level", "fraction in an onlyInt number",
         "UPDATE users SET level = ? WHERE id = ?", (7.5,)),
        ("inventory", ids["inventory"][-1], "attributes", "invalid JSON",
         "UPDATE inventory SET attributes = ? WHERE id = ?", ('{"rarity": "epic", ',)),
    ]
    out = []
    for collection, rid, fieldname, problem, sql, args in planted:
        conn.execute(sql, (*args, rid))
        out.append({"collection": collection, "id": rid, "field": fieldname, "problem": problem})
    return out


def build_sample(dest_dir: Path, rows: int = 20_000, version: str | None = None, seed: int = 7,
                 dirty: bool = False, api_users: int = API_USERS) -> dict:
    """Build `<dest_dir>/pb_data`, the user's game in PocketBase `version` (None = the venv's).

    Returns counts per collection (as the restarted server reports them), the superuser and
    player passwords, the pb_data path, timings, and (dirty) the planted bad values.
    `api_users` players are made through the API (bcrypt is slow: 0.22 hashes at cost 12);
    every bulk player reuses one of their hashes, so all log in with PLAYER_PASSWORD.
    """
    if api_users < 1:
        raise ValueError("api_users must be at least 1: bulk players reuse their bcrypt hashes")
    started = time.monotonic()
    dest = Path(dest_dir)
    pb_data = dest / "pb_data"
    if pb_data.exists():
        if any(pb_data.iterdir()) and not (pb_data / "data.db").exists():
            raise FileExistsError(f"{pb_data} exists and is not a PocketBase data folder")
        shutil.rmtree(pb_data)
    counts = plan_counts(rows, api_users)
    gen = _Gen(seed)
    timings: dict[str, float] = {}
    with PocketBaseServer(pb_data, version=version) as pb:
        pb.create_superuser(SUPERUSER["email"], SUPERUSER["password"])
        session = pb.session(SUPERUSER["email"], SUPERUSER["password"])
        pb.update_collection("users", user_fields())
        for spec in collection_specs():
            pb.create_collection(spec)
        _api_users(pb, session, api_users)
        timings["api"] = time.monotonic() - started
        pb.stop()

        t = time.monotonic()
        conn = sqlite3.connect(pb_data / "data.db", isolation_level=None)
        try:
            # A throw-away build: no fsync, an in-memory journal (a WAL would hold every page
            # twice), a big page cache for the random-order id and unique indexes.
            conn.execute("PRAGMA synchronous = OFF")
            conn.execute("PRAGMA journal_mode = MEMORY")
            conn.execute("PRAGMA cache_size = -262144")
            conn.execute("BEGIN")
            # Indexes are rebuilt once after the load (a sort) instead of row by row; the very
            # same DDL is restored, and a unique index that fails rolls the whole build back.
            indexes = conn.execute(
                "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL "
                f"AND tbl_name IN ({', '.join('?' for _ in COLLECTIONS)})", COLLECTIONS).fetchall()
            for name, _ in indexes:
                conn.execute(f'DROP INDEX "{name}"')
            ids = _bulk(conn, gen, counts, pb.generation)
            for _, sql in indexes:
                conn.execute(sql)
            planted = _dirty(conn, gen, ids) if dirty else []
            conn.execute("COMMIT")
            conn.execute("PRAGMA journal_mode = WAL")  # as PocketBase keeps it
        finally:
            conn.close()
        timings["bulk"] = time.monotonic() - t

        t = time.monotonic()
        pb.start()
        admin = pb.session(SUPERUSER["email"], SUPERUSER["password"])
        served = {}
        for name in COLLECTIONS:
            data = check(admin.get(f"/api/collections/{name}/records",
                                   params={"perPage": 1, "fields": "id"}))
            served[name] = int(data["totalItems"])
        expected = {name: len(ids[name]) for name in COLLECTIONS}
        if served != expected:
            raise RuntimeError(f"PocketBase serves {served}, but the builder wrote {expected}")
        # A bulk player (reused real hash) must log in through PocketBase itself.
        probe = api_users if len(ids["users"]) > api_users + 2 else 0
        check(admin.post("/api/collections/users/auth-with-password",
                         json={"identity": f"player{probe}@example.com", "password": PLAYER_PASSWORD}))
        timings["verify"] = time.monotonic() - t
    timings["total"] = time.monotonic() - started
    return {
        "pb_data": str(pb_data),
        "version": pb.version,
        "generation": pb.generation,
        "counts": served,
        "rows": sum(served.values()),
        "superuser": dict(SUPERUSER),
        "player_password": PLAYER_PASSWORD,
        "api_users": [f"player{i}@example.com" for i in range(api_users)],
        "dirty": planted,
        "seconds": {k: round(v, 2) for k, v in timings.items()},
    }


def main(argv: Sequence[str] | None = None) -> int:
    """`pbmigrate-sample --rows N --out DIR [--version V] [--dirty]`."""
    parser = argparse.ArgumentParser(prog="pbmigrate-sample", description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=20_000, help="total rows, about (default 20000)")
    parser.add_argument("--out", type=Path, required=True, help="folder that receives pb_data/")
    parser.add_argument("--version", default=None, help="PocketBase version (default: the venv's)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--dirty", action="store_true", help="plant a few bad values")
    parser.add_argument("--api-users", type=int, default=API_USERS,
                        help=f"players created through the API (default {API_USERS})")
    args = parser.parse_args(argv)
    result = build_sample(args.out, rows=args.rows, version=args.version, seed=args.seed,
                          dirty=args.dirty, api_users=args.api_users)
    secs = result["seconds"]
    print(f"PocketBase {result['version']} sample in {result['pb_data']} ({result['rows']} rows, "
          f"{secs['total']} s: API {secs['api']}, bulk {secs['bulk']}, verify {secs['verify']})")
    for name, n in result["counts"].items():
        print(f"  {name:<14}{n:>10}")
    for bad in result["dirty"]:
        print(f"  planted: {bad['collection']}.{bad['field']} ({bad['problem']}) id={bad['id']}")
    print(f"superuser {result['superuser']['email']} / {result['superuser']['password']}; "
          f"players log in with {result['player_password']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
