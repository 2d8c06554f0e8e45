"""The gate, the cut-over, the roll-back and the backups taken before a cut-over.

Schemas of one target `T`:

- `T`: live, what the game server reads once the flag says `postgres`;
- `T_staging`: loaded and validated by a run, waiting for the gate (or for a manual cut-over);
- `T_previous`: the live schema before the last cut-over, kept so a roll-back is a rename.
  Only one is kept as a schema (a cut-over drops the older one); every cut-over first writes a
  `pg_dump` of the live schema into its run's folder, so older states survive as files;
- `T_rolled_back`: what the last roll-back took out of service, kept for inspection until the
  next roll-back replaces it.

Why the flag moves last on a cut-over and first on a roll-back: the game server should only ever
be pointed at data that is in place, and pointed away from bad data at once. If Redis fails after
a committed swap, the game server still uses PocketBase (safe) and a retry only sets the flag.
Every step checks what is already done, so a retried task ends the same.

`pbm_meta.cutovers` actions: `cutover` (staging became live), `rollback` (a cut-over undone) and
`discard` (a staging schema dropped without ever going live; the flag is left as it was).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.types.json import Jsonb

from pbmigrate.audit import meta, metrics
from pbmigrate.audit.meta import cut_over_in_effect
from pbmigrate.cache.client import connect
from pbmigrate.cache.keys import get_backend, set_backend
from pbmigrate.context import run_dir
from pbmigrate.errors import ParamError, PbmError, Refused
from pbmigrate.files import manifest
from pbmigrate.pgsql import qi
from pbmigrate.plan.ddl import previous_schema, schema_exists, staging_schema
from pbmigrate.validate import report

log = logging.getLogger("pbmigrate")

MODES = ("auto", "manual")
ACTIONS = ("cutover", "rollback")
FLAG = "pbm:backend"
LOCK_TIMEOUT = "10s"  # a swap waits this long for the game server's locks, then fails (and is retried)
GATE_REASONS_SHOWN = 10



class PromotionRefused(Refused):
    """The gate refused the run; staging was rolled back and the run must end failed."""


def _lock(conn: psycopg.Connection, target: str) -> None:
    """One cut-over or roll-back per target at a time (transaction-scoped)."""
    conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (f"pbm_cutover:{target}",))


# --------------------------------------------------------------------------- the gate


def gate(run: dict, pg_url: str, max_reject_ratio: float) -> dict[str, Any]:
    """Promote only when every recorded check passed and rejects stay within the ratio.

    The verdict is itself recorded as the check `gate` (table `*`), which a later manual
    cut-over requires.
    """
    run_id = run["run_id"]
    with psycopg.connect(pg_url, autocommit=True) as conn:
        meta.ensure_meta(conn)
        checks = conn.execute(
            "SELECT target_table, check_name, success FROM pbm_meta.checks WHERE run_id = %s AND check_name <> 'gate' "
            "ORDER BY id", (run_id,)).fetchall()
        (read,) = conn.execute("SELECT coalesce(sum(rows_read), 0)::bigint FROM pbm_meta.batches WHERE run_id = %s",
                               (run_id,)).fetchone()
        (rejected,) = conn.execute(
            "SELECT count(*) FROM (SELECT DISTINCT collection, record_id FROM pbm_meta.rejects WHERE run_id = %s) r",
            (run_id,)).fetchone()
        failed = [f"{t}: {c}" for t, c, ok in checks if not ok]
        ratio = rejected / read if read else 0.0
        reasons = []
        if not checks:
            reasons.append("no validation results for this run")
        if failed:
            shown = ", ".join(failed[:GATE_REASONS_SHOWN])
            more = f" and {len(failed) - GATE_REASONS_SHOWN} more" if len(failed) > GATE_REASONS_SHOWN else ""
            reasons.append(f"{len(failed)} of {len(checks)} checks failed: {shown}{more}")
        if ratio > max_reject_ratio:
            reasons.append(f"{rejected:,} of {read:,} records rejected ({ratio:.4%}), more than max_reject_ratio "
                           f"{max_reject_ratio:.4%}")
        verdict = {"run_id": run_id, "promote": not reasons, "reasons": reasons, "checks": len(checks),
                   "failed_checks": len(failed), "rows_read": int(read), "rejected": int(rejected),
                   "reject_ratio": round(ratio, 6), "max_reject_ratio": float(max_reject_ratio)}
        with conn.transaction():
            conn.execute("DELETE FROM pbm_meta.checks WHERE run_id = %s AND check_name = 'gate'", (run_id,))
            conn.execute(
                "INSERT INTO pbm_meta.checks (run_id, target_table, check_name, success, observed) "
                "VALUES (%s, '*', 'gate', %s, %s)",
                (run_id, verdict["promote"], Jsonb(
                    {k: v for k, v in verdict.items() if k not in ("run_id", "promote")})))
            conn.execute("UPDATE pbm_meta.runs SET status = %s WHERE run_id = %s",
                         ("validated" if verdict["promote"] else "refused", run_id))
    if verdict["promote"]:
        log.info("gate: PROMOTE run %s (%d checks passed, reject ratio %.4f%% <= %.4f%%)", run_id, len(checks),
                 ratio * 100, max_reject_ratio * 100)
    else:
        log.warning("gate: REFUSE run %s\n  %s", run_id, "\n  ".join(reasons))
    return verdict


def decide(verdict: dict, mode: str = "auto", *, cut_over: str = "cut_over", hold: str = "hold",
           roll_back: str = "roll_back") -> str:
    """The branch: the task id to follow (the DAG passes its own task ids)."""
    if mode not in MODES:
        raise ParamError(f"param cutover must be one of {MODES}, not {mode!r}")
    if not verdict["promote"]:
        return roll_back
    return cut_over if mode == "auto" else hold


def follow(verdict: dict, then: Sequence[str], roll_back: str = "roll_back") -> str | list[str]:
    """The migration DAG's branch at the gate: `then` (the task ids of the cache warm-up, the load
    test when param loadtest is on, and the marker of the end `decide` picks; cut over or hold come
    after them) or roll back."""
    return list(then) if verdict["promote"] else roll_back


# --------------------------------------------------------------------------- backups


def _pg_env(pg_url: str) -> tuple[str, dict[str, str]]:
    """Conninfo without the password (argv is visible to every user) and an env that carries it."""
    params = conninfo_to_dict(pg_url)
    env = dict(os.environ)
    password = params.pop("password", None)
    if password:
        env["PGPASSWORD"] = str(password)
    return make_conninfo(**params), env


def _binary(name: str) -> str:
    found = os.environ.get(f"PBM_{name.upper()}") or shutil.which(name) or f"/usr/bin/{name}"
    if not Path(found).is_file():
        raise PbmError(f"{name} not found (set PBM_{name.upper()} to its path); it is needed for backups")
    return found


def dump_schema(pg_url: str, schema: str, dest: Path) -> dict[str, Any]:
    """pg_dump -Fc of one schema (with its privileges), to restore with pg_restore."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    conninfo, env = _pg_env(pg_url)
    started = time.monotonic()
    proc = subprocess.run([_binary("pg_dump"), "--schema", schema, "-Fc", "-f", str(dest), "-d", conninfo],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise PbmError(f"pg_dump of schema {schema!r} failed: {proc.stderr.strip()[-500:]}")
    return {"path": str(dest), "bytes": dest.stat().st_size, "seconds": round(time.monotonic() - started, 3)}


def restore_schema(pg_url: str, path: str) -> None:
    """pg_restore a dump made by `dump_schema` (the schema must not exist), in one transaction."""
    conninfo, env = _pg_env(pg_url)
    proc = subprocess.run([_binary("pg_restore"), "--exit-on-error", "--single-transaction", "-d", conninfo, path],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise PbmError(f"pg_restore of {path} failed: {proc.stderr.strip()[-500:]}")


def _record_backup(conn: psycopg.Connection, run: dict, kind: str, name: str, info: dict) -> dict:
    conn.execute(
        """INSERT INTO pbm_meta.backups (run_id, target_schema, kind, source_name, path, bytes, seconds)
           VALUES (%s, %s, %s, %s, %s, %s, %s)""",
        (run["run_id"], run["target_schema"], kind, name, info["path"], info.get("bytes"), info.get("seconds")))
    return {"kind": kind, "of": name, **info}


def backup(conn: psycopg.Connection, run: dict, pg_url: str) -> list[dict]:
    """Before a cut-over: pg_dump the live schema (if there is one) and keep the source snapshot."""
    target = run["target_schema"]
    folder = run_dir(run["target_schema"], run["run_id"]) / "backups"
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    done = []
    if schema_exists(conn, target):
        info = dump_schema(pg_url, target, folder / f"{target}-{stamp}.dump")
        done.append(_record_backup(conn, run, "schema", target, info))
        log.info("backup: schema %s -> %s (%s bytes, %.1f s)", target, info["path"], f"{info['bytes']:,}",
                 info["seconds"])
    else:
        log.info("backup: no live schema %s yet, nothing to dump", target)
    files = manifest(conn, run, folder / f"files-{stamp}.jsonl")
    if files is not None:  # the store itself stays: no roll-back deletes it
        info = {"path": files["path"], "bytes": files["bytes"]}
        done.append(_record_backup(conn, run, "files", files["store"], info))
        log.info("backup: %s files (%s bytes) in %s, listed in %s", f"{files['files']:,}", f"{files['bytes']:,}",
                 files["store"], files["path"])
    snapshot = run.get("snapshot_path")
    candidates = [Path(snapshot)] if snapshot else sorted(run_dir(run["target_schema"], run["run_id"]).glob("*.zip"))
    source = next((p for p in candidates if p.is_file()), None)
    if source is None:
        log.warning("backup: the source snapshot of run %s is gone; PocketBase itself is the only copy",
                    run["run_id"])
    else:
        done.append(_record_backup(conn, run, "source", run.get("source") or "pocketbase",
                                   {"path": str(source), "bytes": source.stat().st_size}))
        log.info("backup: source snapshot kept at %s", source)
    return done


# --------------------------------------------------------------------------- flag


def flag_value(conn: psycopg.Connection) -> str:
    """The backend the flag names, from pbm_meta's mirror (`pocketbase` until a cut-over)."""
    row = conn.execute("SELECT value FROM pbm_meta.flags WHERE name = %s", (FLAG,)).fetchone()
    return row[0] if row else "pocketbase"


def _mirror_flag(conn: psycopg.Connection, backend: str, target: str, run_id: str | None) -> None:
    conn.execute(
        """INSERT INTO pbm_meta.flags (name, value, target_schema, run_id) VALUES (%s, %s, %s, %s)
           ON CONFLICT (name) DO UPDATE SET value = EXCLUDED.value, target_schema = EXCLUDED.target_schema,
               run_id = EXCLUDED.run_id, set_at = now()""",
        (FLAG, backend, target, run_id))


def set_redis_flag(redis_url: str, backend: str) -> str | None:
    """Tell the game server which backend to use; returns what the flag said before."""
    client = connect(redis_url)
    try:
        previous = set_backend(client, backend)
    finally:
        client.close()
    metrics.push_backend_flag(backend)
    log.info("feature flag %s: %s -> %s", FLAG, previous, backend)
    return previous


# --------------------------------------------------------------------------- cut-over


def copy_grants(conn: psycopg.Connection, source: str, dest: str) -> int:
    """Give `dest` the privileges other roles hold on `source` (schema and same-named tables),
    so the game server's role can read the new live schema the moment it is renamed."""
    grants = conn.execute(
        """SELECT format('GRANT %%s ON SCHEMA %%I TO %%s', a.privilege_type, %s::text,
                         CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END)
             FROM pg_namespace n, aclexplode(n.nspacl) a
            WHERE n.nspname = %s AND a.grantee <> n.nspowner
           UNION ALL
           SELECT format('GRANT %%s ON %%I.%%I TO %%s', a.privilege_type, %s::text, c.relname,
                         CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE a.grantee::regrole::text END)
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace, aclexplode(c.relacl) a
            WHERE n.nspname = %s AND a.grantee <> c.relowner AND c.relkind IN ('r', 'v', 'p')
              AND EXISTS (SELECT 1 FROM pg_class d JOIN pg_namespace m ON m.oid = d.relnamespace
                           WHERE m.nspname = %s AND d.relname = c.relname)""",
        (dest, source, dest, source, dest)).fetchall()
    for (stmt,) in grants:
        conn.execute(stmt)
    return len(grants)


def _latest_run(conn: psycopg.Connection, target: str) -> tuple[str, str] | None:
    return conn.execute("SELECT run_id, status FROM pbm_meta.runs WHERE target_schema = %s "
                        "ORDER BY started_at DESC LIMIT 1", (target,)).fetchone()


def _gate_passed(conn: psycopg.Connection, run_id: str) -> bool:
    row = conn.execute("SELECT success FROM pbm_meta.checks WHERE run_id = %s AND check_name = 'gate' "
                       "ORDER BY id DESC LIMIT 1", (run_id,)).fetchone()
    return bool(row and row[0])


def swap(conn: psycopg.Connection, run: dict, backups: list[dict]) -> dict[str, Any]:
    """In one transaction: live -> previous (dropping the older previous), staging -> live, recorded."""
    target, run_id = run["target_schema"], run["run_id"]
    staging, previous = staging_schema(target), previous_schema(target)
    with conn.transaction():
        conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        _lock(conn, target)
        if not schema_exists(conn, staging):
            raise PbmError(f"cut-over of run {run_id}: staging schema {staging} does not exist")
        had_live = schema_exists(conn, target)
        grants = 0
        if had_live:
            grants = copy_grants(conn, target, staging)
            conn.execute(f"DROP SCHEMA IF EXISTS {qi(previous)} CASCADE")
            conn.execute(f"ALTER SCHEMA {qi(target)} RENAME TO {qi(previous)}")
        conn.execute(f"ALTER SCHEMA {qi(staging)} RENAME TO {qi(target)}")
        dump = next((b["path"] for b in backups if b["kind"] == "schema"), None)
        conn.execute(
            """INSERT INTO pbm_meta.cutovers (run_id, target_schema, action, backend, previous_schema, reason)
               VALUES (%s, %s, 'cutover', 'postgres', %s, %s)""",
            (run_id, target, previous if had_live else None, f"backup {dump}" if dump else "no live schema before"))
        _mirror_flag(conn, "postgres", target, run_id)
        conn.execute("UPDATE pbm_meta.runs SET status = 'promoted', finished_at = now() WHERE run_id = %s",
                     (run_id,))
    log.info("cut-over: %s -> %s%s (%d grants carried over)", staging, target,
             f", old live kept as {previous}" if had_live else "", grants)
    return {"previous_schema": previous if had_live else None, "grants": grants}


def cut_over(run: dict, pg_url: str, redis_url: str) -> dict[str, Any]:
    """Backups, the swap and the flag; a retry after a committed swap only sets the flag again."""
    target, run_id = run["target_schema"], run["run_id"]
    with psycopg.connect(pg_url, autocommit=True) as conn:
        meta.ensure_meta(conn)
        effect = cut_over_in_effect(conn, target)
        if effect and effect["run_id"] == run_id and not schema_exists(conn, staging_schema(target)):
            log.info("cut-over of run %s was already committed; setting the flag again", run_id)
            result: dict[str, Any] = {"previous_schema": effect["previous_schema"], "already": True}
        else:
            latest = _latest_run(conn, target)
            if latest is None or latest[0] != run_id:
                raise PbmError(f"run {run_id} is not the latest run for {target} ({latest and latest[0]}); "
                               "its staging schema may have been replaced")
            if not _gate_passed(conn, run_id):
                raise PbmError(f"run {run_id} has not passed the gate; refusing to cut over")
            conn.execute("SELECT pg_advisory_lock(hashtextextended(%s, 1))", (f"pbm_cutover:{target}",))
            try:
                backups = backup(conn, run, pg_url)
                result = swap(conn, run, backups) | {"backups": backups}
            finally:
                conn.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 1))", (f"pbm_cutover:{target}",))
    result["flag_before"] = set_redis_flag(redis_url, "postgres")
    result.update(action="cutover", run_id=run_id, target_schema=target, backend="postgres")
    return result


