"""Table and column names of the game, on both sides, from the mapping file.

The service speaks one set of names in its answers (the PostgreSQL columns the mapping produces,
e.g. ``player_id``), and must find the same data in PocketBase (``user``) and in PostgreSQL
(``game_sessions.player_id``). Both come from `pbmigrate.plan.mapping.load_mapping`, so a user's own
mapping (other table names, other renames) serves their schema, not only the sample's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pbmigrate.cache.keys import LeaderboardSpec, ProfileSpec
from pbmigrate.cache.warmup import parse_cache_config
from pbmigrate.plan.mapping import Mapping, load_mapping

# The game's PocketBase collections and the fields each journey reads (PocketBase names).
COLLECTIONS = ("users", "matches", "participants", "user_stats", "inventory")
FIELDS = {
    "users": ("id", "email", "password", "xp", "updated"),
    "matches": ("id", "season", "mode", "status", "map", "players", "winner", "started", "ended",
                "created", "updated"),
    "participants": ("id", "match", "user", "team", "score", "placement", "created", "updated"),
    "user_stats": ("id", "user", "season", "games_played", "wins", "losses", "rating", "created",
                   "updated"),
    "inventory": ("id", "user", "item", "quantity", "equipped", "attributes", "acquired"),
}


@dataclass(frozen=True)
class Names:
    """PocketBase collection/field -> PostgreSQL table/column, both ways."""

    tables: dict[str, str]
    columns: dict[str, dict[str, str]]  # collection -> field -> column
    junctions: dict[str, tuple[str, str, str]] = field(default_factory=dict)  # "matches.players" -> (t, o, t)

    def table(self, collection: str) -> str:
        return self.tables.get(collection, collection)

    def col(self, collection: str, fieldname: str) -> str:
        return self.columns.get(collection, {}).get(fieldname, fieldname)

    def field_of(self, collection: str, column: str) -> str:
        """The PocketBase field behind a PostgreSQL column (a rename read backwards)."""
        for f, c in self.columns.get(collection, {}).items():
            if c == column:
                return f
        return column


@dataclass(frozen=True)
class GameSchema:
    """Everything the service needs to know about the user's schema."""

    names: Names
    profile: ProfileSpec
    leaderboard: LeaderboardSpec

    @property
    def profile_fields_pb(self) -> tuple[str, ...]:
        return tuple(self.names.field_of("users", c) for c in self.profile.fields)


def names_from(mapping: Mapping) -> Names:
    tables: dict[str, str] = {}
    columns: dict[str, dict[str, str]] = {}
    junctions: dict[str, tuple[str, str, str]] = {}
    for name in COLLECTIONS:
        cm = mapping.for_collection(name)
        tables[name] = cm.table or name
        columns[name] = {f: cm.rename.get(f, f) for f in FIELDS[name]} | dict(cm.rename)
        for fname, j in cm.junctions.items():
            junctions[f"{name}.{fname}"] = (j.table or f"{tables[name]}_{fname}", j.owner, j.target)
    return Names(tables, columns, junctions)


def load_schema(mapping: str | None = "game.yaml") -> GameSchema:
    """The game's names and cache specs from a mapping file (``game.yaml`` by default).

    The ``cache:`` section is checked as the warm-up checks it (secrets refused), so the service
    caches exactly what the migration warmed.
    """
    doc = load_mapping(mapping)
    names = names_from(doc)
    cfg = parse_cache_config(doc.cache)
    profile = cfg.profiles or ProfileSpec(table=names.table("users"))
    leaderboard = cfg.leaderboards or LeaderboardSpec(
        table=names.table("user_stats"), member=names.col("user_stats", "user"))
    return GameSchema(names, profile, leaderboard)
