"""Where the machine's CPU goes during a DAG run, by process kind and over time (issue 16).

    python bench/cpu_timeline.py record bench/out/cpu.jsonl &   # then run the DAG, e.g. migrate.py
    kill %1; python bench/cpu_timeline.py report bench/out/cpu.jsonl [--bucket 3]

`record` samples every process's CPU (utime + stime from /proc) twice a second, with its command
line (Airflow retitles its processes, so the last non-empty title names each one). `report`
takes the window in which Airflow task processes existed and prints the core-seconds of each
kind (tasks, PostgreSQL backends, scheduler, API server, dag-processor, triggerer, ...) and a
timeline of busy cores per bucket. A process's CPU before its first sample is not counted, so
tasks shorter than the interval are under-counted. Idle cores in the timeline are what a faster
DAG can still use; a kind's constant share (the scheduler's) is what every second of the run costs.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load_profile import backend_cpu  # the same /proc stat reading, for any pid

KINDS = (("api_server", "api-server"), ("scheduler", "scheduler"), ("dag-processor", "dag-processor"),
         ("triggerer", "triggerer"), ("pgloader", "pgloader"), ("LocalExecutor", "executor"))


def record(path: Path, interval: float) -> None:
    with path.open("w") as out:
        while True:
            procs = {}
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    cpu = backend_cpu(int(pid))
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
                procs[pid] = [cmd[:160], cpu]
            out.write(json.dumps({"t": time.time(), "p": procs}) + "\n")
            out.flush()
            time.sleep(interval)


def kind(cmd: str) -> str:
    if cmd.startswith("postgres:"):
        return "postgres"
    if cmd.startswith("airflow worker -- 0"):  # a task's supervisor or runner, titled by its TI id
        return "tasks"
    return next((name for key, name in KINDS if key in cmd), "other")


def report(path: Path, bucket: float) -> None:
    samples = [json.loads(line) for line in path.open()]
    names = {pid: cmd for s in samples for pid, (cmd, _) in s["p"].items() if cmd.strip()}
    times = [s["t"] for s in samples if any(kind(names.get(p, "")) == "tasks" for p in s["p"])]
    if not times:
        raise SystemExit("no Airflow task process in the recording")
    t0, t1 = min(times), max(times)
    totals: collections.Counter = collections.Counter()
    timeline: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    for prev, cur in itertools.pairwise(samples):
        if not t0 <= cur["t"] <= t1 + 1:
            continue
        for pid, (_, cpu) in cur["p"].items():
            if pid in prev["p"]:
                used, name = cpu - prev["p"][pid][1], kind(names.get(pid, ""))
                totals[name] += used
                timeline[int((cur["t"] - t0) // bucket)][name] += used
    print(f"task window {t1 - t0:.1f} s: {sum(totals.values()):.1f} core-s used of "
          f"{os.cpu_count() * (t1 - t0):.1f}")
    for name, used in totals.most_common():
        print(f"  {used:7.1f} core-s  {name}")
    for b in sorted(timeline):
        busy = timeline[b]
        top = " ".join(f"{k}={v / bucket:.2f}" for k, v in busy.most_common(4))
        print(f"{b * bucket:6.0f} s  cores {sum(busy.values()) / bucket:4.2f}  {top}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["record", "report"])
    parser.add_argument("path", type=Path)
    parser.add_argument("--interval", type=float, default=0.5, help="record: seconds between samples")
    parser.add_argument("--bucket", type=float, default=3.0, help="report: seconds per timeline row")
    args = parser.parse_args()
    if args.action == "record":
        record(args.path, args.interval)
    else:
        report(args.path, args.bucket)


if __name__ == "__main__":
    main()