# --------------------------------------------------------------------------- roll-back


def _finish_run(conn: psycopg.Connection, run_id: str | None, status: str) -> None:
    if run_id:
        conn.execute("UPDATE pbm_meta.runs SET status = %s, finished_at = now() WHERE run_id = %s", (status, run_id))


def redis_flag(redis_url: str) -> str:
    """What the flag says in Redis now (`pocketbase` until it was ever set)."""
    client = connect(redis_url)
    try:
        return get_backend(client)
    finally:
        client.close()


def discard(conn: psycopg.Connection, target: str, run_id: str | None, reason: str,
            redis_url: str | None = None) -> dict[str, Any]:
    """Drop the staging schema of a run that never went live; the live schema and the flag stay."""
    staging = staging_schema(target)
    backend = redis_flag(redis_url) if redis_url else flag_value(conn)  # recorded, never changed
    with conn.transaction():
        _lock(conn, target)
        existed = schema_exists(conn, staging)
        conn.execute(f"DROP SCHEMA IF EXISTS {qi(staging)} CASCADE")
        conn.execute(
            """INSERT INTO pbm_meta.cutovers (run_id, target_schema, action, backend, previous_schema, reason)
               VALUES (%s, %s, 'discard', %s, NULL, %s)""", (run_id, target, backend, reason))
        _finish_run(conn, run_id, "rolled_back")
    log.warning("roll-back: %s %s; live schema %s and the flag (%s) are unchanged", staging,
                "dropped" if existed else "was already gone", target, backend)
    return {"action": "discard", "run_id": run_id, "target_schema": target, "staging_dropped": existed,
            "backend": backend}


