"""An independent check that every field of every record arrived: reads the source with plain
sqlite3 and decodes PocketBase's storage rules here, not with pbmigrate.plan.convert."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime

import psycopg

from pbmigrate.pgsql import qi
from pbmigrate.plan.model import Plan


def _date(v):
    if v in (None, ""):
        return None
    dt = datetime.fromisoformat(str(v).replace("Z", "+00:00"))
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def expected(field, v):
    t = field.type
    if t in ("date", "autodate"):
        return _date(v)
    if t == "number":
        return int(v or 0) if field.only_int else float(v or 0)
    if t == "bool":
        return v in (1, "1", "true", True)
    if t == "json":
        return None if v is None or v == "null" else json.loads(v if isinstance(v, str) else json.dumps(v))
    if t == "geoPoint":
        p = json.loads(v) if v else {"lon": 0, "lat": 0}
        return (float(p["lon"]), float(p["lat"]))
    if t in ("select", "file", "relation"):
        if field.multi:
            return json.loads(v) if v else []
        return v or None
    return "" if v is None else v


def actual(field, v):
    if field.type == "geoPoint":
        x, y = v.strip("()").split(",")
        return (float(x), float(y))
    return v


def assert_migrated(source_db: str, pg_url: str, schema: str, plan: Plan, run_id: str,
                    orphans: str = "reject") -> int:
    """Every source row is in the target with equal values, or in pbm_meta.rejects. With orphans="null",
    a relation id missing from its target table is expected as NULL (or absent from the junction).
    Returns the number of rows compared."""
    src = sqlite3.connect(f"file:{source_db}?mode=ro", uri=True)
    compared = 0
    with psycopg.connect(pg_url) as pg:
        present = {t.name: {r for (r,) in pg.execute(f"SELECT id FROM {qi(schema)}.{qi(t.name)}")}
                   for t in plan.tables}
        targets = {(t.name, fk.column): fk.target_table for t in plan.tables for fk in t.foreign_keys}
        for t in plan.tables:
            rejected = {r for (r,) in pg.execute(
                "SELECT DISTINCT record_id FROM pbm_meta.rejects WHERE run_id = %s AND collection = %s",
                (run_id, t.collection.name))}
            names = [f.name for f in t.collection.fields]
            rows = src.execute(f"SELECT {', '.join(qi(n) for n in names)} FROM {qi(t.collection.name)}").fetchall()
            cols = ", ".join(qi(c.name) for c in t.columns)
            target = {r[0]: r for r in pg.execute(f"SELECT {cols} FROM {qi(schema)}.{qi(t.name)}")}
            assert len(target) + len(rejected) == len(rows), f"{t.name}: rows lost or duplicated"
            junctions = {}
            for j in t.junctions:
                for owner, tgt in pg.execute(
                        f"SELECT {qi(j.owner)}, {qi(j.target)} FROM {qi(schema)}.{qi(j.table)} "
                        f"ORDER BY {qi(j.owner)}, position"):
                    junctions.setdefault((j.table, owner), []).append(tgt)
            for row in rows:
                rid = row[0]
                if rid in rejected:
                    assert rid not in target, f"{t.name}.{rid} is both loaded and rejected"
                    continue
                got = target[rid]
                for i, c in enumerate(t.columns):
                    if c.field.secret and not plan.has_secrets:
                        continue
                    want = expected(c.field, row[c.position])
                    fk_target = targets.get((t.name, c.name))
                    if orphans == "null" and fk_target and want not in present[fk_target]:
                        want = None
                    assert actual(c.field, got[i]) == want, f"{t.name}.{rid}.{c.name}: {got[i]!r} != {want!r}"
                for j in t.junctions:
                    want = expected(j.field, row[j.position])
                    if orphans == "null" and j.target_table:
                        want = [w for w in want if w in present[j.target_table]]
                    assert junctions.get((j.table, rid), []) == want, f"{t.name}.{rid}.{j.field.name} junction"
                compared += 1
    src.close()
    return compared
