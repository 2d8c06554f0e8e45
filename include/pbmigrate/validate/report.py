"""The reconciliation report of one run: what was read, loaded, rejected (and why), proven, kept.

Why it is built from `pbm_meta` alone: every task that changes the run's fate (validation, the
gate, cut-over, hold, roll-back) writes it again, so the newest version always tells the whole
story, and a re-run task writes the same report. It is kept beside the run's snapshot as
Markdown (for people, and what `make demo` shows) and JSON (for tools), and in
`pbm_meta.runs.report`.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import Any

import psycopg

from pbmigrate import checksum, context
from pbmigrate.audit import meta
from pbmigrate.files import files_report

log = logging.getLogger("pbmigrate")
EXAMPLES = 5
REASONS_SHOWN = 10  # reject reasons listed per collection; the rest are summed up in one line


def report_paths(run: dict) -> dict[str, str]:
    d = context.run_dir(run["target_schema"], run["run_id"])
    return {"markdown": str(d / "report.md"), "json": str(d / "report.json")}


def _table_exists(conn: psycopg.Connection, qualified: str) -> bool:
    return conn.execute("SELECT to_regclass(%s) IS NOT NULL", (qualified,)).fetchone()[0]


def _iso(v: Any) -> str | None:
    return v.isoformat() if isinstance(v, datetime) else v


def _collections(conn: psycopg.Connection, run_id: str) -> list[dict[str, Any]]:
    rows = conn.execute(
        """SELECT collection, min(target_table), count(*), sum(rows_read), sum(rows_loaded), sum(junction_rows),
                  coalesce(sum(seconds), 0), min(finished_at - make_interval(secs => coalesce(seconds, 0))),
                  max(finished_at), array_agg(source_checksum), array_agg(checksum)
             FROM pbm_meta.batches WHERE run_id = %s GROUP BY collection ORDER BY collection""",
        (run_id,)).fetchall()
    out = []
    for coll, table, batches, read, loaded, jrows, secs, first, last, src_sums, sums in rows:
        out.append({
            "collection": coll, "table": table, "batches": batches, "rows_read": int(read),
            "rows_loaded_by_batches": int(loaded), "junction_rows": int(jrows),
            "load_seconds": round(float(secs), 3),
            "rows_per_s": round(int(read) / float(secs)) if secs else None,
            "load_wall_seconds": round((last - first).total_seconds(), 3) if first and last else None,
            "source_checksum": checksum.as_hex(sum(int(s, 16) for s in src_sums)),
            "expected_checksum": checksum.as_hex(sum(int(s, 16) for s in sums)),
        })
    return out


def _rejects(conn: psycopg.Connection, run_id: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for coll, n in conn.execute(  # records with a missing file are loaded: listed by reason, not counted here
            "SELECT collection, count(DISTINCT record_id) FILTER (WHERE stage <> 'files') FROM pbm_meta.rejects "
            "WHERE run_id = %s GROUP BY 1", (run_id,)):
        out[coll] = {"records": int(n), "by_reason": []}
    # reasons read "kind: detail" (the detail names the value): grouped by kind, one detail kept
    for coll, stage, fld, kind, n, examples, detail in conn.execute(
        """SELECT collection, stage, field, split_part(reason, ': ', 1), count(DISTINCT record_id),
                  (array_agg(DISTINCT record_id ORDER BY record_id))[1:%s], min(reason)
             FROM pbm_meta.rejects WHERE run_id = %s GROUP BY 1, 2, 3, 4 ORDER BY 1, 5 DESC, 2, 3, 4""",
            (EXAMPLES, run_id)):
        out[coll]["by_reason"].append({"stage": stage, "field": fld, "reason": kind, "records": int(n),
                                       "examples": list(examples), "sample": detail})
    return out


def _checks(conn: psycopg.Connection, run_id: str) -> list[dict[str, Any]]:
    return [{"table": t, "check": c, "success": s, "observed": o} for t, c, s, o in conn.execute(
        "SELECT target_table, check_name, success, observed FROM pbm_meta.checks WHERE run_id = %s ORDER BY id",
        (run_id,))]


def build(conn: psycopg.Connection, run: dict) -> dict[str, Any]:
    """The report as plain data, from pbm_meta (and the validation summary file, for timings)."""
    run_id = run["run_id"]
    row = conn.execute(
        """SELECT status, started_at, finished_at, source, source_kind, snapshot_path, staging_schema, params
             FROM pbm_meta.runs WHERE run_id = %s""", (run_id,)).fetchone()
    if row is None:
        raise ValueError(f"run {run_id!r} is not in pbm_meta.runs")
    status, started, finished, source, kind, snapshot, staging, params = row
    checks = _checks(conn, run_id)
    gate = next((c["observed"] | {"promote": c["success"]} for c in checks if c["check"] == "gate"), None)
    by_table: dict[str, dict[str, dict]] = {}
    for c in checks:
        by_table.setdefault(c["table"], {})[c["check"]] = c
    rejects = _rejects(conn, run_id)
    orphans: dict[str, list[dict]] = {}
    for coll, fld, target, mode, n, examples in conn.execute(
            "SELECT collection, field, target, mode, count, examples FROM pbm_meta.orphans WHERE run_id = %s "
            "ORDER BY 1, 2", (run_id,)):
        orphans.setdefault(coll, []).append({"field": fld, "target": target, "mode": mode, "count": int(n),
                                             "examples": list(examples)})
    collections = _collections(conn, run_id)
    stored = files_report(conn, run_id)
    for c in collections:
        c["files"] = stored.get(c["collection"])
        fcheck = by_table.get(c["table"], {}).get("files")
        c["files_check"] = fcheck["success"] if fcheck else None
        mine = by_table.get(c["table"], {})
        rej = rejects.get(c["collection"], {"records": 0, "by_reason": []})
        c["rejected"] = rej["records"]
        c["rejects"] = rej["by_reason"]
        c["expected_rows"] = c["rows_read"] - rej["records"]
        rc = mine.get("row_count")
        c["target_rows"] = rc["observed"].get("observed_value") if rc else None
        src = mine.get("source_rows")
        c["source_rows"] = src["observed"].get("source") if src else None
        sums = mine.get("checksums")
        c["checksum"] = ({"ok": sums["success"], **{k: sums["observed"].get(k) for k in
                          ("batches", "mismatched", "expected", "actual", "examples")}} if sums else None)
        c["orphans"] = orphans.get(c["collection"], [])
        c["checks_failed"] = [{"check": k, "observed": v["observed"]} for k, v in mine.items() if not v["success"]]
        c["checks_passed"] = sum(1 for v in mine.values() if v["success"])
    validation_file = context.run_dir(run["target_schema"], run["run_id"]) / "validation" / "summary.json"
    validation = json.loads(validation_file.read_text()) if validation_file.is_file() else None
    backups = []
    if _table_exists(conn, "pbm_meta.backups"):
        backups = [{"kind": k, "of": s, "path": p, "bytes": b, "seconds": sec, "at": _iso(at)}
                   for k, s, p, b, sec, at in conn.execute(
                       "SELECT kind, source_name, path, bytes, seconds, created_at FROM pbm_meta.backups "
                       "WHERE run_id = %s ORDER BY id", (run_id,))]
    events = [{"action": a, "backend": b, "previous_schema": p, "reason": r, "at": _iso(at)}
              for a, b, p, r, at in conn.execute(
                  "SELECT action, backend, previous_schema, reason, at FROM pbm_meta.cutovers WHERE run_id = %s "
                  "ORDER BY id", (run_id,))]
    flag = None
    if _table_exists(conn, "pbm_meta.flags"):
        got = conn.execute("SELECT value, run_id, set_at FROM pbm_meta.flags WHERE name = 'pbm:backend'").fetchone()
        flag = {"value": got[0], "run_id": got[1], "set_at": _iso(got[2])} if got else None
    read = sum(c["rows_read"] for c in collections)
    rejected = sum(c["rejected"] for c in collections)
    (wall,) = conn.execute(
        """SELECT extract(epoch FROM max(finished_at) - min(finished_at - make_interval(secs => coalesce(seconds, 0))))
             FROM pbm_meta.batches WHERE run_id = %s""", (run_id,)).fetchone()
    return {
        "run_id": run_id,
        "status": status,
        "target_schema": run["target_schema"],
        "staging_schema": staging,
        "source": source,
        "source_kind": kind,
        "snapshot_path": snapshot,
        "params": params,
        "started_at": _iso(started),
        "finished_at": _iso(finished),
        "totals": {
            "collections": len(collections),
            "rows_read": read,
            "rows_rejected": rejected,
            "rows_expected": read - rejected,
            "reject_ratio": round(rejected / read, 6) if read else 0.0,
            "load_seconds": round(sum(c["load_seconds"] for c in collections), 3),
            "checks": sum(1 for c in checks if c["check"] != "gate"),
            "checks_failed": sum(1 for c in checks if c["check"] != "gate" and not c["success"]),
            "files": sum(v["files"] for v in stored.values()),
            "file_bytes": sum(v["bytes"] for v in stored.values()),
        },
        "load_wall_seconds": round(float(wall), 3) if wall is not None else None,
        "collections": collections,
        "validation": validation and {k: validation.get(k) for k in ("success", "checks", "failed", "seconds",
                                                                     "results", "data_docs")},
        "gate": gate,
        "backups": backups,
        "events": events,
        "flag": flag,
        "report": report_paths(run),
    }


def _n(v: Any) -> str:
    return "-" if v is None else (f"{v:,}" if isinstance(v, int) else str(v))


def render_markdown(rep: dict[str, Any]) -> str:
    """The report a person reads: outcome first, then per collection, then the evidence."""
    t = rep["totals"]
    gate = rep["gate"]
    lines = [f"# Migration report: run `{rep['run_id']}`", ""]
    lines.append(f"- **Status: {rep['status']}**; target schema `{rep['target_schema']}` "
                 f"(staging `{rep['staging_schema']}`)")
    snapshot = f"`{rep['snapshot_path']}`" if rep["snapshot_path"] else "- (API mode: see Backups)"
    lines.append(f"- Source: `{rep['source']}` ({rep['source_kind']}); snapshot {snapshot}")
    lines.append(f"- Started {rep['started_at']}, finished {rep['finished_at'] or '-'}")
    lines.append(f"- Rows read {t['rows_read']:,}, rejected {t['rows_rejected']:,} "
                 f"(ratio {t['reject_ratio']:.4%}), expected in target {t['rows_expected']:,}")
    lines.append(f"- Checks: {t['checks'] - t['checks_failed']} of {t['checks']} passed; load "
                 f"{_n(rep['load_wall_seconds'])} s wall clock ({t['load_seconds']:.1f} s in batch tasks)")
    if gate:
        verdict = "PROMOTE" if gate["promote"] else "REFUSE"
        lines.append(f"- Gate: **{verdict}** (reject ratio {gate.get('reject_ratio', 0):.4%}, "
                     f"max {gate.get('max_reject_ratio', 0):.4%})")
        lines.extend(f"  - {r}" for r in gate.get("reasons", []))
    if rep["flag"]:
        lines.append(f"- Feature flag `pbm:backend` = **{rep['flag']['value']}** (set {rep['flag']['set_at']})")
    lines += ["", "## Collections", "",
              "| collection | table | source rows | read | loaded | rejected | checksum | orphans | batches "
              "| load s | rows/s |",
              "|---|---|--:|--:|--:|--:|---|--:|--:|--:|--:|"]
    for c in rep["collections"]:
        cs = c["checksum"]
        cs_text = "-" if cs is None else ("ok" if cs["ok"] else f"**MISMATCH** {cs['mismatched']}/{cs['batches']}")
        orphans = sum(o["count"] for o in c["orphans"])
        lines.append(f"| {c['collection']} | {c['table']} | {_n(c['source_rows'])} | {c['rows_read']:,} | "
                     f"{_n(c['target_rows'])} | {c['rejected']:,} | {cs_text} | {orphans:,} | {c['batches']} | "
                     f"{c['load_seconds']:.1f} | {_n(c['rows_per_s'])} |")
    with_files = [c for c in rep["collections"] if c.get("files")]
    if with_files:
        lines += ["", "## Files", "", "| collection | files | bytes | missing from the source |", "|---|--:|--:|--:|"]
        lines.extend(f"| {c['collection']} | {c['files']['files']:,} | {c['files']['bytes']:,} | "
                     f"{c['files']['missing']:,} |" for c in with_files)
        checked = [c for c in with_files if c.get("files_check") is not None]
        failed = [c["collection"] for c in checked if not c["files_check"]]
        if failed:
            lines.append(f"\nValidation re-read every object: **FAILED** for {', '.join(failed)} (see Failed checks).")
        elif checked:
            lines.append("\nValidation re-read every object: size, sha256 and PocketBase's md5 as recorded.")
    rejected = [c for c in rep["collections"] if c["rejects"]]
    if rejected:
        lines += ["", "## Rejected records", ""]
        for c in rejected:
            lines.append(f"**{c['collection']}** ({c['rejected']:,} records)")
            for r in c["rejects"][:REASONS_SHOWN]:
                sample = f" (first: {r['sample']})" if r["sample"] != r["reason"] else ""
                lines.append(f"- {r['records']:,} x `{r['field']}` ({r['stage']}): {r['reason']}; "
                             f"e.g. {', '.join(r['examples'])}{sample}")
            rest = c["rejects"][REASONS_SHOWN:]
            if rest:
                lines.append(f"- and {sum(r['records'] for r in rest):,} more under {len(rest)} other reasons "
                             "(report.json lists them all)")
    orphaned = [c for c in rep["collections"] if c["orphans"]]
    if orphaned:
        lines += ["", "## Dangling relations", ""]
        for c in orphaned:
            for o in c["orphans"]:
                lines.append(f"- {c['collection']}.{o['field']} -> {o['target']}: {o['count']:,} ({o['mode']}); "
                             f"e.g. {', '.join(o['examples'])}")
    failed = [(c["table"], f) for c in rep["collections"] for f in c["checks_failed"]]
    if failed:
        lines += ["", "## Failed checks", ""]
        lines.extend(f"- {table}: `{f['check']}` {json.dumps(f['observed'], default=str)}" for table, f in failed)
    v = rep["validation"]
    if v:
        s = v.get("seconds") or {}
        lines += ["", "## Validation", "",
                  f"- {v['checks']} checks in {s.get('total', 0):.1f} s (checksums {s.get('checksums', 0):.1f} s, "
                  f"GX {s.get('gx', 0):.1f} s)",
                  f"- Full results: `{v['results']}`", f"- GX Data Docs: `{v['data_docs']}`"]
    if rep["backups"]:
        lines += ["", "## Backups", ""]
        lines.extend(f"- {b['kind']} `{b['of']}`: `{b['path']}` ({_n(b['bytes'])} bytes)" for b in rep["backups"])
    if rep["events"]:
        lines += ["", "## Cut-over log", ""]
        lines.extend(f"- {e['at']}: {e['action']} (flag {e['backend']}"
                     + (f", previous schema `{e['previous_schema']}`" if e["previous_schema"] else "") + ")"
                     + (f": {e['reason']}" if e["reason"] else "") for e in rep["events"])
    lines += ["", f"Report: `{rep['report']['markdown']}` and `{rep['report']['json']}`", ""]
    return "\n".join(lines)


def write(conn: psycopg.Connection, run: dict) -> dict[str, Any]:
    """Build, write the Markdown and JSON files and pbm_meta.runs.report; returns the report."""
    rep = build(conn, run)
    d = context.run_dir(run["target_schema"], run["run_id"])
    d.mkdir(parents=True, exist_ok=True)
    (d / "report.json").write_text(json.dumps(rep, indent=1, default=str))
    (d / "report.md").write_text(render_markdown(rep))
    meta.save_run_json(conn, run["run_id"], "report", json.loads(json.dumps(rep, default=str)))
    return rep


def publish(run: dict, pg_url: str) -> dict[str, Any]:
    """Write the report and print it to the task log (the last thing a run's log shows)."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        rep = write(conn, run)
    log.info("reconciliation report (%s)\n%s", rep["report"]["markdown"], render_markdown(rep))
    return {"status": rep["status"], "totals": rep["totals"], **rep["report"]}