def undo(conn: psycopg.Connection, target: str, effect: dict, pg_url: str, redis_url: str,
         reason: str) -> dict[str, Any]:
    """Undo a cut-over: live -> rolled_back, previous (or its pg_dump) -> live, flag -> pocketbase."""
    previous, aside = previous_schema(target), f"{target}_rolled_back"
    restore_from = None
    flag_before = set_redis_flag(redis_url, "pocketbase")  # first: the game server leaves the bad data now
    with conn.transaction():
        conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        _lock(conn, target)
        if schema_exists(conn, target):
            conn.execute(f"DROP SCHEMA IF EXISTS {qi(aside)} CASCADE")
            conn.execute(f"ALTER SCHEMA {qi(target)} RENAME TO {qi(aside)}")
        if schema_exists(conn, previous):
            conn.execute(f"ALTER SCHEMA {qi(previous)} RENAME TO {qi(target)}")
            restored = f"schema {previous}"
        elif effect["previous_schema"]:
            row = conn.execute(
                """SELECT path FROM pbm_meta.backups WHERE run_id = %s AND kind = 'schema' AND source_name = %s
                    ORDER BY id DESC LIMIT 1""", (effect["run_id"], target)).fetchone()
            if row is None or not Path(row[0]).is_file():
                raise PbmError(f"roll-back of {target}: {previous} is gone and no pg_dump of the old live schema "
                               "was found; nothing was changed")
            restore_from = row[0]
            restored = f"pg_dump {restore_from}"
        else:
            restored = "nothing (there was no live schema before that cut-over)"
        conn.execute(
            """INSERT INTO pbm_meta.cutovers (run_id, target_schema, action, backend, previous_schema, reason)
               VALUES (%s, %s, 'rollback', 'pocketbase', %s, %s)""",
            (effect["run_id"], target, aside, f"{reason}; restored {restored}"))
        _mirror_flag(conn, "pocketbase", target, effect["run_id"])
        _finish_run(conn, effect["run_id"], "rolled_back")
    if restore_from:
        restore_schema(pg_url, restore_from)
    log.warning("roll-back of the cut-over by run %s: live %s moved to %s, restored %s; flag -> pocketbase",
                effect["run_id"], target, aside, restored)
    return {"action": "rollback", "run_id": effect["run_id"], "target_schema": target, "restored": restored,
            "rolled_back_schema": aside, "backend": "pocketbase", "flag_before": flag_before}


