"""How fast the `files` task group copies PocketBase's uploads, against a plain `cp -r` of the same
storage folder to the same disk, measured in the same run (target: >= 80 %), and whether memory
stays flat in file size.

    python bench/files.py                       # 10,000 small files and 200 files of 5 MB
    python bench/files.py --small 2000 --large 50 --rounds 1

Steps per case: a real PocketBase 0.40.6 creates the collection (one `file` field); records and
files are then written in PocketBase's storage form with the server stopped (rows in data.db,
`storage/<collectionId>/<recordId>/<name>` plus its `.attrs` with the real md5), since 10,000
multipart uploads would measure PocketBase, not the copy. The data phase runs with the migration's
own task functions. Then, `--rounds` times and alternating: `cp -r` of the collection's storage
folder, and every `copy_batch` task of the files group (one id range each, as the DAG maps them)
in a fresh child process, which reports its time (the tasks only: interpreter start and module
imports excluded; opening the source, planning and the ledger's writes included) and peak RSS.
Both write to the same disk, once from a page-cached source ("warm") and once with the source's
own pages dropped from the cache first (`posix_fadvise(DONTNEED)`, "cold": a real
migration reads storage from disk). Figures go to stdout and to bench/out/files.json.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parents[1]
ADMIN_URL = os.environ.get("PBM_BENCH_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
ID_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789"


def build(dest: Path, files: int, size_lo: int, size_hi: int, seed: int) -> tuple[Path, str, int]:
    """pb_data with one collection `uploads` holding `files` records of one file each."""
    import random

    from pbdev.pbserver import PocketBaseServer

    pb_data = dest / "pb_data"
    with PocketBaseServer(pb_data, version="0.40.6") as pb:
        pb.create_collection({"name": "uploads", "fields": [{"name": "doc", "type": "file"}]})
        cid = pb.collection("uploads")["id"]
    rnd = random.Random(seed)
    block = os.urandom(size_hi + 64)
    rows, total = [], 0
    for i in range(files):
        rid = "".join(rnd.choice(ID_CHARS) for _ in range(15))
        name = f"doc_{i:06d}_{rid[:10]}.bin"
        size = rnd.randint(size_lo, size_hi)
        data = block[i % 64: i % 64 + size]
        folder = pb_data / "storage" / cid / rid
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
        attrs = {"user.cache_control": "", "user.content_disposition": "", "user.content_encoding": "",
                 "user.content_language": "", "user.content_type": "application/octet-stream",
                 "user.metadata": {"original-filename": f"doc {i}.bin"},
                 "md5": base64.b64encode(hashlib.md5(data).digest()).decode()}
        (folder / (name + ".attrs")).write_text(json.dumps(attrs))
        for f in (folder / name, folder / (name + ".attrs")):  # on disk, so "cold" can evict it
            fd = os.open(f, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        rows.append((rid, name, "2026-01-01 00:00:00.000Z", "2026-01-01 00:00:00.000Z"))
        total += size
    with sqlite3.connect(pb_data / "data.db") as conn:
        conn.executemany("INSERT INTO uploads (id, doc, created, updated) VALUES (?, ?, ?, ?)", rows)
    return pb_data, cid, total


def load(pb_data: Path, pg_url: str, target: str, batch_size: int) -> dict:
    from pbmigrate import tasks

    params = tasks.run_params(source_path=str(pb_data), target_schema=target, mapping="", batch_size=batch_size,
                                 collections=["uploads"], orphans="reject")
    run = tasks.prepare(params=params, pg_url=pg_url, dag_run_id=f"bench_{target}")
    tasks.create_schema(run, pg_url)
    for b in tasks.plan_batches(run):
        tasks.run_batch(run, b, pg_url)
    tasks.finalize_run(run, pg_url)
    return run


def peak_rss_mb() -> float:
    """This process's peak RSS since exec (VmHWM; ru_maxrss would carry the parent's over exec)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(spec: str) -> int:
    """Run the files group's copy tasks; print seconds and peak RSS (MB) as JSON."""
    import fsspec  # noqa: F401 - module imports are a task process's start-up, not copying
    import s3fs  # noqa: F401

    from pbmigrate import files, tasks  # noqa: F401

    run, pg_url, store = json.loads(spec)
    batches = files.plan_file_batches(run, pg_url, files=store)
    started = time.monotonic()
    results = [files.copy_batch(run, b, pg_url, store) for b in batches]
    seconds = time.monotonic() - started
    rss = peak_rss_mb()
    print(json.dumps({"seconds": seconds, "rss_mb": rss, "copied": sum(r["copied"] for r in results),
                      "bytes": sum(r["bytes_copied"] for r in results), "batches": len(batches)}))
    return 0


def evict(folder: Path) -> None:
    """Drop this folder's files (and only these) from the page cache: a cold read from the disk."""
    for dirpath, _, names in os.walk(folder):
        for name in names:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)


def cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def reset_ledger(pg_url: str, run_id: str) -> None:
    from pbmigrate.audit.meta import ensure_meta

    with psycopg.connect(pg_url, autocommit=True) as conn:
        ensure_meta(conn)
        conn.execute("DELETE FROM pbm_meta.files WHERE run_id = %s", (run_id,))


