"""Micro-benchmark: `finalize` (keys, unique indexes, foreign keys, statistics) on the loaded 2M sample.

Loads the sample once into a template database (bench/out/finalize-run.json keeps its run), then per
round copies it (CREATE DATABASE ... TEMPLATE) and runs `tasks.finalize_run` from each checkout given,
alternating, so a change is measured against its base in the same run:

    flock -x /work/bench.lock python bench/finalize.py --checkout base=/work/main --checkout new=. --rounds 3

Prints each round's seconds and finalize's steps, then the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "include"))
sys.path.insert(0, str(ROOT / "bench"))
PG = "postgresql://postgres@127.0.0.1:5432"
TEMPLATE, COPY = "pbm_bench_finalize_tpl", "pbm_bench_finalize"
RUN = ROOT / "bench" / "out" / "finalize-run.json"
CHILD = """
import json, sys
from pbmigrate import tasks
run = json.loads(sys.argv[1])
print(json.dumps(tasks.finalize_run(run, sys.argv[2])))
"""


def _admin(sql: str) -> None:
    with psycopg.connect(f"{PG}/postgres", autocommit=True) as conn:
        conn.execute(sql)


def loaded_template(rows: int, batch_size: int) -> dict:
    """The sample, loaded but not finalized, as a template database (built once)."""
    with psycopg.connect(f"{PG}/postgres") as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (TEMPLATE,)).fetchone()
    if exists and RUN.exists():
        return json.loads(RUN.read_text())
    from migrate import sample

    from pbmigrate import tasks

    pb_data = sample(rows)
    _admin(f'DROP DATABASE IF EXISTS "{TEMPLATE}" WITH (FORCE)')
    _admin(f'CREATE DATABASE "{TEMPLATE}"')
    url = f"{PG}/{TEMPLATE}"
    params = tasks.run_params(source_path=str(pb_data), target_schema="game", mapping="game.yaml",
                              batch_size=batch_size, collections=[], orphans="reject")
    run = tasks.prepare(params=params, pg_url=url, dag_run_id="bench-finalize")
    tasks.create_schema(run, url)
    for unit in tasks.plan_batches(run):
        tasks.run_batch(run, unit, url)
    RUN.write_text(json.dumps(run))
    return run


def finalize_once(checkout: Path, run: dict) -> dict:
    _admin(f'DROP DATABASE IF EXISTS "{COPY}" WITH (FORCE)')
    _admin(f'CREATE DATABASE "{COPY}" TEMPLATE "{TEMPLATE}"')
    env = {**os.environ, "PYTHONPATH": str(checkout / "include")}
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(run), f"{PG}/{COPY}"], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--batch-size", type=int, default=250_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--checkout", action="append", default=[],
                        help="label=path of a checkout whose finalize to time (repeat; default: this one)")
    args = parser.parse_args()
    checkouts = [(c.split("=", 1)[0], Path(c.split("=", 1)[1]).resolve()) for c in args.checkout] \
        or [("this", ROOT)]
    run = loaded_template(args.rows, args.batch_size)
    times: dict[str, list[float]] = {label: [] for label, _ in checkouts}
    for i in range(args.rounds):
        for label, path in checkouts:
            report = finalize_once(path, run)
            times[label].append(report["seconds"])
            print(f"round {i + 1} {label}: {report['seconds']:.2f} s, steps {report['steps']}, "
                  f"indexes {report['indexes']}, foreign keys {report['foreign_keys']}", flush=True)
    _admin(f'DROP DATABASE IF EXISTS "{COPY}" WITH (FORCE)')
    for label, secs in ((k, v) for k, v in times.items() if v):
        print(f"{label}: median {statistics.median(secs):.2f} s ({', '.join(f'{s:.2f}' for s in secs)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
