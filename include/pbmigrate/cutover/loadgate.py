"""The pipeline's optional load test before promotion: run it, record it, and gate on it.

The step (param ``loadtest``, off by default) runs a short `make loadtest` against the run's
staging schema: the game service serves the staging schema from a private Redis warmed from it,
and PocketBase serves a copy of the run's source snapshot, so both answer on the same data and
nothing the game uses is touched. The runner (`bench/loadtest/run.py`, ``PBM_LOADTEST_SCRIPT``)
is a separate process: the engine never imports the game service or Locust.

Why reads only by default (``loadtest_mix``): the staging schema is what the cut-over promotes.
Synthetic match results written into it would become players' history and ratings, and the
validation that passed would no longer describe the data. No login either: the load test does
not know the players' passwords, so returning players carry sessions made for the private Redis.

The figures go to ``pbm_meta.loadtests`` (one row per load test, whatever the verdict). With
``loadtest_gate`` on, a run whose improvement (the new stack's capacity / PocketBase's, same
run) is below ``loadtest_min_improvement``, or whose error rate is above
``loadtest_max_error_rate``, is refused: the task fails in one line, nothing is promoted and the
staging schema stays as validated (a roll-back stays the operator's decision). A roll-back is
never held back by a load test.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from pbmigrate.audit.meta import ensure_meta
from pbmigrate.context import work_dir
from pbmigrate.cutover.promote import waiting_run
from pbmigrate.errors import ParamError, PbmError, Permanent, Refused

log = logging.getLogger("pbmigrate")

ROOT = Path(__file__).resolve().parents[3]
READ_MIX = "profile_me=3,profile_other=2,leaderboard=3,history=1,inventory=1"
JOURNEYS = ("profile_me", "profile_other", "leaderboard", "history", "inventory", "match_result")
CAPACITY_STEPS = "100,250,500,750,1000,1500,2000"
STAGES = ("migration", "cutover")
REFERENCE_BROKEN = 0.5  # PocketBase failing this share of the players run is no reference to compare with



class LoadtestRefused(Refused):
    """The load test's figures missed the gate's limits; promotion is refused."""


class LoadtestUnavailable(Permanent):
    """The load test cannot run here (no runner script, no redis-server); a retry would not help."""


@dataclass(frozen=True)
class LoadtestOptions:
    """The step's params (see the DAGs' descriptions)."""

    enabled: bool = False
    gate: bool = False
    min_improvement: float = 1.5
    max_error_rate: float = 0.001
    users: int = 300
    duration: int = 15
    mix: str = READ_MIX

    def __post_init__(self) -> None:
        if self.users < 1 or self.duration < 1:
            raise ParamError("loadtest_users and loadtest_duration must be at least 1")
        if self.min_improvement < 0 or not 0 <= self.max_error_rate <= 1:
            raise ParamError("loadtest_min_improvement must be >= 0 and loadtest_max_error_rate within 0..1")
        for part in self.mix.split(","):
            name, _, weight = part.partition("=")
            if name not in JOURNEYS or not weight.isdigit():
                raise ParamError(f"loadtest_mix: {part!r} is not journey=weight (journeys: {', '.join(JOURNEYS)})")


def options(params: Mapping[str, Any], mix: str = "") -> LoadtestOptions:
    """The options from a DAG's params (``mix`` as `param_text` reads it: empty is reads only)."""
    return LoadtestOptions(
        enabled=bool(params.get("loadtest")), gate=bool(params.get("loadtest_gate")),
        min_improvement=float(params.get("loadtest_min_improvement", 1.5)),
        max_error_rate=float(params.get("loadtest_max_error_rate", 0.001)),
        users=int(params.get("loadtest_users", 300)), duration=int(params.get("loadtest_duration", 15)),
        mix=mix or READ_MIX)


def improvement(report: Mapping[str, Any]) -> float | None:
    """The new stack's capacity / PocketBase's, or None when there is no PocketBase reference."""
    pb = (report.get("pocketbase") or {}).get("capacity_rps")
    pg = (report.get("postgres") or {}).get("capacity_rps") or 0.0
    if pb is None:
        return None
    if pb == 0:
        return math.inf if pg > 0 else 0.0  # PocketBase held none of the steps
    return round(pg / pb, 3)


