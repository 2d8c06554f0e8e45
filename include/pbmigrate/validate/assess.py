"""Pre-migration assessment: what will move, what will be renamed, rejected or left behind.

It runs the loader's own converters over every row (the columnar batch path, as a scan), so
"will not convert" here means exactly what the load will reject. In the DAG the load has done
that pass already: the assessment runs after it and reads the load's own rejects instead of
scanning every table again (`rejected_values`). Relations and unique indexes are checked with SQL
on the snapshot (API mode: dangling relations are checked in Python; duplicates are left to the
load).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable
from typing import Any

import psycopg

from pbmigrate.audit import meta
from pbmigrate.context import open_run_source
from pbmigrate.plan.mapping import Mapping, load_mapping
from pbmigrate.plan.model import INDEX_RE, Plan, Table, build_plan
from pbmigrate.source import Source
from pbmigrate.source.catalog import Catalog, Collection
from pbmigrate.source.sqlite import SqliteSource, qi

log = logging.getLogger("pbmigrate")
EXAMPLES = 5
API_SECRETS_NOTE = ("API mode: PocketBase never returns password hashes or token keys over its API, "
                    "so players will have to reset their passwords after this migration. "
                    "Give a data.db path instead to keep them.")


def _reason_kind(reason: str) -> str:
    return reason.split(":", 1)[0]


def _add(bucket: dict, key: str, rid: str) -> None:
    entry = bucket.setdefault(key, {"count": 0, "examples": []})
    entry["count"] += 1
    if len(entry["examples"]) < EXAMPLES:
        entry["examples"].append(rid)


def bad_values(source: Source, table: Table) -> dict[str, dict]:
    """{"field: reason kind": {count, examples}} from the loader's own column converters (and, for
    the rows they send back, its per-row ones): a scan on the load's columnar machinery (imported
    here: the DAG's assessment reads the load's rejects instead and never needs pyarrow)."""
    from pbmigrate.load.columnar.batch import TableConverter
    from pbmigrate.load.columnar.read import chunks

    work = TableConverter(table, source.has_secrets)
    rejects: list[tuple[str, str, str]] = []
    for chunk in chunks(source, table, None, None):
        rejects.extend(work.part(chunk).rejects)
    return _tally(sorted(rejects, key=lambda r: r[0]))  # examples: the first ids, as before


def rejected_values(conn: psycopg.Connection, run_id: str, table: Table) -> dict[str, dict]:
    """`bad_values` as the load found them: its rejects of this run, in the scan's order (by id,
    then as the converters named them), so the report is the same without a second pass."""
    rows = conn.execute(
        """SELECT record_id, field, reason FROM pbm_meta.rejects
            WHERE run_id = %s AND collection = %s AND stage = 'load' ORDER BY record_id COLLATE "C", id""",
        (run_id, table.collection.name))
    return _tally(rows)


def _tally(rejects: Iterable[tuple[str, str, str]]) -> dict[str, dict]:
    found: dict[str, dict] = {}
    for rid, field, reason in rejects:
        _add(found, f"{field}: {_reason_kind(reason)}", rid)
    return found


def dangling_sqlite(src: SqliteSource, coll: Collection, catalog: Catalog) -> dict[str, dict]:
    out = {}
    for f in coll.fields:
        if f.type != "relation" or not f.target:
            continue
        try:
            target = catalog.get(f.target).name
        except Exception:
            out[f.name] = {"count": -1, "examples": [], "note": f"target collection {f.target!r} is missing"}
            continue
        if f.multi:
            sql = (f"SELECT t.id FROM {qi(coll.name)} t, json_each(CASE WHEN json_valid(t.{qi(f.name)}) "
                   f"AND json_type(t.{qi(f.name)}) = 'array' THEN t.{qi(f.name)} ELSE '[]' END) j "
                   f"WHERE j.value NOT IN (SELECT id FROM {qi(target)})")
        else:
            sql = (f"SELECT id FROM {qi(coll.name)} WHERE {qi(f.name)} IS NOT NULL AND {qi(f.name)} != '' "
                   f"AND {qi(f.name)} NOT IN (SELECT id FROM {qi(target)})")
        n = src.query(f"SELECT count(*) FROM ({sql})")[0][0]
        if n:
            ex = [r[0] for r in src.query(f"SELECT DISTINCT * FROM ({sql}) LIMIT {EXAMPLES}")]
            out[f.name] = {"count": n, "target": target, "examples": ex}
    return out


def dangling_api(source: Source, coll: Collection, catalog: Catalog) -> dict[str, dict]:
    """API mode: the target id sets are held in memory (ids only)."""
    rels = [f for f in coll.fields if f.type == "relation" and f.target]
    if not rels:
        return {}
    ids: dict[str, set[str]] = {}
    checks = []  # (field, its position in the row, the target's id set), worked out once
    for f in rels:
        t = catalog.get(f.target)
        if t.name not in ids:
            ids[t.name] = set(source.ids(t))
        checks.append((f, coll.fields.index(f), ids[t.name]))
    out: dict[str, dict] = {}
    for row in source.rows(coll):
        for f, pos, known in checks:
            value = row[pos]
            refs = json.loads(value) if f.multi and value else ([value] if value else [])
            if any(r not in known for r in refs):
                _add(out, f.name, str(row[0]))
    return out


def duplicates_sqlite(src: SqliteSource, coll: Collection) -> list[dict]:
    """Groups that break (or, by letter case only, nearly break) a unique index. A unique index
    the snapshot itself holds (the same SQL in sqlite_master) is not scanned: SQLite enforced it on
    every write, so it has no duplicate group, and its GROUP BY cost a sort of the whole table."""
    out = []
    held = {r[0] for r in src.query("SELECT sql FROM sqlite_master WHERE type = 'index' AND tbl_name = ? "
                                    "AND sql IS NOT NULL", (coll.name,))}
    for sql in coll.indexes:
        m = INDEX_RE.match(sql)
        if not m or not m.group("unique") or sql in held:
            continue
        cols = re.sub(r"\s+(ASC|DESC)\b", "", m.group("cols"), flags=re.I)
        where = f"WHERE {m.group('where')}" if m.group("where") else ""
        q = f"SELECT count(*), sum(n) FROM (SELECT count(*) AS n FROM {qi(coll.name)} {where} GROUP BY {cols} " \
            "HAVING count(*) > 1)"
        try:
            groups, rows = src.query(q)[0]
        except Exception as exc:  # an index SQLite itself enforces can't be broken; report odd SQL
            out.append({"index": m.group("name"), "note": f"not checked: {exc}"})
            continue
        if groups:
            out.append({"index": m.group("name").strip('`"'), "groups": groups, "rows": rows})
    for f in coll.fields:
        if f.type == "email":
            q = (f"SELECT count(*), sum(n) FROM (SELECT count(*) AS n FROM {qi(coll.name)} WHERE {qi(f.name)} != '' "
                 f"GROUP BY lower({qi(f.name)}) HAVING count(DISTINCT {qi(f.name)}) > 1)")
            groups, rows = src.query(q)[0]
            if groups:
                out.append({"field": f.name, "case_only": True, "groups": groups, "rows": rows,
                            "note": "emails that differ only by letter case: they load, but the game may "
                                    "treat them as one account"})
    return out


def assess(source: Source, mapping: Mapping, collections: list[str] | None = None,
           bad: Callable[[Table], dict[str, dict]] | None = None) -> dict[str, Any]:
    """The full assessment as plain data (see `render` for the table a person reads); `bad` gives
    a table's bad values when they are known already (default: `bad_values`, a scan)."""
    catalog = source.catalog()
    plan: Plan = build_plan(catalog, mapping, collections=collections, has_secrets=source.has_secrets)
    report: dict[str, Any] = {
        "source_kind": source.kind,
        "generation": "0.22 (schema)" if catalog.generation == 22 else "0.23+ (fields)",
        "collections": [],
        "skipped": [{"collection": c, "reason": r} for c, r in plan.skipped],
        "skipped_tables": list(catalog.skipped_tables),
        "warnings": list(plan.warnings),
        "notes": [] if source.has_secrets else [API_SECRETS_NOTE],
    }
    for t in plan.tables:
        coll = t.collection
        entry = {
            "collection": coll.name,
            "type": coll.type,
            "table": t.name,
            "rows": source.count(coll),
            "fields": _fields(t),
            "bad_values": bad(t) if bad else bad_values(source, t),
            "dangling": (dangling_sqlite(source, coll, catalog) if isinstance(source, SqliteSource)
                         else dangling_api(source, coll, catalog)),
            "duplicates": duplicates_sqlite(source, coll) if isinstance(source, SqliteSource) else [],
            "has_updated": coll.updated_field is not None,
        }
        report["collections"].append(entry)
    for name, _select in plan.derived.items():
        report["warnings"].append(f"{name}: derived as a view, not copied")
    report["totals"] = {
        "rows": sum(c["rows"] for c in report["collections"]),
        "bad_values": sum(b["count"] for c in report["collections"] for b in c["bad_values"].values()),
        "dangling": sum(max(d["count"], 0) for c in report["collections"] for d in c["dangling"].values()),
        "without_updated": [c["collection"] for c in report["collections"] if not c["has_updated"]],
    }
    return report


