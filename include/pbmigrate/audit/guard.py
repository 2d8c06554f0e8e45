"""The per-target guard: a migration and a re-sync never write the same target at once.

A PostgreSQL advisory lock keyed by the target schema: migration tasks take it shared (their
batches run side by side), a re-sync takes it exclusive. Waiting too long raises TargetBusy,
naming who holds it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import psycopg

from pbmigrate.errors import TargetError

LOCK_NAMESPACE = 0x70626D73  # "pbms": first key of the per-target advisory lock


class TargetBusy(TargetError):
    """Another re-sync or a migration holds the target's lock."""


def _lock_holders(conn: psycopg.Connection, target_schema: str) -> list[str]:
    rows = conn.execute(
        """SELECT a.pid, coalesce(nullif(a.application_name, ''), a.usename::text), l.mode
             FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
            WHERE l.locktype = 'advisory' AND l.granted AND l.classid = %s::oid
              AND l.objid = (hashtext(%s)::bigint & 4294967295)::oid AND l.objsubid = 2""",
        (LOCK_NAMESPACE, target_schema),
    ).fetchall()
    return [f"pid {pid} ({name}, {mode})" for pid, name, mode in rows]


@contextlib.contextmanager
def target_lock(pg_url: str, target_schema: str, *, shared: bool = False, wait_seconds: float = 600.0,
                holder: str = "pbmigrate") -> Iterator[None]:
    """Hold the target's advisory lock for the block (its own connection, session-level).

    Migration tasks take it shared (their batches run side by side); a re-sync takes it exclusive,
    so the two never write the same target at once. Waits up to `wait_seconds`, then raises
    TargetBusy naming who holds it.
    """
    fn = "pg_try_advisory_lock_shared" if shared else "pg_try_advisory_lock"
    conn = psycopg.connect(pg_url, autocommit=True, application_name=f"{holder} {target_schema}"[:63])
    try:
        deadline = time.monotonic() + max(0.0, wait_seconds)
        while not conn.execute(f"SELECT {fn}(%s, hashtext(%s))", (LOCK_NAMESPACE, target_schema)).fetchone()[0]:
            if time.monotonic() >= deadline:
                who = ", ".join(_lock_holders(conn, target_schema)) or "another session"
                raise TargetBusy(
                    f"target {target_schema!r} is busy: {who} holds its lock (a migration and a re-sync never "
                    f"write the same target at once); waited {wait_seconds:.0f} s")
            time.sleep(0.5)
        try:
            yield
        finally:
            unlock = "pg_advisory_unlock_shared" if shared else "pg_advisory_unlock"
            with contextlib.suppress(psycopg.Error):
                conn.execute(f"SELECT {unlock}(%s, hashtext(%s))", (LOCK_NAMESPACE, target_schema))
    finally:
        conn.close()
