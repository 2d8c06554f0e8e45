"""`pbmigrate mapping init`: a starter mapping file for the PocketBase database in front of you.

Why: the bundled `game.yaml` names the sample game's own collections and fields; a real game has
others. The starter lists every collection and field with its PocketBase and PostgreSQL type (as
comments), names single relations for what they point at (`user` -> `user_id`), gives multi
relations junction tables, and fills the `cache:` section from what it finds (the auth
collection's public fields; a stats-like collection's score for the leaderboards; a live-games
state), leaving a section commented out where nothing fits. It runs unchanged in the DAG.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass

from pbmigrate.pgsql import PG_MAX_IDENT
from pbmigrate.plan.mapping import secret_reason
from pbmigrate.plan.model import pg_type
from pbmigrate.source.catalog import Catalog, Collection, Field

_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_YAML11_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null"}  # read as bools / null
_STATS_WORDS = ("stat", "score", "rating", "rank", "elo", "mmr", "point", "leader")
_SCORE_NAMES = ("rating", "elo", "mmr", "score", "points", "xp", "level", "wins")
_SEASON_NAMES = ("season", "season_id", "seasonid", "ladder", "league")
_STATE_NAMES = ("state", "game_state", "gamestate", "board", "snapshot")
_LIVE_VALUES = ("in_progress", "inprogress", "live", "active", "playing", "running", "started", "ongoing")
_PRIVATE_AUTH = {"email", "emailVisibility", "verified", "lastResetSentAt", "lastVerificationSentAt",
                 "lastLoginAlertSentAt"}


def key(name: str) -> str:
    """A YAML key or scalar: plain where YAML reads it back as the same string, else quoted."""
    if _PLAIN_KEY.match(name) and name.lower() not in _YAML11_WORDS:
        return name
    return json.dumps(name, ensure_ascii=False)


def short(name: str) -> str:
    """A PostgreSQL identifier of at most 63 bytes: long names keep a readable head and a hash."""
    if len(name.encode()) <= PG_MAX_IDENT:
        return name
    head = name.encode()[:PG_MAX_IDENT - 9].decode("utf-8", "ignore")
    return f"{head}_{hashlib.md5(name.encode()).hexdigest()[:8]}"


def singular(name: str) -> str:
    low = name.lower()
    if low.endswith("ies") and len(name) > 4:
        return name[:-3] + "y"
    if low.endswith(("ches", "shes", "sses", "xes", "zes")):
        return name[:-2]
    if low.endswith("s") and not low.endswith("ss") and len(name) > 3:
        return name[:-1]
    return name


def _type_note(f: Field, catalog: Catalog) -> str:
    kind = f.type + (" (multi)" if f.multi else "")
    target = next((c.name for c in catalog.collections if f.target in (c.id, c.name)), f.target)
    if f.type == "relation" and f.multi:
        return f"{kind} to {target} -> a junction table, below"
    extra = [f"foreign key to {target}"] if f.type == "relation" else []
    if f.name == "id":
        extra.append("primary key")
    if f.required:
        extra.append("required")
    if f.secret:
        extra.append("secret: migrated, never logged or cached")
    if f.type == "number" and f.only_int:
        extra.append("whole numbers")
    return f"{kind} -> {pg_type(f)}" + (f" ({', '.join(extra)})" if extra else "")


@dataclass
class _Names:
    """The target names the starter gives: table per collection, column per field."""

    tables: dict[str, str]  # collection id and name -> table
    columns: dict[tuple[str, str], str]  # (collection name, field name) -> column


def _column_name(coll: Collection, f: Field) -> str:
    if f.type == "relation" and not f.multi and f.name != "id":
        low = f.name.lower()
        if not (low.endswith("_id") or low.endswith("id")):
            candidate = f"{f.name}_id"
            if not coll.has_field(candidate):
                return short(candidate)
    return short(f.name)


def _names(collections: list[Collection]) -> _Names:
    tables: dict[str, str] = {}
    columns: dict[tuple[str, str], str] = {}
    for c in collections:
        tables[c.id] = tables[c.name] = short(c.name)
        for f in c.fields:
            columns[(c.name, f.name)] = _column_name(c, f)
    return _Names(tables, columns)


def _junction(coll: Collection, f: Field, names: _Names, catalog: Catalog) -> tuple[str, str, str]:
    table = short(f"{names.tables[coll.name]}_{f.name}")
    owner = short(f"{singular(names.tables[coll.name]).lower()}_id")
    try:
        target_name = catalog.get(f.target or "").name
    except Exception:  # a relation to a collection that no longer exists: the plan warns
        target_name = f.name
    target = short(f"{singular(f.name if target_name == coll.name else target_name).lower()}_id")
    if target == owner:
        target = short(f"{singular(f.name).lower()}_id")
    if target == owner:
        target = short(f"{singular(f.name).lower()}_target_id")
    return table, owner, target


def _auth_collection(collections: list[Collection]) -> Collection | None:
    """The players: the auth collection the most relations point at (PocketBase always makes a
    `users` one, which a game may leave empty beside its own), `users` on a tie."""
    def pointed_at(auth: Collection) -> tuple[int, bool]:
        refs = sum(1 for c in collections for f in c.fields
                   if f.type == "relation" and f.target in (auth.id, auth.name))
        return refs, auth.name == "users"

    auths = [c for c in collections if c.type == "auth"]
    return max(auths, key=pointed_at) if auths else None


def _profile_fields(auth: Collection, names: _Names) -> list[str]:
    out = []
    for f in auth.fields:
        if f.name == "id" or f.secret or f.name in _PRIVATE_AUTH or f.type in ("autodate", "password"):
            continue
        if f.type == "relation" and f.multi:
            continue
        column = names.columns[(auth.name, f.name)]
        if secret_reason(column) is None:
            out.append(column)
    return out


def _first(fields: list[Field], wanted: tuple[str, ...], ok: Callable[[Field], bool]) -> Field | None:
    by_name = {f.name.lower(): f for f in fields if ok(f)}
    return next((by_name[w] for w in wanted if w in by_name), None)


def _leaderboard(collections: list[Collection], auth: Collection | None, names: _Names) -> dict | None:
    """The first stats-like collection with a season, a score and a player: its spec, or None."""
    def is_number(f: Field) -> bool:
        return f.type == "number"

    def rank(c: Collection) -> int:  # "user_stats" before "leaderboard": a leaderboard is what we derive
        return next((i for i, w in enumerate(_STATS_WORDS) if w in c.name.lower()), len(_STATS_WORDS))

    candidates = sorted((c for c in collections if c is not auth), key=rank)
    if auth is not None:
        candidates.append(auth)
    for c in candidates:
        score = _first(list(c.fields), _SCORE_NAMES, is_number) or next((f for f in c.fields if is_number(f)), None)
        season = _first(list(c.fields), _SEASON_NAMES, lambda f: f.type in ("text", "select", "number", "relation")
                        and not f.multi)
        if c is auth:
            member = next(f for f in c.fields if f.name == "id")
        else:
            member = next((f for f in c.fields if f.type == "relation" and not f.multi and auth is not None
                           and f.target in (auth.id, auth.name)), None)
        if score and season and member:
            return {"table": names.tables[c.name], "season": names.columns[(c.name, season.name)],
                    "member": names.columns[(c.name, member.name)], "score": names.columns[(c.name, score.name)],
                    "collection": c.name}
    return None


def _game_state(collections: list[Collection], names: _Names) -> dict | None:
    for c in collections:
        state = _first(list(c.fields), _STATE_NAMES, lambda f: f.type == "json")
        status = next((f for f in c.fields if f.type == "select" and not f.multi and f.name.lower() == "status"), None)
        live = next((v for v in (status.values if status else ()) if v.lower() in _LIVE_VALUES), None)
        if state and status and live:
            column = names.columns[(c.name, status.name)]
            where = f"\"{column.replace(chr(34), chr(34) * 2)}\" = '{live.replace(chr(39), chr(39) * 2)}'"
            return {"table": names.tables[c.name], "state": names.columns[(c.name, state.name)], "where": where}
    return None


def _flow(spec: dict) -> str:
    return "{" + ", ".join(f"{k}: {key(v) if isinstance(v, str) else json.dumps(v)}" for k, v in spec.items()) + "}"


def starter_mapping(catalog: Catalog, *, source: str, counts: dict[str, int] | None = None) -> str:
    """The starter mapping's YAML text for `catalog` (`counts`: rows per collection, for comments)."""
    counts = counts or {}
    migrating = catalog.migrating()
    names = _names(migrating)
    out = [
        f"# pbmigrate mapping for {source} (PocketBase {'<= 0.22' if catalog.generation == 22 else '>= 0.23'}),",
        "# written by `pbmigrate mapping init`. Every collection and field is listed: field: column,",
        "# with its PocketBase type -> PostgreSQL type. Rename tables and columns, add `types:` overrides,",
        "# `skip_fields:` or `skip:`, then give this file as the DAG param `mapping`.",
        f"description: {key('PocketBase ' + source + ' -> PostgreSQL')}",
        "",
        "collections:",
    ]
    for c in migrating:
        n = counts.get(c.name)
        rows = "" if n is None else f", {n:,} row{'' if n == 1 else 's'}"
        out.append(f"  {key(c.name)}:  # {c.type} collection{rows}")
        out.append(f"    table: {key(names.tables[c.name])}")
        out.append("    rename:")
        junctions = []
        for f in c.fields:
            if f.type == "relation" and f.multi:
                junctions.append(f)
                out.append(f"      # {key(f.name)}: {_type_note(f, catalog)}")
                continue
            column = key(names.columns[(c.name, f.name)])
            out.append(f"      {key(f.name)}: {column}  # {_type_note(f, catalog)}")
        if junctions:
            out.append("    junctions:  # (owner, target, position) rows, in the relation's order")
            for f in junctions:
                table, owner, target = _junction(c, f, names, catalog)
                out.append(f"      {key(f.name)}: {{table: {key(table)}, owner: {key(owner)}, target: {key(target)}}}")
    others = [c for c in catalog.collections if not c.migrates]
    if others:
        out += ["", "# Not migrated:"]
        out += [f"#   {c.name}: " + ("view collection (reported, not copied)" if c.is_view
                                   else "PocketBase system collection") for c in others]
    auth = _auth_collection(migrating)
    board = _leaderboard(migrating, auth, names)
    derived = next((c for c in migrating if "leaderboard" in c.name.lower()), None)
    out += ["", "# Views over the migrated tables, not copies (a collection of the same name is not copied)."]
    if board and derived and derived.name != board["collection"]:
        view = names.tables[derived.name]
        out += ["derive:", f"  {key(view)}: |",
                f"    SELECT s.*, rank() OVER (PARTITION BY s.\"{board['season']}\"",
                f"                 ORDER BY s.\"{board['score']}\" DESC, s.\"{board['member']}\" COLLATE \"C\" DESC)"
                " AS rank",
                f"      FROM {{schema}}.\"{board['table']}\" AS s"]
    else:
        out += ["# derive:", "#   leaderboard: |",
                "#     SELECT s.*, rank() OVER (PARTITION BY s.season ORDER BY s.rating DESC) AS rank",
                "#       FROM {schema}.player_stats AS s"]
    out += ["", "# Redis warm-up before the cut-over (public fields only; secrets are refused)."]
    sections = []
    fields = _profile_fields(auth, names) if auth else []
    if fields:
        sections.append(f"  profiles: {{table: {key(names.tables[auth.name])}, "
                        f"fields: [{', '.join(key(f) for f in fields)}]}}")
    else:
        sections.append("  # no auth collection with public fields found:")
        sections.append("  # profiles: {table: users, fields: [name, avatar]}")
    if board:
        sections.append("  leaderboards: " + _flow({k: board[k] for k in ("table", "season", "member", "score")}
                                                  | {"top": 100}))
    else:
        sections.append("  # no stats-like collection with a season, a score and a player found:")
        sections.append("  # leaderboards: {table: player_stats, season: season, member: player_id, score: rating}")
    state = _game_state(migrating, names)
    if state:
        sections.append("  game_state: " + _flow(state))
    else:
        sections.append("  # no collection with a json state and a live status found:")
        sections.append("  # game_state: {table: games, state: state, where: \"status = 'in_progress'\"}")
    live = [s for s in sections if not s.lstrip().startswith("#")]
    out += (["cache:"] if live else ["# cache:"]) + sections
    return "\n".join(out) + "\n"
