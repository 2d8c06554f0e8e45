"""Benchmark: SQLite range reads of the snapshot source, one process.

    .venv/bin/python bench/read.py [--rows 2000000] [--batch-size 250000]

Reads every collection of the sample game in id ranges of `--batch-size`, the way batch tasks do:
unordered (what the loader asks for: a table scan when the range is large) and in id order (what
re-sync and the API-compatible contract use), then plain sqlite3 full scans of the same tables as
the reference. Target: 400,000 rows/s or more unordered; the issue's plain sqlite3 scans measured
570,000 to 680,000 rows/s on this kind of machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from migrate import OUT, sample  # noqa: E402

from pbmigrate.source import plan_ranges  # noqa: E402
from pbmigrate.source.sqlite import SqliteSource  # noqa: E402


def read_all(src: SqliteSource, batch_size: int, ordered: bool) -> tuple[int, float, float]:
    """Rows read, wall and CPU seconds spent in the range reads (planning the ranges excluded)."""
    rows, wall, cpu = 0, 0.0, 0.0
    for coll in src.catalog().migrating():
        for r in plan_ranges(src, coll, batch_size):
            t0, c0 = time.monotonic(), time.process_time()
            rows += sum(1 for _ in src.rows(coll, r.lo, r.hi, ordered=ordered))
            wall += time.monotonic() - t0
            cpu += time.process_time() - c0
    return rows, wall, cpu


def plain_scan(db: Path) -> tuple[int, float]:
    """The reference the issue quotes: plain sqlite3 full scans of the same tables, right now."""
    import sqlite3

    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    rows, started = 0, time.monotonic()
    for name in SqliteSource(db).catalog().migrating():
        cur = conn.execute(f'SELECT * FROM "{name.name}"')
        while batch := cur.fetchmany(10_000):
            rows += len(batch)
    conn.close()
    return rows, time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--batch-size", type=int, default=250_000)
    args = parser.parse_args()
    src = SqliteSource(sample(args.rows) / "data.db")
    result = {}
    for ordered in (False, True):
        rows, wall, cpu = read_all(src, args.batch_size, ordered)
        key = "ordered" if ordered else "unordered"
        result[key] = {"rows": rows, "seconds": round(wall, 2), "rows_per_s": round(rows / wall),
                       "rows_per_cpu_s": round(rows / cpu)}
        print(f"{key:>9}: {rows:,} rows in {wall:.2f} s = {rows / wall:,.0f} rows/s "
              f"({rows / cpu:,.0f} per CPU second; target 400,000)")
    OUT.mkdir(parents=True, exist_ok=True)
    rows, wall = plain_scan(sample(args.rows) / "data.db")
    result["plain_sqlite3"] = {"rows": rows, "seconds": round(wall, 2), "rows_per_s": round(rows / wall)}
    print(f"    plain: {rows:,} rows in {wall:.2f} s = {rows / wall:,.0f} rows/s (sqlite3 full scans, the reference)")
    (OUT / "read.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
