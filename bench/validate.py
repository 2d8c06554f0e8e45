"""How much validation (checksums + GX checkpoints) adds to the data phase (target: at most 50 %).

    python bench/validate.py                                # builds the 2,000,000-row game sample
    python bench/validate.py --pb-data /path/to/pb_data     # an existing sample (or any pb_data)
    python bench/validate.py --rows 200000 --workers 2      # smaller, quicker
    python bench/validate.py --keep                         # keep the migrated database ...
    python bench/validate.py --db pbm_bench_1a2b3c4d        # ... and time validation alone on it again

`--db` reruns only the validation, on a database an earlier `--keep` run migrated (its run and
data-phase figures are kept beside the sample in --out): base and new code can then be timed
alternately on the very same rows (PYTHONPATH picks the code), without a data phase in between.

The data phase is what the DAG's `data` task group does, timed the same way: plan the batches,
load them with `--workers` processes (the Airflow slots), finalize. Validation is
`quality.validate_run`, one process, as the `validate.checks` task runs it: source counts, the
per-batch checksums inside PostgreSQL, one GX checkpoint per table, Data Docs. The target is a
throw-away database, dropped afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import psycopg

from pbmigrate import tasks
from pbmigrate.validate import quality

ADMIN_URL = os.environ.get("PBM_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def _load(args: tuple[dict, dict, str]) -> dict:
    run, batch, url = args
    return tasks.run_batch(run, batch, url)


def data_phase(pb_data: str, url: str, mapping: str, batch_size: int, workers: int) -> tuple[dict, dict]:
    """prepare (not timed), then the data task group: plan, parallel loads, finalize."""
    params = tasks.run_params(source_path=pb_data, target_schema="game", mapping=mapping, batch_size=batch_size,
                                 collections=None, orphans="reject")
    run = tasks.prepare(params=params, pg_url=url, dag_run_id=f"bench_{uuid.uuid4().hex[:6]}")
    tasks.create_schema(run, url)
    started = time.monotonic()
    batches = tasks.plan_batches(run)
    planned = time.monotonic()
    with ProcessPoolExecutor(workers) as pool:
        results = list(pool.map(_load, [(run, b, url) for b in batches]))
    loaded = time.monotonic()
    tasks.finalize_run(run, url)
    done = time.monotonic()
    rows = sum(r["rows_read"] for r in results)
    return run, {"rows": rows, "batches": len(batches), "plan": planned - started, "load": loaded - planned,
                 "finalize": done - loaded, "data": done - started}


def _rounded(v: object) -> object:
    if isinstance(v, dict):
        return {k: _rounded(x) for k, x in v.items()}
    return round(v, 3) if isinstance(v, float) else v


def validation(run: dict, url: str, data: dict) -> int:
    """`validate.checks` as the DAG runs it, timed against the data phase's figures."""
    started = time.monotonic()
    summary = quality.validate_run(run, url)
    wall = time.monotonic() - started
    s = summary["seconds"]
    ratio = wall / data["data"]
    print(f"validation ({Path(quality.__file__).parents[3]}): {summary['checks']} checks ({summary['failed']} "
          f"failed) in {wall:.1f} s: source counts {wall - s['total']:.1f}, checksums {s['checksums']:.1f} "
          f"({data['rows'] / s['checksums']:,.0f} rows/s) beside GX {s['gx']:.1f} (of which import "
          f"{s['gx_import']:.1f}, Data Docs {s['data_docs']:.1f})")
    verdict = "ok" if ratio <= 0.5 else "OVER the 50 % budget"
    print(f"validation adds {ratio:.0%} to the data phase: {verdict}")
    figures = {"data": data, "validation": {"wall": wall, **s}, "ratio": ratio}
    print(json.dumps(_rounded(figures)))
    return 0 if ratio <= 0.5 and summary["success"] else 1


def _kept(out: Path, db: str) -> Path:
    return out / f"{db}.run.json"


def revalidate(db: str, out: Path) -> int:
    """Validation alone on a kept database, with the run (and work dir) its --keep run saved."""
    kept = json.loads(_kept(out, db).read_text())
    os.environ["PBM_WORK_DIR"] = kept["work"]
    d = kept["data"]
    print(f"database {db}: data phase (when migrated) {d['rows']:,} rows, {d['data']:.1f} s", flush=True)
    return validation(kept["run"], ADMIN_URL.rsplit("/", 1)[0] + "/" + db, d)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pb-data", help="an existing pb_data (default: build the game sample)")
    parser.add_argument("--rows", type=int, default=2_000_000, help="sample size when building (default 2,000,000)")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "pbm_bench_validate",
                        help="where the sample is built and reused (default: a folder in /tmp)")
    parser.add_argument("--mapping", default="game.yaml")
    parser.add_argument("--batch-size", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2, help="parallel batch loads (Airflow slots)")
    parser.add_argument("--keep", action="store_true", help="keep the target database and the run's work dir")
    parser.add_argument("--db", help="validate this database again (kept by an earlier --keep run) instead of "
                                     "migrating a new one; the ratio uses that run's data phase")
    args = parser.parse_args(argv)
    if args.db:
        return revalidate(args.db, args.out)

    pb_data = args.pb_data
    if not pb_data:
        from pbdev.sample import build_sample

        pb_data = str(args.out / f"rows{args.rows}" / "pb_data")
        if not (Path(pb_data) / "data.db").is_file():
            print(f"building the {args.rows:,}-row sample in {pb_data} ...", flush=True)
            build_sample(Path(pb_data).parent, rows=args.rows)
    work = Path(tempfile.mkdtemp(prefix="pbm_bench_work_"))  # snapshots are as big as the source
    os.environ["PBM_WORK_DIR"] = str(work)
    db = f"pbm_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    url = ADMIN_URL.rsplit("/", 1)[0] + "/" + db
    try:
        run, data = data_phase(pb_data, url, args.mapping, args.batch_size, args.workers)
        if args.keep:
            args.out.mkdir(parents=True, exist_ok=True)
            _kept(args.out, db).write_text(json.dumps({"run": run, "data": data, "work": str(work)}, default=str))
        print(f"data phase: {data['rows']:,} rows in {data['batches']} batches, {data['data']:.1f} s "
              f"(plan {data['plan']:.1f}, load {data['load']:.1f} with {args.workers} workers, "
              f"finalize {data['finalize']:.1f})", flush=True)
        return validation(run, url, data)
    finally:
        if args.keep:
            print(f"kept: database {db}, work dir {work}")
        else:
            with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
