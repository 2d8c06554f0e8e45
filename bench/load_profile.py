"""Where a load task's CPU goes: every range of the sample loaded in one process (issue 16).

    python bench/load_profile.py [--rows 2000000] [--batch-size 250000] [--profile [N]]

Builds (or reuses, under bench/out/) the sample like `migrate.py`, snapshots it into a fresh
database, creates the staging schema, then loads every range of the plan through `load_batch` on
one connection, as the DAG's load tasks do (each range its own transaction and ledger row).
Prints, for all ranges together and per collection: wall time, this process's CPU (Python,
`process_time`) and its PostgreSQL backend's CPU (utime + stime from /proc of the backend, so
PostgreSQL must run on this machine), and the peak RSS. The DAG splits the same ranges over two
load tasks, so each task does about half of it. `--profile` adds cProfile's top N functions by
own time. Run it with `PYTHONPATH=<checkout>/include` to measure another checkout's code with the
same script (base against new, alternately, under `flock -x /work/bench.lock`).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import resource
import sys
import time
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parents[1]
DB = "pbm_bench_load_profile"
TICK = os.sysconf("SC_CLK_TCK")


def backend_cpu(pid: int) -> float:
    """CPU seconds (user + system) a PostgreSQL backend has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--batch-size", type=int, default=250_000)
    parser.add_argument("--profile", type=int, nargs="?", const=25, default=0, help="cProfile's top N by own time")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "bench"))
    from migrate import recreate, sample

    import pbmigrate
    from pbmigrate import tasks
    from pbmigrate.load.batch import load_batch
    from pbmigrate.tasks import open_run_source, run_plan
    print(f"code: {Path(pbmigrate.__file__).parent}", flush=True)
    pb_data = sample(args.rows)
    url = recreate(DB)
    params = tasks.run_params(source_path=str(pb_data), target_schema="profile", mapping="game.yaml",
                              batch_size=args.batch_size, collections=[], orphans="reject")
    run = tasks.prepare(params=params, pg_url=url, dag_run_id=f"bench-load-profile-{int(time.time())}")
    tasks.create_schema(run, url)
    (unit,) = tasks.plan_batches(run, slots=1)
    source = open_run_source(run, None)
    per: dict[str, dict] = {}
    prof = cProfile.Profile() if args.profile else None
    try:
        plan = run_plan(run, source)
        with psycopg.connect(url) as conn:
            pid = conn.info.backend_pid
            wall0, cpu0, pg0 = time.perf_counter(), time.process_time(), backend_cpu(pid)
            for r in unit["ranges"]:
                w, c, p = time.perf_counter(), time.process_time(), backend_cpu(pid)
                if prof:
                    prof.enable()
                res = load_batch(conn, source, plan.table_for(r["collection"]), run_id=run["run_id"],
                                 schema=run["staging_schema"], lo=r["lo"], hi=r["hi"],
                                 has_secrets=source.has_secrets)
                conn.commit()
                if prof:
                    prof.disable()
                s = per.setdefault(r["collection"], {"rows": 0, "rejected": 0, "wall": 0.0, "python_cpu": 0.0,
                                                     "pg_cpu": 0.0})
                s["rows"] += res.rows_read
                s["rejected"] += res.rows_rejected
                s["wall"] += time.perf_counter() - w
                s["python_cpu"] += time.process_time() - c
                s["pg_cpu"] += backend_cpu(pid) - p
            total = {"rows": sum(s["rows"] for s in per.values()),
                     "rejected": sum(s["rejected"] for s in per.values()),
                     "wall": time.perf_counter() - wall0, "python_cpu": time.process_time() - cpu0,
                     "pg_cpu": backend_cpu(pid) - pg0,
                     "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
    finally:
        source.close()
    for name, s in sorted(per.items(), key=lambda kv: -kv[1]["python_cpu"]):
        print(f"{name:>14}: {s['rows']:>9,} rows, wall {s['wall']:6.2f} s, Python CPU {s['python_cpu']:6.2f} s, "
              f"PostgreSQL CPU {s['pg_cpu']:5.2f} s, rejected {s['rejected']:,}")
    print(f"{'all':>14}: {total['rows']:>9,} rows, wall {total['wall']:6.2f} s, Python CPU "
          f"{total['python_cpu']:6.2f} s, PostgreSQL CPU {total['pg_cpu']:5.2f} s, peak RSS {total['peak_rss_mb']} MB "
          f"(two load tasks: about half each); load average {os.getloadavg()[0]:.2f}", flush=True)
    if prof:
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(args.profile)
        print(out.getvalue())
    if args.json:
        Path(args.json).write_text(json.dumps({"total": total, "per_collection": per}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
