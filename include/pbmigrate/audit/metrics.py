"""Pipeline metrics pushed to a Prometheus Pushgateway, so a person can watch a run in Grafana.

Batch tasks are short-lived and spread over Celery workers, so Prometheus cannot scrape them:
each task pushes what it did when it ends, and Prometheus scrapes the Pushgateway. Pushing is
best effort: with `PBM_PUSHGATEWAY_URL` unset nothing is sent, and a failed push logs a warning
and returns False, never raising into the pipeline (a migration must not fail for a graph).

Every push uses its own `CollectorRegistry` and a grouping key, so parallel batch tasks land
in separate groups and never overwrite each other (`pushadd`, POST: only metrics of the same
name in the same group are replaced, so a retried batch replaces its own earlier numbers).
All metrics carry `job="pbmigrate"` plus their grouping labels. They are gauges: each group
holds the numbers of one finished unit of work; sum them across groups in PromQL.

| metric | grouping and labels (besides job) | meaning |
|---|---|---|
| `pbm_plan_rows_source` | run_id, collection | rows in the source collection when partitioned |
| `pbm_plan_batches` | run_id, collection | batches the collection was partitioned into |
| `pbm_batch_rows_read` | run_id, collection, batch | rows the batch read from the source |
| `pbm_batch_rows_loaded` | run_id, collection, batch | rows the batch wrote into PostgreSQL |
| `pbm_batch_rows_rejected` | run_id, collection, batch | rows rejected (reasons in `pbm_meta.rejects`) |
| `pbm_batch_duration_seconds` | run_id, collection, batch | wall time of the batch |
| `pbm_batch_rows_per_second` | run_id, collection, batch | rows read per second of the batch |
| `pbm_batch_end_timestamp_seconds` | run_id, collection, batch | Unix time the batch finished |
| `pbm_phase_duration_seconds` | run_id, phase | wall time of a task group (data, validate, ...) |
| `pbm_phase_success` | run_id, phase | 1 if the task group succeeded, 0 if it failed |
| `pbm_checks_failed` | run_id, phase="validate", table | validation expectations that failed |
| `pbm_checks_passed` | run_id, phase="validate", table | validation expectations that passed |
| `pbm_cache_keys_written` | run_id, phase="cache"; pattern | Redis keys written per key pattern |
| `pbm_resync_rows_inserted` | phase="resync", collection; run_id | rows the last re-sync inserted |
| `pbm_resync_rows_updated` | phase="resync", collection; run_id | rows the last re-sync updated |
| `pbm_resync_rows_deleted` | phase="resync", collection; run_id | rows the last re-sync deleted |
| `pbm_resync_lag_seconds` | phase="resync", collection; run_id | age of the newest change not yet copied |
| `pbm_resync_end_timestamp_seconds` | phase="resync", collection; run_id | Unix time the last re-sync ended |
| `pbm_backend_flag` | flag="backend"; backend | 1 for the backend `pbm:backend` names, else 0 |

Labels before the semicolon are the Pushgateway grouping key, after it labels of the metric.
Pushed by, in order: `push_plan`, `push_batch`, `push_phase`, `push_checks`, `push_cache`,
`push_resync`, `push_backend_flag`.

Re-sync and the backend flag are grouped without run_id: a scheduled re-sync every few minutes
would otherwise pile up groups, and a person wants the latest value (run_id is kept as a label).
Migration groups are per run: delete old ones in the Pushgateway UI (or its API) when done.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Mapping
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, Gauge, push_to_gateway, pushadd_to_gateway

log = logging.getLogger(__name__)

ENV_URL = "PBM_PUSHGATEWAY_URL"
JOB = "pbmigrate"
TIMEOUT_SECONDS = 5.0
BACKENDS = ("pocketbase", "postgres")

# name -> help text; the single source of truth the dashboard test reads.
METRICS: dict[str, str] = {
    "pbm_plan_rows_source": "Rows in the source collection when the run partitioned it.",
    "pbm_plan_batches": "Batches the collection was partitioned into.",
    "pbm_batch_rows_read": "Rows the batch read from the source.",
    "pbm_batch_rows_loaded": "Rows the batch wrote into PostgreSQL.",
    "pbm_batch_rows_rejected": "Rows the batch rejected (reasons in pbm_meta.rejects).",
    "pbm_batch_duration_seconds": "Wall time of the batch.",
    "pbm_batch_rows_per_second": "Rows read per second of the batch.",
    "pbm_batch_end_timestamp_seconds": "Unix time the batch finished.",
    "pbm_phase_duration_seconds": "Wall time of a task group.",
    "pbm_phase_success": "1 if the task group succeeded, 0 if it failed.",
    "pbm_checks_failed": "Validation expectations that failed.",
    "pbm_checks_passed": "Validation expectations that passed.",
    "pbm_cache_keys_written": "Redis keys written per key pattern.",
    "pbm_resync_rows_inserted": "Rows the last re-sync inserted.",
    "pbm_resync_rows_updated": "Rows the last re-sync updated.",
    "pbm_resync_rows_deleted": "Rows the last re-sync deleted.",
    "pbm_resync_lag_seconds": "Age of the newest source change not yet in PostgreSQL when the re-sync ended.",
    "pbm_resync_end_timestamp_seconds": "Unix time the last re-sync of the collection ended.",
    "pbm_backend_flag": "1 for the backend the pbm:backend flag names, 0 for the others.",
}


def gateway_url() -> str | None:
    """The Pushgateway to push to, or None (metrics off) when PBM_PUSHGATEWAY_URL is unset or empty."""
    url = os.environ.get(ENV_URL, "").strip()
    return url or None


def _where(url: str) -> str:
    """host:port of the gateway for log lines, so credentials in a URL never reach a log."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    return f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)


