"""Mapping files: how PocketBase collections become PostgreSQL tables.

A collection the mapping does not name is copied under its own name, so the pipeline works for
any PocketBase application. Anything the file names that does not exist is an error naming the
file, the key and the problem (with the closest existing names), raised before anything is
written. `pbmigrate mapping init` writes a starter file for the database in front of you.

```yaml
collections:
  users:
    table: players                     # target table (default: the collection's name)
    rename: {tokenKey: token_key}      # field -> column
    skip_fields: [lastResetSentAt]     # fields not copied
    types: {xp: numeric}               # PostgreSQL type overrides
    junctions:                         # multi relations -> (owner, target, position) tables
      friends: {table: player_friends, owner: player_id, target: friend_id}
derive:                                # views over the migrated tables, not copies: a PocketBase
  leaderboard: "SELECT ... FROM {schema}.player_stats"   # collection of that name is not copied
skip: [logs]                           # collections not migrated at all
cache: {...}                           # Redis warm-up, read by pbmigrate.cache.warmup
game: {...}                            # the game service's roles, read by pbgame.schema
```
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from pbmigrate.errors import MappingError
from pbmigrate.source.catalog import Catalog, Collection

MAPPINGS_DIR = Path(__file__).resolve().parents[2] / "mappings"
# A type name, optionally with a modifier and array brackets: what a `types:` override may say.
# Anything else (a quote, a semicolon, a DEFAULT clause) would reach the DDL as SQL.
TYPE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_ .]*(\(\s*\d+(\s*,\s*\d+)?\s*\))?(\[\])*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class JunctionSpec(_Strict):
    table: str | None = None
    owner: str = "owner_id"
    target: str = "target_id"


class CollectionMap(_Strict):
    table: str | None = None
    rename: dict[str, str] = {}
    skip_fields: frozenset[str] = frozenset()
    types: dict[str, str] = {}
    junctions: dict[str, JunctionSpec] = {}
    derive: str | None = None  # the older spelling of a top-level `derive:` entry

    @field_validator("types")
    @classmethod
    def _type_names(cls, types: dict[str, str]) -> dict[str, str]:
        for fname, tname in types.items():
            if not TYPE_RE.match(tname.strip()):
                raise ValueError(f"{fname}: {tname!r} is not a PostgreSQL type name")
        return {k: v.strip() for k, v in types.items()}


class MappingFile(_Strict):
    """What a mapping file may hold (extra keys are errors, not ignored)."""

    description: str | None = None
    collections: dict[str, CollectionMap] = {}
    derive: dict[str, str] = {}
    skip: frozenset[str] = frozenset()
    cache: dict[str, Any] = {}
    game: dict[str, Any] = {}  # passed through: the game service (pbgame.schema) checks it


@dataclass(frozen=True)
class Mapping:
    collections: dict[str, CollectionMap] = field(default_factory=dict)
    skip: frozenset[str] = frozenset()
    cache: dict[str, Any] = field(default_factory=dict)
    source: str = "(identity)"
    derive: dict[str, str] = field(default_factory=dict)  # view name -> SELECT with {schema}
    game: dict[str, Any] = field(default_factory=dict)  # the game service's roles (pbgame.schema)

    def for_collection(self, name: str) -> CollectionMap:
        return self.collections.get(name, CollectionMap())

    def error(self, where: str, problem: str) -> MappingError:
        return MappingError(f"mapping {self.source}: {where}: {problem}")


def resolve_path(name: str) -> Path:
    """`game.yaml` or `game` names a bundled mapping; anything else is a path."""
    p = Path(name)
    if p.is_file():
        return p
    for candidate in (MAPPINGS_DIR / name, MAPPINGS_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    raise MappingError(f"mapping {name!r} not found (neither a file nor one of {MAPPINGS_DIR})")


def load_mapping(name: str | None) -> Mapping:
    """Load a mapping by name or path; None, '' or 'none' means copy everything as it is."""
    if not name or name.lower() in ("none", "identity"):
        return Mapping()
    path = resolve_path(name)
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise MappingError(f"mapping {path}: not valid YAML{at}: {problem}") from exc
    return parse_mapping(doc, str(path))


_KEYS = {
    "top": set(MappingFile.model_fields),
    "collection": set(CollectionMap.model_fields),
    "junction": set(JunctionSpec.model_fields),
}


def _allowed(loc: tuple) -> set[str]:
    if len(loc) == 1:
        return _KEYS["top"]
    if loc[0] == "collections" and len(loc) == 3:
        return _KEYS["collection"]
    if loc[0] == "collections" and len(loc) == 5 and loc[2] == "junctions":
        return _KEYS["junction"]
    return set()


def closest(name: str, names: Iterable[str]) -> str:
    """' (did you mean 'x' or 'y'?)' for the nearest of `names`, or '' when none is near."""
    names = list(names)
    near = [n for n in names if n.lower() == name.lower() and n != name]
    near += [n for n in difflib.get_close_matches(name, names, n=3, cutoff=0.6) if n not in near]
    if not near:
        return ""
    return " (did you mean " + " or ".join(repr(n) for n in near[:3]) + "?)"


def _one_line(exc: ValidationError, source: str) -> MappingError:
    err = exc.errors()[0]
    loc = tuple(err["loc"])
    where = ".".join(str(p) for p in loc) or "(top)"
    if err["type"] == "extra_forbidden":
        allowed = _allowed(loc)
        problem = f"unknown key {loc[-1]!r}" + closest(str(loc[-1]), allowed)
        if allowed:
            problem += f" (allowed: {', '.join(sorted(allowed))})"
        where = ".".join(str(p) for p in loc[:-1]) or "(top)"
    else:
        problem = err["msg"].removeprefix("Value error, ")
        if err["type"] in ("set_type", "frozen_set_type", "list_type") and isinstance(err.get("input"), str):
            problem += f" (write [{err['input']}], not {err['input']})"
    return MappingError(f"mapping {source}: {where}: {problem}")


def parse_mapping(doc: Any, source: str) -> Mapping:
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise MappingError(f"mapping {source}: expected a mapping of keys at the top, got {type(doc).__name__}")
    try:
        m = MappingFile.model_validate(doc)
    except ValidationError as exc:
        raise _one_line(exc, source) from None
    derive = dict(m.derive)
    for cname, cmap in m.collections.items():
        if cmap.derive:
            name = cmap.table or cname
            if name in derive:
                raise MappingError(f"mapping {source}: collections.{cname}.derive: view {name!r} is derived twice")
            derive[name] = cmap.derive
    for name, sql in derive.items():
        if not str(sql).strip():
            raise MappingError(f"mapping {source}: derive.{name}: empty SQL")
    return Mapping(dict(m.collections), m.skip, dict(m.cache), source, derive, dict(m.game))


def validate_mapping(mapping: Mapping, catalog: Catalog) -> None:
    """Every collection and field the mapping names must exist in this PocketBase.

    A derived view needs no collection: `collections.<name>` holding only `derive` is a view."""
    names = [c.name for c in catalog.collections]
    for cname in sorted(set(mapping.collections) | mapping.skip):
        cmap = mapping.collections.get(cname)
        if cname not in names and not (cmap and cmap.derive):
            group = "collections" if cname in mapping.collections else "skip"
            raise mapping.error(f"{group}.{cname}",
                                f"unknown collection {cname!r}: this PocketBase has no such collection"
                                + closest(cname, names))
    for cname, cmap in mapping.collections.items():
        if cname not in names:
            continue
        coll = catalog.get(cname)
        fnames = [f.name for f in coll.fields]
        for group, fields in (
            ("rename", cmap.rename),
            ("skip_fields", cmap.skip_fields),
            ("types", cmap.types),
            ("junctions", cmap.junctions),
        ):
            for fname in fields:
                if not coll.has_field(fname):
                    raise mapping.error(f"collections.{cname}.{group}.{fname}",
                                        f"collection {cname!r} has no field {fname!r}" + closest(fname, fnames))
        for fname in cmap.junctions:
            f = coll.field(fname)
            if not (f.type == "relation" and f.multi):
                raise mapping.error(f"collections.{cname}.junctions.{fname}", "only multi relations become "
                                    f"junction tables ({fname!r} is a single {f.type})")
        if "id" in cmap.skip_fields:
            raise mapping.error(f"collections.{cname}.skip_fields", "the id field cannot be skipped")


def is_skipped(mapping: Mapping, coll: Collection) -> bool:
    return coll.name in mapping.skip


_SECRET_PARTS = ("password", "passwd", "secret", "apikey", "privatekey")
_SECRET_ENDS = ("token", "tokenkey", "salt", "hash")  # not "tokens": a game's currency is no secret


def secret_reason(field: str, *, allow_email: bool = False) -> str | None:
    """Why `field` looks secret (password, token key, email...), or None if it looks public.

    Names are compared without case, ``_`` or ``-``: ``password_hash``, ``passwordHash`` and
    ``token_key`` all match. Emails are personal data: refused unless the mapping allows them.
    """
    norm = re.sub(r"[^a-z0-9]", "", field.lower())
    for part in _SECRET_PARTS:
        if part in norm:
            return f"looks like a secret ({part})"
    for end in _SECRET_ENDS:
        if norm.endswith(end):
            return f"looks like a secret ({end})"
    if norm in ("otp", "totp", "mfa"):
        return "looks like a secret (one-time password)"
    if norm.endswith("email") and not allow_email:
        return "is an email address (set allow_email: true to cache it)"
    return None