def evaluate(report: Mapping[str, Any], opts: LoadtestOptions) -> list[str]:
    """Why the figures miss the limits (empty: they pass)."""
    pg = report.get("postgres")
    if not pg:
        return ["the load test has no figures for the new stack"]
    reasons = []
    if pg["error_rate"] > opts.max_error_rate:
        bad = sorted((e["error_rate"], n) for n, e in pg.get("endpoints", {}).items() if e["error_rate"])[-3:]
        worst = ", ".join(f"{n} {r:.2%}" for r, n in reversed(bad))
        reasons.append(f"error rate {pg['error_rate']:.3%} above loadtest_max_error_rate {opts.max_error_rate:.3%}"
                       + (f" ({worst})" if worst else ""))
    ref = report.get("pocketbase") or {}
    if opts.min_improvement > 0 and ref.get("error_rate", 0.0) >= REFERENCE_BROKEN:
        # a reference that cannot answer the journeys (another game's shape, a broken copy) would
        # make any capacity look like an improvement
        reasons.append(f"the PocketBase reference failed {ref['error_rate']:.1%} of its players run, "
                       "so its capacity is no reference; see its report")
    elif opts.min_improvement > 0:
        ratio = improvement(report)
        if ratio is None:
            reasons.append("no PocketBase reference (API mode or no source snapshot), so "
                           "loadtest_min_improvement cannot be checked; set it to 0 to gate on errors only")
        elif ratio < opts.min_improvement:
            reasons.append(f"improvement {ratio:.2f} (capacity {pg['capacity_rps']} rps vs PocketBase "
                           f"{report['pocketbase']['capacity_rps']} rps) below loadtest_min_improvement "
                           f"{opts.min_improvement:.2f}")
    return reasons


def runner_script() -> Path:
    """The load-test runner: ``PBM_LOADTEST_SCRIPT``, else the repository's bench/loadtest/run.py."""
    return Path(os.environ.get("PBM_LOADTEST_SCRIPT") or ROOT / "bench" / "loadtest" / "run.py")


def run_loadtest(run: Mapping[str, Any], pg_url: str, opts: LoadtestOptions, out_dir: Path) -> tuple[dict, Path]:
    """One short load test of ``run``'s staging schema; the runner's JSON report and its path."""
    script = runner_script()
    if not script.is_file():
        raise LoadtestUnavailable(f"no load-test runner at {script} (set PBM_LOADTEST_SCRIPT)")
    scratch_redis = os.environ.get("PBM_LOADTEST_REDIS_URL", "")  # never the game's: sessions are made in it
    if not scratch_redis and not shutil.which("redis-server"):
        raise LoadtestUnavailable("the load test runs a private redis-server, and none is on PATH "
                                  "(or set PBM_LOADTEST_REDIS_URL to a scratch Redis)")
    snapshot = run.get("snapshot_path") or ""
    with_pb = run.get("source_kind") == "sqlite" and Path(snapshot).is_file()
    steps = os.environ.get("PBM_LOADTEST_CAPACITY_STEPS") or CAPACITY_STEPS
    spawn = max(10, math.ceil(opts.users / 10))  # a ten-second ramp
    cooldown = 3
    env = {**os.environ, "USERS": str(opts.users), "DURATION": str(opts.duration), "SPAWN_RATE": str(spawn),
           "THINK": os.environ.get("PBM_LOADTEST_THINK", "1,3"), "LOGIN_SHARE": "0", "MIX": opts.mix,
           "CAPACITY_STEPS": steps, "COOLDOWN": str(cooldown), "OUT": str(out_dir),
           "SERVICE_WORKERS": os.environ.get("PBM_LOADTEST_WORKERS", "2"),
           "BACKENDS": "pocketbase,postgres" if with_pb else "postgres", "LT_PG_URL": pg_url,
           "LT_SCHEMA": run["staging_schema"], "LT_MAPPING": (run.get("params") or {}).get("mapping") or "",
           "LT_PB_DATA": snapshot if with_pb else "", "LT_REDIS_URL": scratch_redis}
    backends = 2 if with_pb else 1
    per_step = opts.duration + 2 + cooldown + 10  # + Locust's start and stop
    timeout = 300 + backends * (cooldown + 10 + opts.duration + 2 * len(steps.split(",")) * per_step)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "runner.log"
    log.info("load test of %s: %d players, %d s per step, mix %s, PocketBase reference: %s (log %s)",
             run["staging_schema"], opts.users, opts.duration, opts.mix, "snapshot copy" if with_pb else "none",
             log_path)
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=out,
                                start_new_session=True)
        try:
            stdout, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.communicate(timeout=30)
            raise PbmError(f"the load test did not finish within {timeout} s (log {log_path})") from None
    lines = stdout.decode(errors="replace").strip().splitlines()
    log_path.with_name("runner.out").write_text("\n".join(lines))
    if proc.returncode != 0 or not lines or not Path(lines[-1]).is_file():
        raise PbmError(f"the load test failed (exit {proc.returncode}); log {log_path}")
    path = Path(lines[-1])
    return json.loads(path.read_text()), path