def roll_back(target: str, pg_url: str, redis_url: str | None, reason: str,
              run_id: str | None = None) -> dict[str, Any]:
    """Undo one step for `target`: the staging schema of a run that is not live, or the last cut-over.

    With `run_id`, only that run's doing is undone. Without it (the pocketbase_cutover DAG), a
    waiting staging schema of the latest run goes first; the next roll-back undoes the cut-over.
    """
    with psycopg.connect(pg_url, autocommit=True) as conn:
        meta.ensure_meta(conn)
        effect = cut_over_in_effect(conn, target)
        if run_id is None:
            latest = _latest_run(conn, target)
            waiting = (latest and latest[1] not in ("promoted", "rolled_back")
                       and schema_exists(conn, staging_schema(target)))
            if waiting:
                return discard(conn, target, latest[0], reason, redis_url)
            if effect is None:
                log.warning("roll-back of %s: no cut-over in effect and no staging schema waiting; nothing to do",
                            target)
                return {"action": "none", "run_id": None, "target_schema": target, "backend": flag_value(conn)}
        elif effect is None or effect["run_id"] != run_id:
            return discard(conn, target, run_id, reason, redis_url)
        if redis_url is None:
            raise PbmError("undoing a cut-over sets the Redis flag: a Redis URL is needed")
        return undo(conn, target, effect, pg_url, redis_url, reason)


