"""Mapping files: how PocketBase collections become PostgreSQL tables.

A collection the mapping does not name is copied under its own name, so the pipeline works for
any PocketBase application. Anything the file names that does not exist is an error naming it.

```yaml
collections:
  users:
    table: players                     # target table (default: the collection's name)
    rename: {tokenKey: token_key}      # field -> column
    skip_fields: [lastResetSentAt]     # fields not copied
    types: {xp: numeric}               # PostgreSQL type overrides
    junctions:                         # multi relations -> (owner, target, position) tables
      friends: {table: player_friends, owner: player_id, target: friend_id}
  leaderboard:
    derive: "SELECT ... FROM {schema}.player_stats"   # a view instead of a copy
skip: [logs]                           # collections not migrated at all
cache: {...}                           # Redis warm-up, read by pbmigrate.warmup
```
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pbmigrate.catalog import Catalog, Collection
from pbmigrate.errors import MappingError

MAPPINGS_DIR = Path(__file__).resolve().parents[1] / "mappings"
TOP_KEYS = {"collections", "skip", "cache", "description"}
COLLECTION_KEYS = {"table", "rename", "skip_fields", "types", "junctions", "derive"}
JUNCTION_KEYS = {"table", "owner", "target"}


@dataclass(frozen=True)
class JunctionSpec:
    table: str | None = None
    owner: str = "owner_id"
    target: str = "target_id"


@dataclass(frozen=True)
class CollectionMap:
    table: str | None = None
    rename: dict[str, str] = field(default_factory=dict)
    skip_fields: frozenset[str] = frozenset()
    types: dict[str, str] = field(default_factory=dict)
    junctions: dict[str, JunctionSpec] = field(default_factory=dict)
    derive: str | None = None


@dataclass(frozen=True)
class Mapping:
    collections: dict[str, CollectionMap] = field(default_factory=dict)
    skip: frozenset[str] = frozenset()
    cache: dict[str, Any] = field(default_factory=dict)
    source: str = "(identity)"

    def for_collection(self, name: str) -> CollectionMap:
        return self.collections.get(name, CollectionMap())


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
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise MappingError(f"{path}: not valid YAML: {exc}") from exc
    return parse_mapping(doc, str(path))


def _unknown(keys: Any, allowed: set[str], where: str) -> None:
    extra = sorted(set(keys) - allowed)
    if extra:
        raise MappingError(f"{where}: unknown key {extra[0]!r} (allowed: {', '.join(sorted(allowed))})")


def _dict(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MappingError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def parse_mapping(doc: Any, source: str) -> Mapping:
    doc = _dict(doc, source)
    _unknown(doc, TOP_KEYS, source)
    cols: dict[str, CollectionMap] = {}
    for cname, spec in _dict(doc.get("collections"), f"{source}: collections").items():
        where = f"{source}: collections.{cname}"
        spec = _dict(spec, where)
        _unknown(spec, COLLECTION_KEYS, where)
        junctions = {}
        for fname, j in _dict(spec.get("junctions"), f"{where}.junctions").items():
            j = _dict(j, f"{where}.junctions.{fname}")
            _unknown(j, JUNCTION_KEYS, f"{where}.junctions.{fname}")
            junctions[fname] = JunctionSpec(**j)
        cols[cname] = CollectionMap(
            table=spec.get("table"),
            rename=dict(_dict(spec.get("rename"), f"{where}.rename")),
            skip_fields=frozenset(spec.get("skip_fields") or ()),
            types=dict(_dict(spec.get("types"), f"{where}.types")),
            junctions=junctions,
            derive=spec.get("derive"),
        )
    return Mapping(cols, frozenset(doc.get("skip") or ()), _dict(doc.get("cache"), f"{source}: cache"), source)


def validate_mapping(mapping: Mapping, catalog: Catalog) -> None:
    """Every collection and field the mapping names must exist in this PocketBase."""
    names = {c.name for c in catalog.collections}
    for cname in sorted(set(mapping.collections) | mapping.skip):
        if cname not in names:
            raise MappingError(f"mapping {mapping.source}: unknown collection {cname!r}")
    for cname, cmap in mapping.collections.items():
        coll = catalog.get(cname)
        for group, fields in (
            ("rename", cmap.rename),
            ("skip_fields", cmap.skip_fields),
            ("types", cmap.types),
            ("junctions", cmap.junctions),
        ):
            for fname in fields:
                if not coll.has_field(fname):
                    raise MappingError(
                        f"mapping {mapping.source}: collections.{cname}.{group}: "
                        f"collection {cname!r} has no field {fname!r}"
                    )
        for fname in cmap.junctions:
            f = coll.field(fname)
            if not (f.type == "relation" and f.multi):
                raise MappingError(
                    f"mapping {mapping.source}: collections.{cname}.junctions.{fname}: "
                    "only multi relations become junction tables"
                )
        if "id" in cmap.skip_fields:
            raise MappingError(f"mapping {mapping.source}: collections.{cname}: the id field cannot be skipped")


def is_skipped(mapping: Mapping, coll: Collection) -> bool:
    return coll.name in mapping.skip
