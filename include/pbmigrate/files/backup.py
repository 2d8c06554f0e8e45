"""The pre-cut-over backup's manifest of the files it covers (the store itself is never deleted)."""

from __future__ import annotations

import json
from pathlib import Path

import psycopg

from pbmigrate.files.ledger import has_ledger


def manifest(conn: psycopg.Connection, run: dict, dest: Path) -> dict | None:
    """The pre-cut-over backup's list of the files it covers (key, size, sha256), as JSON lines.
    The store itself is never deleted, by a roll-back or anything else: the list says what it held."""
    if not has_ledger(conn):
        return None
    rows = conn.execute("SELECT collection, record_id, field, name, key, size, sha256, md5, content_type, store "
                        "FROM pbm_meta.files WHERE run_id = %s AND status = 'done' ORDER BY key",
                        (run["run_id"],)).fetchall()
    if not rows:
        return None
    dest.parent.mkdir(parents=True, exist_ok=True)
    total = 0
    stores = sorted({r[9] for r in rows})
    with open(dest, "w") as fh:
        fh.write(json.dumps({"store": stores[0] if len(stores) == 1 else stores, "files": len(rows)}) + "\n")
        for c, r, f, n, key, size, sha, md5, ctype, _ in rows:
            total += size or 0
            fh.write(json.dumps({"collection": c, "record": r, "field": f, "name": n, "key": key, "size": size,
                                 "sha256": sha, "md5": md5, "content_type": ctype}, ensure_ascii=False) + "\n")
    return {"path": str(dest), "bytes": total, "files": len(rows), "store": ", ".join(stores)}
