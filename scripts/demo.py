"""`make demo`: a real migration of a sample game, end to end, on this machine.

1. A real PocketBase server builds the sample game database (users with real bcrypt hashes).
2. The `pocketbase_migration` DAG runs with dag.test() (no scheduler) into the PostgreSQL and
   Redis named by PBM_POSTGRES_URL / PBM_REDIS_URL (default: the local services).
3. It prints what it migrated: tables, rows, rejects, cache keys, time. The full Airflow log
   stays in demo_out/dag_test.log.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import airflow_local  # noqa: E402

DEFAULT_PG = "postgresql://postgres@127.0.0.1:5432/pbmigrate_demo"
DEFAULT_REDIS = "redis://127.0.0.1:6379/2"


def ensure_database(url: str) -> None:
    """Create the demo database if the server has none by that name."""
    base, _, name = url.rpartition("/")
    name = name.split("?")[0]
    with psycopg.connect(f"{base}/postgres", autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            conn.execute(f'CREATE DATABASE "{name}"')


@contextlib.contextmanager
def quiet(log: Path):
    """Send this process's stdout/stderr (Airflow's task logs) to a file for the duration."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with log.open("w") as fh:
        os.dup2(fh.fileno(), 1)
        os.dup2(fh.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def summary(pg_url: str, redis_url: str, target: str) -> str:
    from pbmigrate.cache.client import connect
    from pbmigrate.validate.assess import render

    lines = []
    with psycopg.connect(pg_url) as conn:
        run_id, status, assessment, report = conn.execute(
            "SELECT run_id, status, assessment, report FROM pbm_meta.runs WHERE target_schema = %s "
            "ORDER BY started_at DESC LIMIT 1", (target,)).fetchone()
        lines += ["== Pre-migration assessment", render(assessment), ""]
        lines.append(f"== Migrated (run {run_id}, status {status})")
        for coll, table, read, loaded, rejected, junction, secs in conn.execute(
                """SELECT collection, target_table, sum(rows_read), sum(rows_loaded), sum(rows_rejected),
                          sum(junction_rows), sum(seconds) FROM pbm_meta.batches WHERE run_id = %s
                    GROUP BY 1, 2 ORDER BY 1""", (run_id,)):
            rate = f"{float(read) / secs:,.0f} rows/s" if secs else ""
            extra = f", {junction:,} junction rows" if junction else ""
            lines.append(f"  {coll:<14} -> {table:<20} read {read:>8,}  loaded {loaded:>8,}  "
                         f"rejected {rejected:>4,}{extra}  {rate}")
        rejects = conn.execute("SELECT collection, field, reason, count(*) FROM pbm_meta.rejects WHERE run_id = %s "
                               "GROUP BY 1, 2, 3 ORDER BY 4 DESC LIMIT 10", (run_id,)).fetchall()
        for coll, field, reason, n in rejects:
            lines.append(f"  reject: {coll}.{field}: {reason} ({n})")
        markdown = Path(((report or {}).get("report") or {}).get("markdown") or "/nonexistent")
        if markdown.is_file():
            lines += ["", f"== Reconciliation report ({markdown})", markdown.read_text()]
    client = connect(redis_url)
    try:
        keys = {p: sum(1 for _ in client.scan_iter(match=p, count=1000))
                for p in ("user:*:profile", "leaderboard:*:top", "game:*:state")}
        flag = client.get("pbm:backend")
    finally:
        client.close()
    lines += ["", "== Redis", *(f"  {p:<20} {n:,} keys" for p, n in keys.items()), f"  pbm:backend = {flag}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000, help="size of the sample game database")
    parser.add_argument("--out", default=str(ROOT / "demo_out"), help="working folder")
    args = parser.parse_args(argv)
    out = Path(args.out)
    pg_url = os.environ.get("PBM_POSTGRES_URL", DEFAULT_PG)
    redis_url = os.environ.get("PBM_REDIS_URL", DEFAULT_REDIS)
    from pbdev.sample import build_sample
    from pbmigrate.preflight import safe_url

    started = time.monotonic()
    print(f"Building a {args.rows:,}-row sample game with a real PocketBase server ...", flush=True)
    info = build_sample(out / "sample", rows=args.rows)
    pb_data = Path(info["pb_data"])
    print(f"  {sum(info['counts'].values()):,} records in {pb_data}")
    ensure_database(pg_url)
    airflow_local.configure(out / "airflow_home", pg_url=pg_url, redis_url=redis_url, work_dir=out / "work")
    target = "game"
    conf = {"source_path": str(pb_data), "target_schema": target, "mapping": "game.yaml", "batch_size": 5000}
    print(f"Running the pocketbase_migration DAG into {safe_url(pg_url)} and {safe_url(redis_url)} "
          f"(log: {out / 'dag_test.log'}) ...", flush=True)
    t0 = time.monotonic()
    with quiet(out / "dag_test.log"):
        state = airflow_local.run_dag("pocketbase_migration", conf).state
    print(f"  DAG run {state} in {time.monotonic() - t0:.1f} s\n")
    print(summary(pg_url, redis_url, target))
    print(f"\nTotal {time.monotonic() - started:.1f} s. Live schema: {target}; the one it replaced, if any: "
          f"{target}_previous.")
    return 0 if state == "success" else 1


if __name__ == "__main__":
    sys.exit(main())
