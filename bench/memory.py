"""Peak memory of a load task against the size of what it loads (issue 16: flat in the table's size).

    python bench/memory.py [--copies 7] [--small 100000]

Copies the 2,000,000-row sample's data.db (built by `migrate.py` under bench/out/, or built
here), then adds `--copies - 1` more copies of every `participants` row under new ids (the
relations unchanged), so that the one table holds about 4.5M rows. Then, each in a fresh
process, as the DAG's load task runs it (`tasks.run_batch` on one range): one batch of the first
`--small` rows, and one batch holding the whole table. Prints and writes (bench/out/memory.json)
each one's rows, seconds and peak RSS (`ru_maxrss` of the process); the two peaks should match.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
PG = "postgresql://postgres@127.0.0.1:5432"
DB = "pbm_bench_memory"
TABLE = "participants"


def grow(data_db: Path, copies: int) -> int:
    """`copies - 1` more copies of every participants row, each under new ids (a two-digit suffix
    on a 13-character prefix: still 15 characters of PocketBase's alphabet). The copies repeat
    each (match, user) pair, so the source's unique index on it goes (the load never reads it).
    Returns the row count."""
    conn = sqlite3.connect(data_db, isolation_level=None)
    try:
        conn.execute("BEGIN")
        for (name,) in conn.execute(f"SELECT name FROM pragma_index_list('{TABLE}') WHERE \"unique\" "
                                    "AND origin = 'c'").fetchall():  # (match, user): the copies repeat it
            conn.execute(f'DROP INDEX "{name}"')
        cols = [r[1] for r in conn.execute(f"PRAGMA table_info({TABLE})")]
        rest = ", ".join(c for c in cols if c != "id")
        for k in range(1, copies):
            conn.execute(f"INSERT INTO {TABLE} (id, {rest}) SELECT substr(id, 1, 13) || '{k:02d}', {rest} "
                         f"FROM {TABLE} WHERE length(id) = 15 AND id NOT GLOB '*[0-9][0-9]'")
        conn.execute("COMMIT")
        return conn.execute(f"SELECT count(*) FROM {TABLE}").fetchone()[0]
    finally:
        conn.close()


def one_batch(run_file: Path, lo: str, hi: str) -> dict:
    """In a fresh process: one load task holding one range (the DAG's `load` task body)."""
    code = (
        "import json, sys\n"
        "from pbmigrate import tasks\n"
        "run, lo, hi, url = json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3], sys.argv[4]\n"
        f"r = {{'collection': '{TABLE}', 'lo': lo, 'hi': hi, 'rows': 0}}\n"
        "out = tasks.run_batch(run, {'label': 'bench', 'ranges': [r]}, url)\n"
        "print(json.dumps({'rows': out['rows_read'], 'seconds': out['batches'][0]['seconds'],"
        " 'peak_rss_mb': out['peak_rss_mb']}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(run_file), lo, hi, f"{PG}/{DB}"],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=7)
    parser.add_argument("--small", type=int, default=100_000)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "bench"))
    from migrate import recreate, sample

    from pbmigrate import tasks

    work = Path(tempfile.mkdtemp(prefix="pbm_bench_memory_"))
    try:
        pb_data = work / "pb_data"
        pb_data.mkdir()
        shutil.copy(sample(2_000_000) / "data.db", pb_data / "data.db")
        started = time.monotonic()
        rows = grow(pb_data / "data.db", args.copies)
        print(f"{TABLE}: {rows:,} rows ({time.monotonic() - started:.1f} s to build)", flush=True)
        url = recreate(DB)
        params = tasks.run_params(source_path=str(pb_data), target_schema="memory", mapping="game.yaml",
                                  batch_size=rows, collections=[], orphans="reject")
        run = tasks.prepare(params=params, pg_url=url, dag_run_id=f"bench-memory-{int(time.time())}")
        tables = tasks.create_schema(run, url)
        run_file = work / "run.json"
        run_file.write_text(json.dumps(run))
        snap = sqlite3.connect(run["snapshot_path"])
        ids = [r[0] for r in snap.execute(f"SELECT id FROM {TABLE} ORDER BY id")]
        snap.close()
        small = one_batch(run_file, ids[0], ids[min(args.small, len(ids)) - 1])
        print(f"one batch of {small['rows']:,} rows: {small}", flush=True)
        with psycopg.connect(url, autocommit=True) as conn:  # the whole table next, into an empty table
            conn.execute("TRUNCATE " + ", ".join(f'{run["staging_schema"]}."{t}"' for t in tables))
            conn.execute("DELETE FROM pbm_meta.batches")
        whole = one_batch(run_file, ids[0], ids[-1])
        print(f"one batch of the whole table, {whole['rows']:,} rows: {whole}", flush=True)
        result = {"rows": rows, "small": small, "whole": whole}
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "memory.json").write_text(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
