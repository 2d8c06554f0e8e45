"""How fast ApiSource reads a large collection from a real PocketBase (rows/s, target >= 30,000).

Three ways to point it at data:

    python bench/api_read.py                         # builds 200,000 rows in a throw-away pb_data
    python bench/api_read.py --rows 1000000 --version 0.23.12
    python bench/api_read.py --pb-data /path/to/pb_data --collection posts   # served from a copy
    python bench/api_read.py --url https://pb.example.com --email a@b.c --password ... --collection posts

Built data: a `bench` collection of 8 fields (about 300 bytes of JSON per record), written with
sqlite3 while the server is stopped, in PocketBase's storage form, as POCKETBASE.md section 5.3 did
for its keyset-paging figures (33,000-36,000 rows/s on 0.40.6). A given pb_data is copied first,
because serving it needs a superuser we create. The read converts every row to storage form, as
a migration does, so the figure is what the data phase gets. Two reads are timed: unordered, as
the loader reads a batch (two keyset cursors over halves of the range at once), and in id order
(one cursor, as re-sync and `ids()` read), next to the bare loop.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sqlite3
import string
import sys
import tempfile
import time
from pathlib import Path

from pbdev.pbserver import PocketBaseServer
from pbmigrate.source.api import ApiSource

SUPERUSER = ("bench@example.com", "bench-pass-123")
WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet")


def bench_spec() -> dict:
    return {"name": "bench", "fields": [
        {"name": "title", "type": "text"},
        {"name": "body", "type": "text"},
        {"name": "score", "type": "number"},
        {"name": "active", "type": "bool"},
        {"name": "tags", "type": "select", "values": list(WORDS), "maxSelect": 5},
        {"name": "meta", "type": "json"},
        {"name": "owner", "type": "text"},
        {"name": "seen", "type": "date"},
    ]}


def insert_rows(data_db: Path, rows: int, seed: int = 7) -> None:
    """`rows` records in storage form; ids are random 15-char [a-z0-9] like PocketBase's own."""
    rnd = random.Random(seed)
    alphabet = string.ascii_lowercase + string.digits
    stamp = "2024-05-06 07:08:09.123Z"

    def batch(n: int) -> list[tuple]:
        out = []
        for _ in range(n):
            rid = "".join(rnd.choices(alphabet, k=15))
            words = rnd.sample(WORDS, 3)
            out.append((
                rid, " ".join(words).title(), " ".join(rnd.choices(WORDS, k=14)),
                round(rnd.uniform(0, 10_000), 2), rnd.randint(0, 1),
                json.dumps(words[:2], separators=(",", ":")),
                json.dumps({"level": rnd.randint(1, 99), "zone": rnd.choice(WORDS)},
                           separators=(",", ":")),
                "".join(rnd.choices(alphabet, k=15)), stamp, stamp, stamp,
            ))
        return out

    conn = sqlite3.connect(data_db)
    try:
        with conn:
            for start in range(0, rows, 50_000):
                conn.executemany(
                    "INSERT OR IGNORE INTO bench (id, title, body, score, active, tags, meta, owner, "
                    "seen, created, updated) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    batch(min(50_000, rows - start)))
    finally:
        conn.close()


def raw_keyset(src: ApiSource, collection: str) -> int:
    """The bare loop POCKETBASE.md 5.3 timed (requests + json.loads, no conversion): the
    baseline that shows how much of the time is the server's on this machine, right now."""
    url = f"{src.url}/api/collections/{collection}/records"
    last, n = None, 0
    while True:
        params = {"perPage": 1000, "sort": "id", "skipTotal": 1}
        if last is not None:
            params["filter"] = f"id>'{last}'"
        data = json.loads(src.http.session.get(url, params=params, auth=src.http.auth, timeout=60).content)
        items = data["items"]
        n += len(items)
        if len(items) < data["perPage"]:
            return n
        last = items[-1]["id"]


def measure(src: ApiSource, collection: str, runs: int) -> dict[str, list[tuple[int, float]]]:
    """Runs of ApiSource.rows interleaved with the raw baseline, so all see the same load."""
    coll = src.catalog().get(collection)
    reads = {"rows": lambda: src.rows(coll, ordered=False), "ordered": lambda: src.rows(coll),
             "baseline": lambda: range(raw_keyset(src, collection))}
    results: dict[str, list[tuple[int, float]]] = {key: [] for key in reads}
    for _ in range(runs):
        for key, read in reads.items():
            started = time.perf_counter()
            n = sum(1 for _ in read())
            results[key].append((n, time.perf_counter() - started))
    return results


def report(results: dict[str, list[tuple[int, float]]], label: str) -> None:
    names = {"rows": "ApiSource.rows unordered, as the loader reads", "ordered": "ApiSource.rows in id order",
             "baseline": "raw keyset loop, no conversion"}
    for key, runs in results.items():
        for n, secs in runs:
            print(f"api_read: {n:,} rows in {secs:.2f} s = {n / secs:,.0f} rows/s "
                  f"[{names[key]}] ({label})")
    summary = {key: round(max(n / s for n, s in runs)) for key, runs in results.items()}
    with open("/proc/loadavg") as fh:
        load = fh.read().split()[0]
    print(json.dumps({"bench": "api_read", "label": label, "rows": results["rows"][0][0],
                      "best_rows_per_s": summary["rows"], "ordered_rows_per_s": summary["ordered"],
                      "baseline_rows_per_s": summary["baseline"],
                      "load_avg_1m": float(load)}))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000, help="rows to build (default 200,000)")
    ap.add_argument("--version", default=None, help="PocketBase version (default: the venv's)")
    ap.add_argument("--pb-data", type=Path, help="serve a copy of this pb_data instead of building")
    ap.add_argument("--collection", default="bench")
    ap.add_argument("--url", help="read from this running server instead")
    ap.add_argument("--email", default=SUPERUSER[0])
    ap.add_argument("--password", default=SUPERUSER[1])
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--no-prefetch", action="store_true", help="fetch pages strictly in turn")
    args = ap.parse_args(argv)

    if args.url:
        src = ApiSource(args.url, args.email, args.password, prefetch=not args.no_prefetch)
        try:
            report(measure(src, args.collection, args.runs), f"{args.url}")
        finally:
            src.close()
        return 0

    with tempfile.TemporaryDirectory(prefix="pbm-bench-") as tmp:
        data = Path(tmp) / "pb_data"
        if args.pb_data:
            shutil.copytree(args.pb_data, data)
        server = PocketBaseServer(data, version=args.version)
        server.create_superuser(*SUPERUSER)
        try:
            if not args.pb_data:
                server.start()
                server.create_collection(bench_spec())
                server.stop()
                t0 = time.perf_counter()
                insert_rows(data / "data.db", args.rows)
                print(f"built {args.rows:,} rows in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            server.start()
            src = ApiSource(server.url, *SUPERUSER, prefetch=not args.no_prefetch)
            try:
                label = (f"PocketBase {server.version}, prefetch "
                         f"{'off' if args.no_prefetch else 'on'}")
                report(measure(src, args.collection, args.runs), label)
            finally:
                src.close()
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
