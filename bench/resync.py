"""How long a re-sync takes on the 2,000,000-row game sample: with 1% of the rows changed, and again
with nothing changed (targets: at most 10 s each on the 2-core reference machine, issue 16).

    python bench/resync.py                              # builds the sample (about 90 s), loads it, measures
    python bench/resync.py --pb-data /path/to/pb_data   # reuse a built sample (it is copied, never changed)
    python bench/resync.py --rows 200000 --changed 0.01

Steps: build the sample with `pbdev.sample.build_sample` (real PocketBase schema, bulk rows in
PocketBase's storage form), copy its pb_data, full load with the migration's own task functions
and the game mapping, then change 1% of the rows in the copy as PocketBase would store them (about
60% updates with `updated` moved to now, 20% inserts, 20% deletes of leaf records), re-sync, and
re-sync again. Each re-sync is the whole task: snapshot, compare, write, commit. Figures go to
stdout and to bench/out/resync.json.

Beside the wall time each re-sync reports the CPU seconds it used: this process's and those of
its PostgreSQL backends (read from /proc while it runs, so only with a local server). On a shared
machine wall time follows the neighbours; the CPU figures say what the re-sync itself cost.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sqlite3
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import psycopg

from pbdev.sample import build_sample
from pbmigrate import resync, tasks

ROOT = Path(__file__).resolve().parents[1]
ADMIN_URL = os.environ.get("PBM_BENCH_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
TARGET = "bench_resync"
# Collection -> (column updated in place, how to make a new value from a random generator).
UPDATES = {
    "users": ("xp", lambda r: r.randint(0, 500_000)),
    "matches": ("status", lambda r: r.choice(["waiting", "in_progress", "finished", "abandoned"])),
    "participants": ("score", lambda r: round(r.uniform(0, 5000), 2)),
    "inventory": ("quantity", lambda r: r.randint(1, 99)),
    "achievements": ("progress", lambda r: round(r.random(), 3)),
    "user_stats": ("rating", lambda r: round(r.uniform(800, 2800), 1)),
    "leaderboard": ("rating", lambda r: round(r.uniform(800, 2800), 1)),
}
ID_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"


def pb_now() -> str:
    return resync.pb_timestamp(datetime.now(UTC))


def change_rows(data_db: Path, total: int, share: float, seed: int = 11) -> dict[str, dict[str, int]]:
    """Change `share` of `total` rows in PocketBase's storage form (the server is not running)."""
    rnd = random.Random(seed)
    budget = int(total * share)
    n_upd, n_ins = int(budget * 0.6), int(budget * 0.2)
    n_del = budget - n_upd - n_ins
    done: dict[str, dict[str, int]] = {}
    conn = sqlite3.connect(data_db, isolation_level=None)
    try:
        conn.execute("BEGIN")
        sizes = {c: conn.execute(f"SELECT max(rowid) FROM {c}").fetchone()[0] for c in UPDATES}
        weight = sum(sizes.values())
        for coll, (column, make) in UPDATES.items():
            k = max(1, n_upd * sizes[coll] // weight)
            rowids = rnd.sample(range(1, sizes[coll] + 1), k)
            now = pb_now()
            conn.executemany(f'UPDATE {coll} SET "{column}" = ?, updated = ? WHERE rowid = ?',
                             [(make(rnd), now, rid) for rid in rowids])
            done.setdefault(coll, {})["updated"] = k
        for coll in ("inventory", "achievements"):  # leaf records: PocketBase cascades nothing
            k = n_del // 2
            rowids = rnd.sample(range(1, sizes[coll] + 1), k)
            conn.executemany(f"DELETE FROM {coll} WHERE rowid = ?", [(r,) for r in rowids])
            done[coll]["deleted"] = k
        users = [r[0] for r in conn.execute("SELECT id FROM users ORDER BY random() LIMIT 5000")]
        template = conn.execute("SELECT * FROM inventory LIMIT 1")
        columns = [d[0] for d in template.description]
        row = dict(zip(columns, template.fetchone()))
        rows = []
        for _ in range(n_ins):
            now = pb_now()
            new = dict(row, id="".join(rnd.choices(ID_CHARS, k=15)), user=rnd.choice(users), created=now,
                       updated=now, quantity=rnd.randint(1, 5), item="lucky_coin")
            rows.append(tuple(new[c] for c in columns))
        conn.executemany(f"INSERT INTO inventory ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                         rows)
        done["inventory"]["inserted"] = n_ins
        conn.execute("COMMIT")
    finally:
        conn.close()
    return done


def full_load(pb_data: Path, pg_url: str, batch_size: int) -> dict:
    params = tasks.run_params(source_path=str(pb_data), target_schema=TARGET, mapping="game.yaml",
                                 batch_size=batch_size, collections=[], orphans="reject")
    run = tasks.prepare(params=params, pg_url=pg_url, dag_run_id=f"bench-{int(time.time())}")
    tasks.create_schema(run, pg_url)
    for batch in tasks.plan_batches(run):
        tasks.run_batch(run, batch, pg_url)
    tasks.finalize_run(run, pg_url)
    return run


class BackendCpu:
    """CPU seconds of a database's other PostgreSQL backends while the block runs (/proc, local server)."""

    def __init__(self, pg_url: str):
        self.pg_url, self.seen, self.stop = pg_url, {}, threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        tick = os.sysconf("SC_CLK_TCK")
        with psycopg.connect(self.pg_url, autocommit=True) as conn:
            while not self.stop.is_set():
                for (pid,) in conn.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                                           "AND pid <> pg_backend_pid()").fetchall():
                    try:
                        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                        self.seen[pid] = (int(fields[11]) + int(fields[12])) / tick
                    except (OSError, IndexError, ValueError):
                        pass
                time.sleep(0.05)

    def __enter__(self) -> BackendCpu:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()

    @property
    def seconds(self) -> float:
        return sum(self.seen.values())


def timed_resync(pb_data: Path, pg_url: str, label: str) -> dict:
    started, cpu = time.monotonic(), os.times()
    with BackendCpu(pg_url) as pg:
        summary = resync.run_resync(source_path=str(pb_data), target_schema=TARGET, mapping="game.yaml",
                                    collections=[], pg_url=pg_url, resync_id=f"bench-{label}-{int(time.time())}")
    seconds = time.monotonic() - started
    done = os.times()
    own = (done.user - cpu.user) + (done.system - cpu.system)
    print(f"re-sync, {label}: {seconds:.2f} s  (CPU {own:.2f} s here + {pg.seconds:.2f} s PostgreSQL)  "
          f"totals {summary['totals']}")
    for name, c in summary["collections"].items():
        print(f"    {name:<14} ins {c['inserted']:>6} upd {c['updated']:>6} del {c['deleted']:>6} "
              f"read {c['rows_read']:>6}  {c['seconds']:.2f} s")
    return {"seconds": round(seconds, 2), "cpu_seconds": round(own, 2), "postgres_cpu_seconds": round(pg.seconds, 2),
            "totals": summary["totals"],
            "collections": {k: {f: v[f] for f in ("inserted", "updated", "deleted", "rows_read", "seconds")}
                            for k, v in summary["collections"].items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--changed", type=float, default=0.01, help="share of rows changed (default 0.01)")
    ap.add_argument("--pb-data", type=Path, help="a built sample's pb_data (copied first)")
    ap.add_argument("--batch-size", type=int, default=250_000)
    ap.add_argument("--keep", action="store_true", help="keep the work folder and the database")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="pbm-bench-resync-"))
    db = f"pbm_bench_resync_{os.getpid()}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{db}"')
    pg_url = ADMIN_URL.rsplit("/", 1)[0] + "/" + db
    os.environ["PBM_WORK_DIR"] = str(work / "pbm")
    figures: dict = {"rows": args.rows, "changed_share": args.changed, "machine": f"{os.cpu_count()} cores"}
    try:
        if args.pb_data:
            src = args.pb_data
        else:
            t = time.monotonic()
            built = build_sample(work / "sample", rows=args.rows)
            src = Path(built["pb_data"])
            print(f"sample: {built['rows']:,} rows in {time.monotonic() - t:.1f} s")
        pb_data = work / "pb_data"
        shutil.copytree(src, pb_data, ignore=shutil.ignore_patterns("backups", "storage"))
        total = 0
        with sqlite3.connect(f"file:{pb_data / 'data.db'}?mode=ro", uri=True) as conn:
            for coll in UPDATES:
                total += conn.execute(f"SELECT count(*) FROM {coll}").fetchone()[0]
        figures["rows"] = total

        t = time.monotonic()
        full_load(pb_data, pg_url, args.batch_size)
        figures["full_load_seconds"] = round(time.monotonic() - t, 1)
        print(f"full load of {total:,} rows: {figures['full_load_seconds']} s")

        first = timed_resync(pb_data, pg_url, "nothing changed since the full load")
        figures["changes"] = change_rows(pb_data / "data.db", total, args.changed)
        print(f"changed {int(total * args.changed):,} rows: {figures['changes']}")
        figures["resync_changed"] = timed_resync(pb_data, pg_url, f"{args.changed:.0%} changed")
        figures["resync_unchanged"] = timed_resync(pb_data, pg_url, "nothing changed")
        figures["resync_first"] = first
        ok_changed = figures["resync_changed"]["seconds"] <= 10
        ok_unchanged = figures["resync_unchanged"]["seconds"] <= 10
        figures["targets_met"] = ok_changed and ok_unchanged
        print(f"targets: {args.changed:.0%} changed <= 10 s: {'yes' if ok_changed else 'NO'}; "
              f"nothing changed <= 10 s: {'yes' if ok_unchanged else 'NO'}")
        out = ROOT / "bench" / "out"
        out.mkdir(parents=True, exist_ok=True)
        (out / "resync.json").write_text(json.dumps(figures, indent=2))
        return 0 if figures["targets_met"] or args.rows < 2_000_000 else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
            with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


if __name__ == "__main__":
    sys.exit(main())
