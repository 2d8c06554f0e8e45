"""Table and column names of the game, on both sides, from the mapping file.

The service speaks one set of names in its answers (the PostgreSQL columns the mapping produces,
e.g. ``player_id``), and must find the same data in PocketBase (``user``) and in PostgreSQL
(``game_sessions.player_id``). Both come from `pbmigrate.plan.mapping.load_mapping`, so a user's own
mapping (other table names, other renames) serves their schema, not only the sample's.

The shape the service needs is five **roles** (`ROLES`): players, matches, the players of a
match, per-season stats and inventory, each with the fields `ROLES` lists. By default a role is
played by the PocketBase collection and fields of the same names (the sample game). A game whose
collections or fields are named otherwise says so in the mapping's ``game:`` section::

    game:
      users: accounts                                  # role: collection (fields as named)
      participants: {collection: match_players, fields: {user: player, match: game}}

What the served schema (or PocketBase) then lacks is named in one line at start
(`missing_in_postgres`, `missing_in_pocketbase`), not found by the first player.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pbmigrate.cache.keys import LeaderboardSpec, ProfileSpec
from pbmigrate.cache.warmup import parse_cache_config
from pbmigrate.plan.mapping import Mapping, closest, load_mapping

# The roles the journeys need and the fields each reads or writes (role names = the sample's names).
ROLES = {
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
    """Role and its fields -> PocketBase collection/field and PostgreSQL table/column, both ways."""

    tables: dict[str, str]
    columns: dict[str, dict[str, str]]  # role -> field role (or any source field) -> column
    junctions: dict[str, tuple[str, str, str]] = field(default_factory=dict)  # "matches.players" -> (t, o, t)
    collections: dict[str, str] = field(default_factory=dict)  # role -> PocketBase collection
    fields: dict[str, dict[str, str]] = field(default_factory=dict)  # role -> field role -> PocketBase field

    def table(self, role: str) -> str:
        return self.tables.get(role, role)

    def col(self, role: str, fieldname: str) -> str:
        return self.columns.get(role, {}).get(fieldname, fieldname)

    def coll(self, role: str) -> str:
        """The PocketBase collection playing `role`."""
        return self.collections.get(role, role)

    def src(self, role: str, fieldname: str) -> str:
        """The PocketBase field playing field role `fieldname` of `role`."""
        return self.fields.get(role, {}).get(fieldname, fieldname)

    def field_of(self, role: str, column: str) -> str:
        """The PocketBase field behind a PostgreSQL column (a rename read backwards)."""
        for f, c in self.columns.get(role, {}).items():
            if c == column:
                return self.src(role, f)
        return column


class ShapeError(RuntimeError):
    """The served schema or PocketBase lacks a table, collection or field a journey needs."""


@dataclass(frozen=True)
class GameSchema:
    """Everything the service needs to know about the user's schema."""

    names: Names
    profile: ProfileSpec
    leaderboard: LeaderboardSpec
    mapping: str = "game.yaml"  # where the names came from, for the error messages

    @property
    def profile_fields_pb(self) -> tuple[str, ...]:
        return tuple(self.names.field_of("users", c) for c in self.profile.fields)


def roles_from(mapping: Mapping) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """The mapping's ``game:`` section: role -> collection, role -> field role -> field."""
    section = mapping.game or {}
    if not isinstance(section, dict):
        raise mapping.error("game", "expected role: collection entries")
    collections: dict[str, str] = {}
    fields: dict[str, dict[str, str]] = {}
    for role, spec in section.items():
        if role not in ROLES:
            raise mapping.error(f"game.{role}", f"unknown role{closest(str(role), ROLES)} (roles: {', '.join(ROLES)})")
        if isinstance(spec, str):
            spec = {"collection": spec}
        if not isinstance(spec, dict) or set(spec) - {"collection", "fields"}:
            raise mapping.error(f"game.{role}", "expected a collection name or {collection: ..., fields: {...}}")
        collections[role] = str(spec.get("collection") or role)
        for frole, fname in (spec.get("fields") or {}).items():
            if frole not in ROLES[role]:
                raise mapping.error(f"game.{role}.fields.{frole}",
                                    f"unknown field role{closest(str(frole), ROLES[role])} "
                                    f"(fields of {role}: {', '.join(ROLES[role])})")
            fields.setdefault(role, {})[frole] = str(fname)
    return collections, fields


def names_from(mapping: Mapping) -> Names:
    collections, fields = roles_from(mapping)
    tables: dict[str, str] = {}
    columns: dict[str, dict[str, str]] = {}
    junctions: dict[str, tuple[str, str, str]] = {}
    for role in ROLES:
        name = collections.get(role, role)
        src = fields.get(role, {})
        cm = mapping.for_collection(name)
        tables[role] = cm.table or name
        columns[role] = {f: cm.rename.get(f, f) for f in cm.rename} | {
            f: cm.rename.get(src.get(f, f), src.get(f, f)) for f in ROLES[role]}
        for fname, j in cm.junctions.items():
            frole = next((fr for fr, sf in src.items() if sf == fname), fname)
            junctions[f"{role}.{frole}"] = (j.table or f"{tables[role]}_{fname}", j.owner, j.target)
    return Names(tables, columns, junctions, collections, fields)


def required_columns(game: GameSchema) -> dict[str, list[str]]:
    """PostgreSQL table -> the columns the service's queries use."""
    n = game.names
    need: dict[str, list[str]] = {}

    def add(table: str, column: str) -> None:
        cols = need.setdefault(table, [])
        if column not in cols:
            cols.append(column)

    for role, frs in ROLES.items():
        for f in frs:
            if (role, f) != ("matches", "players"):  # a junction table (below), not a column
                add(n.table(role), n.col(role, f))
    for c in game.profile.fields:
        add(game.profile.table, c)
    lb = game.leaderboard
    for c in (lb.season, lb.member, lb.score):
        add(lb.table, c)
    if "matches.players" in n.junctions:
        table, owner, target = n.junctions["matches.players"]
        for c in (owner, target, "position"):
            add(table, c)
    return need


def missing(have: dict[str, set[str]], need: dict[str, list[str]]) -> list[str]:
    """``table`` (no such table) or ``table.column`` for each thing `need` names that `have` lacks."""
    out: list[str] = []
    for table, cols in need.items():
        if table not in have:
            out.append(table)
        else:
            out += [f"{table}.{c}" for c in cols if c not in have[table]]
    return out


def shape_error(where: str, gaps: list[str], mapping: str) -> str:
    """One line: what is missing where, and what to change."""
    shown = ", ".join(gaps[:12]) + (f" and {len(gaps) - 12} more" if len(gaps) > 12 else "")
    return (f"pbgame: {where} lacks what the game journeys need: {shown}. Roles (mapping {mapping}, section game:) "
            f"must name the collection and fields of each of {', '.join(ROLES)}; see docs/application.md, 'Shape'")


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
    return GameSchema(names, profile, leaderboard, doc.source)
