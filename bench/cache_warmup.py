"""How fast the warm-up writes player profiles into Redis (keys/s, target >= 100,000 on one Redis).

    python bench/cache_warmup.py                     # 200,000 players, local PostgreSQL and Redis db 15
    python bench/cache_warmup.py --rows 500000 --runs 5
    python bench/cache_warmup.py --redis-url redis+cluster://127.0.0.1:7000   # a cluster, for comparison

Builds a throw-away database with a migrated-looking ``players`` table (public fields plus an
email, a password hash and a token key that must not be copied), then times `warm_profiles`
end to end: the server-side cursor read from PostgreSQL, the ``user:{id}:profile`` hashes with
their jittered TTLs, and the wait for the last reply. The Redis db is flushed before and after,
the database dropped. The figure printed is keys per second of the best and the median run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import uuid
from pathlib import Path

import psycopg

from pbmigrate.cache.client import connect, is_cluster, redact
from pbmigrate.cache.warmup import warm_profiles
from pbmigrate.plan.mapping import load_mapping

PG_ADMIN_URL = os.environ.get("PBM_BENCH_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("PBM_BENCH_REDIS_URL", "redis://127.0.0.1:6379/15")
CONFIG = {"profiles": load_mapping("game.yaml").cache["profiles"]}  # the user's mapping, default chunking


def build(pg_url: str, rows: int) -> None:
    """`rows` players with PocketBase-like 15-character ids, made by PostgreSQL itself (seconds)."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE SCHEMA game")
        conn.execute(
            """CREATE TABLE game.players (id text PRIMARY KEY, display_name text, level bigint, xp bigint,
               country text, avatar text, email text, password_hash text, token_key text,
               created timestamptz, updated timestamptz)"""
        )
        conn.execute(
            """INSERT INTO game.players
               SELECT substr(md5(g::text), 1, 15), 'Player ' || g, g %% 100, g * 37,
                      (ARRAY['VN', 'US', 'DE', 'JP', NULL])[1 + g %% 5], 'avatars/' || md5(g::text) || '.png',
                      'p' || g || '@example.com', '$2a$10$' || md5(g::text || 'pw'), md5(g::text || 'tk'),
                      now(), now()
               FROM generate_series(1, %s) g""",
            (rows,),
        )
        conn.execute("ANALYZE game.players")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--redis-url", default=REDIS_URL)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out" / "cache_warmup.json")
    args = ap.parse_args(argv)

    db = f"pbm_bench_{uuid.uuid4().hex[:8]}"
    pg_url = PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + db
    client = connect(args.redis_url)
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{db}"')
    try:
        build(pg_url, args.rows)
        rates = []
        for run in range(1, args.runs + 1):
            client.flushall() if is_cluster(client) else client.flushdb()
            with psycopg.connect(pg_url, autocommit=True) as conn:
                result = warm_profiles(conn, "game", CONFIG, client)
            written = sum(1 for _ in client.scan_iter(count=10_000)) if is_cluster(client) else client.dbsize()
            if result.keys != args.rows or written != args.rows:
                raise SystemExit(f"run {run}: reported {result.keys} keys, Redis holds {written}, expected {args.rows}")
            rates.append(result.keys_per_second)
            rate = result.keys_per_second
            print(f"run {run}: {result.keys:,} profiles in {result.seconds:.2f}s = {rate:,.0f} keys/s")
        report = {
            "bench": "cache_warmup",
            "redis": redact(args.redis_url),
            "cluster": is_cluster(client),
            "rows": args.rows,
            "runs": args.runs,
            "keys_per_second_best": round(max(rates)),
            "keys_per_second_median": round(statistics.median(rates)),
            "target": 100_000,
        }
        print(f"warm-up: best {report['keys_per_second_best']:,} keys/s, median "
              f"{report['keys_per_second_median']:,} keys/s (target >= 100,000 on a single Redis)")  # fmt: skip
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        return report
    finally:
        client.flushall() if is_cluster(client) else client.flushdb()
        client.close()
        with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


if __name__ == "__main__":
    main(sys.argv[1:])