# --------------------------------------------------------------------------- DAG tasks


def cut_over_run(run: dict, pg_url: str, redis_url: str) -> dict[str, Any]:
    """The migration DAG's cut-over task: backups, swap, flag, and the final report."""
    result = cut_over(run, pg_url, redis_url)
    result["report"] = report.publish(run, pg_url)["markdown"]
    return result


def hold_run(run: dict, pg_url: str) -> dict[str, Any]:
    """Param cutover=manual: the staging schema is validated and waits; the flag is unchanged."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        if not _gate_passed(conn, run["run_id"]):
            raise PbmError(f"run {run['run_id']} has not passed the gate")
        conn.execute("UPDATE pbm_meta.runs SET status = 'ready' WHERE run_id = %s", (run["run_id"],))
    log.info("manual cut-over: %s is validated and ready. Trigger the pocketbase_cutover DAG with action=cutover "
             "and target_schema=%s to promote it (or action=rollback to drop it); the flag is unchanged.",
             run["staging_schema"], run["target_schema"])
    return {"action": "hold", "run_id": run["run_id"], "report": report.publish(run, pg_url)["markdown"]}


def roll_back_run(run: dict, pg_url: str, redis_url: str | None, verdict: dict) -> NoReturn:
    """The migration DAG's roll-back task: undo, write the report, then fail the run on purpose."""
    reason = "; ".join(verdict.get("reasons") or ["the gate refused promotion"])
    roll_back(run["target_schema"], pg_url, redis_url, f"gate refused: {reason}", run_id=run["run_id"])
    report.publish(run, pg_url)
    raise PromotionRefused(f"run {run['run_id']} was rolled back, not promoted: {reason}")


