"""
### PocketBase -> PostgreSQL: scheduled re-sync until cut-over

Keeps the schema that `pocketbase_migration` loaded (its staging schema, before cut-over) current
with the live PocketBase, so the final cut-over only has a few seconds of changes left to copy.
Every run snapshots PocketBase read-only, then per collection upserts rows whose `updated` is later
than the stored watermark minus `overlap_seconds`, finds hard deletes by walking both id sets
range by range, and compares collections without `updated` by per-range checksums. The figures
(inserted / updated / deleted per collection) are in the task log and in `pbm_meta.resyncs`.

Guards: a re-sync never runs while a migration task writes the same target (advisory lock), and
after a cut-over it refuses (PostgreSQL is the source of truth then) unless `force` is set.
Created paused: unpause it after the first full load. Schedule: `PBM_RESYNC_SCHEDULE`
(cron, default every 15 minutes), no catch-up; trigger by hand at any time. A scheduled run has no
conf: `source_path`, `mapping` and `collections` left empty are those the migration that built the
target ran with (`pbm_meta.runs`); given, they override (a different mapping or collection set is
refused). Once the target is cut over a run ends **skipped**, its log saying why in one line: the
schedule keeps firing until someone pauses the DAG, and a cut-over target is a state, not a fault.
"""

from __future__ import annotations

import os
from datetime import datetime

from airflow.sdk import Param, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowSkipException

from pbm_airflow import default_args, fail_fast, files_store, pocketbase_api, postgres_url, source_params


@dag(
    dag_id="pocketbase_resync",
    schedule=os.environ.get("PBM_RESYNC_SCHEDULE", "*/15 * * * *"),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    is_paused_upon_creation=True,
    default_args=default_args(),
    doc_md=__doc__,
    tags=["pbmigrate", "resync"],
    params={
        **source_params(recorded=True),
        "overlap_seconds": Param(300, type="integer", minimum=0,
                                 description="Re-read rows updated this long before the stored watermark "
                                             "(clock skew, transactions in flight at the last snapshot)."),
        "force": Param(False, type="boolean",
                       description="Re-sync even after a cut-over (into the live schema). Only while PocketBase "
                                   "is still the system being written, e.g. after the flag was flipped back."),
    },
)
def pocketbase_resync():
    # The next scheduled run retries a failure; retrying a refusal at once would only repeat it.
    @task(retries=0)
    @fail_fast
    def resync() -> dict:
        from pbmigrate.resync import TargetCutOver, run_resync

        ctx = get_current_context()
        p = ctx["params"]
        try:
            return run_resync(
                source_path=p["source_path"], target_schema=p["target_schema"], mapping=p["mapping"],
                collections=p["collections"], overlap_seconds=p["overlap_seconds"], force=p["force"],
                pg_url=postgres_url(), resync_id=ctx["run_id"], api=pocketbase_api(), files=files_store(),
            )
        except TargetCutOver as exc:
            raise AirflowSkipException(str(exc)) from exc

    resync()


pocketbase_resync()