def _fields(t: Table) -> list[dict]:
    out = [{"field": c.field.name, "pb_type": _pb_type(c.field), "column": c.name, "pg_type": c.type,
            **({"secret": True} if c.field.secret else {})} for c in t.columns]
    out += [{"field": j.field.name, "pb_type": _pb_type(j.field), "column": f"{j.table}({j.owner}, {j.target}, "
             "position)", "pg_type": "junction table"} for j in t.junctions]
    return out


def _pb_type(f) -> str:
    extra = " (multi)" if f.multi else ""
    if f.type == "number" and f.only_int:
        extra = " (onlyInt)"
    return f.type + extra


def render(report: dict[str, Any]) -> str:
    """A readable plain-text table for the task log and the terminal."""
    lines = [f"PocketBase {report['generation']} via {report['source_kind']}: "
             f"{report['totals']['rows']:,} rows in {len(report['collections'])} collections", ""]
    for c in report["collections"]:
        lines.append(f"== {c['collection']} ({c['type']}) -> {c['table']}: {c['rows']:,} rows"
                     + ("" if c["has_updated"] else "  [no 'updated' field: re-sync compares by checksum]"))
        width = max((len(f["field"]) for f in c["fields"]), default=5)
        for f in c["fields"]:
            rename = "" if f["column"] == f["field"] else f"  -> {f['column']}"
            secret = "  (secret: never logged)" if f.get("secret") else ""
            lines.append(f"   {f['field']:<{width}}  {f['pb_type']:<18} {f['pg_type']}{rename}{secret}")
        for key, b in c["bad_values"].items():
            lines.append(f"   ! will be rejected: {key}: {b['count']} rows, e.g. {', '.join(b['examples'])}")
        for fname, d in c["dangling"].items():
            lines.append(f"   ! dangling relation {fname}: {d['count']} rows, e.g. {', '.join(d.get('examples', []))}")
        for d in c["duplicates"]:
            what = d.get("index") or d.get("field")
            lines.append(f"   ! duplicates under {what}: {d.get('groups', '?')} groups, {d.get('rows', '?')} rows"
                         + (f" ({d['note']})" if d.get("note") else ""))
        lines.append("")
    if report["skipped"]:
        lines.append("Not copied: " + "; ".join(f"{s['collection']} ({s['reason']})" for s in report["skipped"]))
    if report["skipped_tables"]:
        lines.append("Other tables left behind: " + ", ".join(report["skipped_tables"]))
    lines.extend(f"Warning: {w}" for w in report["warnings"])
    lines.extend(f"NOTE: {n}" for n in report["notes"])
    t = report["totals"]
    lines.append(f"Totals: {t['rows']:,} rows, {t['bad_values']} bad values, {t['dangling']} dangling relations")
    return "\n".join(lines)


def assess_run(run: dict, pg_url: str, api: dict | None = None) -> dict:
    """The DAG's assessment task, after the load (whose rejects give the bad values): print the
    table, keep the JSON in pbm_meta.runs."""
    source = open_run_source(run, api)
    try:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            report = assess(source, load_mapping(run["params"]["mapping"]), run["params"]["collections"],
                            bad=lambda t: rejected_values(conn, run["run_id"], t))
            log.info("pre-migration assessment\n%s", render(report))
            meta.save_run_json(conn, run["run_id"], "assessment", report)
    finally:
        source.close()
    return report["totals"]

