"""The audit schema `pbm_meta` at run time: runs, batches (the ledger), rejects, checks (tables: `migrations`).

Runbooks and dashboards query these names; add columns freely, rename nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import psycopg

from pbmigrate.audit import migrations


def exists(conn: psycopg.Connection) -> bool:
    """Whether pbm_meta has been created here (looking writes nothing)."""
    return conn.execute("SELECT to_regclass('pbm_meta.runs') IS NOT NULL").fetchone()[0]


def ensure_meta(conn: psycopg.Connection) -> None:
    """Create or bring up to date every pbm_meta table (idempotent, safe when parallel tasks race)."""
    migrations.migrate(conn)


def start_run(conn: psycopg.Connection, run: dict[str, Any]) -> None:
    with conn.transaction():
        conn.execute(
            """INSERT INTO pbm_meta.runs (run_id, dag_run_id, target_schema, staging_schema, source,
                   source_kind, snapshot_path, params, status)
               VALUES (%(run_id)s, %(dag_run_id)s, %(target_schema)s, %(staging_schema)s, %(source)s,
                   %(source_kind)s, %(snapshot_path)s, %(params)s, 'running')
               ON CONFLICT (run_id) DO UPDATE SET dag_run_id = EXCLUDED.dag_run_id, status = 'running',
                   finished_at = NULL""",
            {**run, "params": json.dumps(run.get("params", {}))},
        )


def set_run_status(conn: psycopg.Connection, run_id: str, status: str, finished: bool = False) -> None:
    with conn.transaction():
        conn.execute(
            "UPDATE pbm_meta.runs SET status = %s, finished_at = CASE WHEN %s THEN now() END WHERE run_id = %s",
            (status, finished, run_id),
        )


def save_run_json(conn: psycopg.Connection, run_id: str, column: str, value: Any) -> None:
    if column not in ("assessment", "report"):
        raise ValueError(column)
    with conn.transaction():
        conn.execute(f"UPDATE pbm_meta.runs SET {column} = %s WHERE run_id = %s", (json.dumps(value), run_id))


def resumable_run(conn: psycopg.Connection, target_schema: str, params: dict[str, Any]) -> dict | None:
    """The latest unfinished run for this target with the same params: re-triggering resumes it."""
    row = conn.execute(
        """SELECT run_id, snapshot_path, params, status FROM pbm_meta.runs
            WHERE target_schema = %s ORDER BY started_at DESC LIMIT 1""",
        (target_schema,),
    ).fetchone()
    if row is None or row[3] not in ("running", "failed") or row[2] != params:
        return None
    return {"run_id": row[0], "snapshot_path": row[1]}


def done_batches(conn: psycopg.Connection, run_id: str) -> set[tuple[str, str]]:
    rows = conn.execute(
        "SELECT collection, lo FROM pbm_meta.batches WHERE run_id = %s AND status = 'done'", (run_id,)
    ).fetchall()
    return {(c, lo) for c, lo in rows}


@dataclass
class Check:
    """One validation result, as `pbm_meta.checks` records it."""

    table: str
    name: str
    success: bool
    observed: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"table": self.table, "check": self.name, "success": self.success, "observed": self.observed}


def cut_over_in_effect(conn: psycopg.Connection, target: str) -> dict | None:
    """The cut-over the live schema comes from: cut-overs stack up, each roll-back pops one."""
    stack: list[dict] = []
    for run_id, action, previous, at in conn.execute(
            """SELECT run_id, action, previous_schema, at FROM pbm_meta.cutovers
                WHERE target_schema = %s AND action IN ('cutover', 'rollback') ORDER BY id""", (target,)):
        if action == "cutover":
            stack.append({"run_id": run_id, "previous_schema": previous, "at": at})
        elif stack:
            stack.pop()
    return stack[-1] if stack else None
