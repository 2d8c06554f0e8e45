"""
### Cut over or roll back, on its own

The automated roll-back the user asked for, and the second half of a manual cut-over.

- **action = cutover**: promote the run waiting in `<target_schema>_staging` (it must have passed
  the gate, for example a migration run with `cutover=manual`): `pg_dump` of the live schema, then
  in one transaction live -> `<target_schema>_previous` and staging -> live, then the feature
  flag `pbm:backend` = `postgres` (Redis and `pbm_meta.flags`).
- **action = rollback**: undo one step. A staging schema still waiting is dropped (live schema and
  flag unchanged); otherwise the last cut-over is undone: the flag goes to `pocketbase` first,
  then live -> `<target_schema>_rolled_back` and `<target_schema>_previous` (or its `pg_dump`)
  -> live.

Every action is recorded in `pbm_meta.cutovers` and in the run's reconciliation report. With
`loadtest` on, a cut-over is preceded by a short load test of the staging schema (figures in
`pbm_meta.loadtests`; with `loadtest_gate`, a miss refuses the cut-over); a roll-back never is.
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import Param, dag, get_current_context, task

from pbm_airflow import default_args, fail_fast, loadtest_params, param_text, postgres_url, redis_url


@dag(
    dag_id="pocketbase_cutover",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=default_args(),
    doc_md=__doc__,
    tags=["pbmigrate", "cutover", "rollback"],
    params={
        # no default: a trigger must say which, so nobody rolls production back by accident
        "action": Param(type="string", enum=["cutover", "rollback"],
                        description="cutover: promote the validated staging schema; rollback: undo one step."),
        "target_schema": Param("game", type="string", pattern=r"^[a-z_][a-z0-9_]{0,39}$",
                               description="Live PostgreSQL schema the action applies to."),
        "reason": Param("", type=["null", "string"], description="Why (kept in pbm_meta.cutovers and the report)."),
        **loadtest_params(),
    },
)
def pocketbase_cutover():
    @task
    @fail_fast
    def apply() -> dict:
        from pbmigrate import tasks

        p = get_current_context()["params"]  # nothing to cut over is a refusal: fail_fast, no retry
        return tasks.cutover_action(p["action"], p["target_schema"], postgres_url(), redis_url(), p["reason"] or "")

    @task
    @fail_fast
    def loadtest() -> dict:
        """action=cutover with param loadtest: load-test the waiting staging schema first (never before a roll-back)."""
        from pbmigrate import tasks

        ctx = get_current_context()
        p = ctx["params"]
        return tasks.loadtest_before_action(p["action"], p["target_schema"], postgres_url(), p,
                                            param_text(p, "loadtest_mix"), dag_run_id=ctx["run_id"])

    loadtest() >> apply()


pocketbase_cutover()