def _run_row(conn: psycopg.Connection, run_id: str) -> dict:
    row = conn.execute(
        """SELECT run_id, dag_run_id, target_schema, staging_schema, source, source_kind, snapshot_path, params
             FROM pbm_meta.runs WHERE run_id = %s""", (run_id,)).fetchone()
    keys = ("run_id", "dag_run_id", "target_schema", "staging_schema", "source", "source_kind", "snapshot_path",
            "params")
    return dict(zip(keys, row))


def waiting_run(target_schema: str, pg_url: str) -> dict | None:
    """The latest run of `target_schema` if it passed the gate and waits in staging (what
    action=cutover would promote), else None."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        latest = _latest_run(conn, target_schema)
        if latest is None or latest[1] not in ("ready", "validated"):
            return None
        return _run_row(conn, latest[0])


def run_action(action: str, target_schema: str, pg_url: str, redis_url: str | None,
               reason: str = "") -> dict[str, Any]:
    """The pocketbase_cutover DAG: promote the run waiting in staging, or roll back one step."""
    if action not in ACTIONS:
        raise ParamError(f"param action must be one of {ACTIONS}, not {action!r}")
    with psycopg.connect(pg_url, autocommit=True) as conn:
        latest = _latest_run(conn, target_schema)
        run = _run_row(conn, latest[0]) if latest else None
    if action == "cutover":
        if run is None or latest[1] not in ("ready", "validated"):
            found = f"run {latest[0]} is {latest[1]}" if latest else "there is no run"
            raise Refused(f"nothing to cut over for {target_schema}: {found}; a run must pass the gate and wait "
                           "in staging (migration param cutover=manual) first")
        if redis_url is None:
            raise PbmError("a cut-over sets the Redis flag: a Redis URL is needed")
        return cut_over_run(run, pg_url, redis_url)
    result = roll_back(target_schema, pg_url, redis_url, reason or "requested through pocketbase_cutover")
    if result["run_id"]:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            affected = _run_row(conn, result["run_id"])
        result["report"] = report.publish(affected, pg_url)["markdown"]
    return result