def measure(case: str, files_n: int, size_lo: int, size_hi: int, work: Path, pg_url: str, rounds: int,
            batch_size: int) -> dict:
    pb_data, cid, total = build(work / case, files_n, size_lo, size_hi, seed=files_n)
    run = load(pb_data, pg_url, f"bench_files_{case}", batch_size)
    src = pb_data / "storage" / cid
    shutil.copytree(src, work / case / "warm")  # the source is page-cached for both
    shutil.rmtree(work / case / "warm")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "include"), os.environ.get("PYTHONPATH", "")])}
    runs: dict[str, dict[str, list[float]]] = {}
    rss = []
    for i in range(rounds):
        for cache in ("warm", "cold"):
            fig = runs.setdefault(cache, {"cp": [], "files": [], "cp_cpu": [], "files_cpu": []})
            dest, store_dir = work / case / f"cp_{i}", work / case / f"store_{i}"
            order = ("cp", "files") if i % 2 == 0 else ("files", "cp")  # neither always runs first
            for what in order:
                os.sync()  # neither pays for writing back the other's 1 GB: each starts with no dirty pages
                if cache == "cold":
                    evict(src)
                if what == "cp":
                    c0, t0 = cpu_children(), time.monotonic()
                    subprocess.run(["cp", "-r", str(src), str(dest)], check=True)
                    fig["cp"].append(time.monotonic() - t0)
                    fig["cp_cpu"].append(cpu_children() - c0)
                    continue
                reset_ledger(pg_url, run["run_id"])
                c0 = cpu_children()
                proc = subprocess.run([sys.executable, __file__, "--child",
                                       json.dumps([run, pg_url, {"url": store_dir.as_uri(), "options": {}}])],
                                      env=env, capture_output=True, text=True)
                if proc.returncode:
                    sys.exit(f"copy process failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
                out = proc.stdout
                got = json.loads(out.strip().splitlines()[-1])
                assert got["copied"] == files_n, got
                fig["files"].append(got["seconds"])
                fig["files_cpu"].append(cpu_children() - c0)  # the child's whole life: imports included
                rss.append(got["rss_mb"])
            shutil.rmtree(dest)  # both copies go only after both ran: a deletion does not slow the other
            shutil.rmtree(store_dir)
            time.sleep(1)
            print(f"{case} {cache} round {i + 1}: cp -r {fig['cp'][-1]:.2f} s, files group {fig['files'][-1]:.2f} s "
                  f"({fig['cp'][-1] / fig['files'][-1]:.0%} of cp's speed), peak RSS {rss[-1]:.0f} MB", flush=True)
    out_fig: dict = {"files": files_n, "bytes": total, "rounds": rounds, "peak_rss_mb": max(rss)}
    for cache, fig in runs.items():
        cp_med, our_med = statistics.median(fig["cp"]), statistics.median(fig["files"])
        out_fig[cache] = {**{k: [round(x, 3) for x in v] for k, v in fig.items()},
                          "cp_median": round(cp_med, 3), "files_median": round(our_med, 3),
                          "speed_vs_cp": round(cp_med / our_med, 3),
                          "speed_vs_cp_per_round": [round(a / b, 3) for a, b in zip(fig["cp"], fig["files"])],
                          # rounds pair a cp -r and a copy run back to back: on a shared machine the
                          # median of their ratios is steadier than the ratio of two medians
                          "speed_vs_cp_round_median": round(statistics.median(
                              a / b for a, b in zip(fig["cp"], fig["files"])), 3),
                          "files_per_s": round(files_n / our_med), "mb_per_s": round(total / our_med / 1e6, 1)}
    return out_fig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--small", type=int, default=10_000, help="small files (4-16 KB)")
    ap.add_argument("--large", type=int, default=200, help="files of 5 MB")
    ap.add_argument("--huge", type=int, default=4, help="files of 64 MB (memory must not follow file size)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=2_500, help="records per copy task (id range)")
    ap.add_argument("--work", type=Path, help="folder for pb_data, copies and store (default: a temp dir)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args.child)
    work = Path(tempfile.mkdtemp(prefix="pbm_bench_files_", dir=args.work))
    db = f"pbm_bench_files_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{db}"')
    pg_url = ADMIN_URL.rsplit("/", 1)[0] + "/" + db
    try:
        figures = {}  # a count of 0 skips its case
        if args.small:
            figures["small"] = measure("small", args.small, 4096, 16384, work, pg_url, args.rounds, args.batch_size)
        if args.large:
            figures["large"] = measure("large", args.large, 5 * 1024 * 1024, 5 * 1024 * 1024, work, pg_url,
                                       args.rounds, args.batch_size)
        if args.huge:
            figures["huge"] = measure("huge", args.huge, 64 << 20, 64 << 20, work, pg_url, 1, args.batch_size)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
    for case, f in figures.items():
        for cache in ("warm", "cold"):
            c = f[cache]
            print(f"{case} ({cache} source): {f['files']:,} files, {f['bytes'] / 1e6:,.0f} MB: files group "
                  f"{c['files_median']:.2f} s ({c['files_per_s']:,} files/s, {c['mb_per_s']} MB/s) against cp -r "
                  f"{c['cp_median']:.2f} s: {c['speed_vs_cp']:.0%} of cp's speed on medians, "
                  f"{c['speed_vs_cp_round_median']:.0%} median of the rounds (target >= 80 %)")
        print(f"{case}: peak RSS of a copy process {f['peak_rss_mb']:.0f} MB")
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "files.json").write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