def _figure(value: Any) -> float | None:
    return None if value is None or (isinstance(value, float) and not math.isfinite(value)) else float(value)


def record(conn: psycopg.Connection, run: Mapping[str, Any], stage: str, dag_run_id: str | None,
           opts: LoadtestOptions, report: Mapping[str, Any], path: Path | None, reasons: list[str],
           seconds: float) -> int:
    """One pbm_meta.loadtests row; its id."""
    pg = report.get("postgres") or {}
    ratio = improvement(report)
    (row_id,) = conn.execute(
        """INSERT INTO pbm_meta.loadtests (run_id, dag_run_id, stage, target_schema, schema_tested, users, duration_s,
               mix, pocketbase_capacity_rps, postgres_capacity_rps, improvement, rps, p50_ms, p95_ms, p99_ms,
               error_rate, gate, min_improvement, max_error_rate, passed, reasons, report, report_path, seconds)
           VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
           RETURNING id""",
        (run["run_id"], dag_run_id, stage, run["target_schema"], run["staging_schema"], opts.users, opts.duration,
         opts.mix, _figure((report.get("pocketbase") or {}).get("capacity_rps")), _figure(pg.get("capacity_rps")),
         _figure(ratio), _figure(pg.get("rps")), _figure(pg.get("p50_ms")), _figure(pg.get("p95_ms")),
         _figure(pg.get("p99_ms")), _figure(pg.get("error_rate")), opts.gate, opts.min_improvement,
         opts.max_error_rate, not reasons, Jsonb(reasons), Jsonb(report), str(path) if path else None,
         round(seconds, 1))).fetchone()
    return int(row_id)


def skipped(why: str) -> dict[str, Any]:
    log.info("load test skipped: %s", why)
    return {"skipped": True, "why": why}


def loadtest_step(run: Mapping[str, Any], pg_url: str, opts: LoadtestOptions, *, stage: str,
                  dag_run_id: str | None = None) -> dict[str, Any]:
    """The DAGs' ``loadtest`` task: run, record, and refuse promotion when gating and the figures miss."""
    if stage not in STAGES:
        raise ParamError(f"stage must be one of {STAGES}, not {stage!r}")
    if not opts.enabled:
        return skipped("param loadtest is off")
    started = time.monotonic()
    out = work_dir() / "loadtests" / run["run_id"] / time.strftime("%Y%m%d-%H%M%S")
    report, path = run_loadtest(run, pg_url, opts, out)
    reasons = evaluate(report, opts)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        ensure_meta(conn)
        row_id = record(conn, run, stage, dag_run_id, opts, report, path, reasons, time.monotonic() - started)
    ratio = improvement(report)
    pg = report["postgres"]
    summary = {"id": row_id, "run_id": run["run_id"], "stage": stage, "passed": not reasons, "reasons": reasons,
               "gate": opts.gate, "improvement": _figure(ratio), "postgres_capacity_rps": pg["capacity_rps"],
               "pocketbase_capacity_rps": (report.get("pocketbase") or {}).get("capacity_rps"),
               "p95_ms": pg["p95_ms"], "error_rate": pg["error_rate"], "report": str(path), "options": asdict(opts)}
    log.info("load test %d of %s: new stack %s rps capacity, p95 %s ms, errors %.3f%%; PocketBase %s rps; "
             "improvement %s -> %s", row_id, run["staging_schema"], pg["capacity_rps"], pg["p95_ms"],
             100 * pg["error_rate"], summary["pocketbase_capacity_rps"], ratio,
             "passed" if not reasons else "; ".join(reasons))
    if reasons and opts.gate:
        raise LoadtestRefused(f"load test {row_id} refuses promotion of run {run['run_id']}: {'; '.join(reasons)}")
    return summary


def before_action(action: str, target_schema: str, pg_url: str, opts: LoadtestOptions,
                  dag_run_id: str | None = None) -> dict[str, Any]:
    """pocketbase_cutover's ``loadtest`` task: the run waiting in staging, before action=cutover only."""
    if action != "cutover":
        return skipped(f"action={action}: a roll-back is never held back by a load test")
    if not opts.enabled:
        return skipped("param loadtest is off")
    run = waiting_run(target_schema, pg_url)
    if run is None:
        return skipped(f"no run waits in {target_schema}'s staging schema (the cut-over will say why)")
    return loadtest_step(run, pg_url, opts, stage="cutover", dag_run_id=dag_run_id)