def _push(
    values: Mapping[str, float | Mapping[tuple[str, ...], float]],
    grouping: Mapping[str, str],
    labelnames: tuple[str, ...] = (),
    replace: bool = False,
) -> bool:
    """Push gauges in one group. A value is a number, or {label values: number} for `labelnames`.

    `replace` uses PUT (the whole group is replaced); otherwise POST (same-name metrics only).
    """
    url = gateway_url()
    if url is None:
        return False
    try:
        registry = CollectorRegistry()
        for name, value in values.items():
            if isinstance(value, Mapping):
                gauge = Gauge(name, METRICS[name], labelnames, registry=registry)
                for label_values, number in value.items():
                    gauge.labels(*label_values).set(float(number))
            else:
                Gauge(name, METRICS[name], registry=registry).set(float(value))
        key = {k: str(v) for k, v in grouping.items()}
        push = push_to_gateway if replace else pushadd_to_gateway
        push(url, job=JOB, registry=registry, grouping_key=key, timeout=TIMEOUT_SECONDS)
    except Exception as exc:  # best effort: a metrics outage never fails a migration
        log.warning("metrics: push to Pushgateway %s failed (%s: %s)", _where(url), type(exc).__name__, exc)
        return False
    return True


def _per_second(rows: float, seconds: float) -> float:
    """Rows per second; 0 for a zero or unusable duration (a metrics call never raises)."""
    try:
        return rows / seconds if seconds > 0 else 0.0
    except TypeError:
        return 0.0


def push_plan(collection: str, rows_source: int, batches: int, run_id: str) -> bool:
    """After partitioning: the totals the dashboard's progress bars divide by."""
    return _push(
        {"pbm_plan_rows_source": rows_source, "pbm_plan_batches": batches},
        {"run_id": run_id, "collection": collection},
    )


def push_batch(
    collection: str,
    rows_read: int,
    rows_loaded: int,
    rows_rejected: int,
    seconds: float,
    run_id: str,
    *,
    batch: str | int,
) -> bool:
    """At the end of a batch task: its counts, duration and throughput in a group of its own.

    `batch` names the batch within its collection (its id range, say): batches of one collection
    that shared a name would overwrite each other in the Pushgateway.
    """
    return _push(
        {
            "pbm_batch_rows_read": rows_read,
            "pbm_batch_rows_loaded": rows_loaded,
            "pbm_batch_rows_rejected": rows_rejected,
            "pbm_batch_duration_seconds": seconds,
            "pbm_batch_rows_per_second": _per_second(rows_read, seconds),
            "pbm_batch_end_timestamp_seconds": time.time(),
        },
        {"run_id": run_id, "collection": collection, "batch": str(batch)},
    )


def push_phase(phase: str, seconds: float, ok: bool, run_id: str) -> bool:
    """At the end of a task group: how long the phase took and whether it passed."""
    return _push(
        {"pbm_phase_duration_seconds": seconds, "pbm_phase_success": 1 if ok else 0},
        {"run_id": run_id, "phase": phase},
    )


def push_checks(failed: int, passed: int, run_id: str, table: str = "all") -> bool:
    """After validation: failed and passed expectations, per table or once for the run ("all")."""
    return _push(
        {"pbm_checks_failed": failed, "pbm_checks_passed": passed},
        {"run_id": run_id, "phase": "validate", "table": table},
    )


def push_cache(keys_by_pattern: Mapping[str, int], run_id: str) -> bool:
    """After cache warming: keys written per Redis key pattern. Each pattern has a group of its
    own, because the warm-up sections push from separate tasks and a push replaces same-named
    metrics within its group."""
    ok = True
    for pattern, n in keys_by_pattern.items():
        section = re.sub(r"[^A-Za-z0-9]+", "_", pattern).strip("_")
        ok &= _push(
            {"pbm_cache_keys_written": {(pattern,): n}},
            {"run_id": run_id, "phase": "cache", "section": section},
            labelnames=("pattern",),
        )
    return ok


def push_resync(
    collection: str, inserted: int, updated: int, deleted: int, lag_seconds: float, run_id: str
) -> bool:
    """After re-syncing a collection: what changed and how far PostgreSQL is behind (latest only)."""
    key = (run_id,)
    return _push(
        {
            "pbm_resync_rows_inserted": {key: inserted},
            "pbm_resync_rows_updated": {key: updated},
            "pbm_resync_rows_deleted": {key: deleted},
            "pbm_resync_lag_seconds": {key: lag_seconds},
            "pbm_resync_end_timestamp_seconds": {key: time.time()},
        },
        {"phase": "resync", "collection": collection},
        labelnames=("run_id",),
        replace=True,
    )


def push_backend_flag(value: str) -> bool:
    """After a cut-over or roll-back: which backend the game server is told to use."""
    states = {(b,): 1.0 if b == value else 0.0 for b in (*BACKENDS, value)}
    return _push({"pbm_backend_flag": states}, {"flag": "backend"}, labelnames=("backend",), replace=True)
