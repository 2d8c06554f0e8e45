"""
### PocketBase -> PostgreSQL + Redis: full migration

Reads the user's plan top to bottom: **prepare** (connections and privileges, a consistent
snapshot of the source; the pre-migration assessment runs after the files, beside the checks, at
a lower CPU priority: the load's own pass found the bad values), **data** (typed tables in the
staging schema and the batches planned, one load task per slot sharing the id ranges, then keys,
indexes and foreign keys, and the files' plan), **files** (the uploads behind
every file field, one mapped task per id range, into the `pbm_files` store),
**validate** (one GX checkpoint per table, per-batch checksums, then the gate on them, which
branches and picks the end), **cache** (warm Redis from the migrated
tables: public profiles, leaderboards, games in progress), the optional **loadtest** (param
`loadtest`: the game service on the staging schema against PocketBase on the source snapshot,
recorded in `pbm_meta.loadtests`; with `loadtest_gate` a miss refuses promotion), and the end:
**cut over** (backups, schema swap, feature flag), **hold** (`cutover=manual`: validated, waiting
for the pocketbase_cutover DAG) or **roll back** (staging dropped; the run ends failed).
The reconciliation report ends the log of whichever of the three ran. `mode=final` skips the
snapshot and everything up to the checks (`final_sync` runs instead); `mode=full` skips `final_sync`.

Every task is one call into `pbmigrate`; the DAG only wires them. Re-triggering a failed run
resumes it: batches already in the ledger (`pbm_meta.batches`) are skipped.
"""

from __future__ import annotations

from datetime import datetime

from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import Param, conf, dag, get_current_context, task, task_group
from airflow.sdk.exceptions import AirflowSkipException

from pbm_airflow import (
    default_args,
    fail_fast,
    files_store,
    loadtest_params,
    param_text,
    pocketbase_api,
    postgres_url,
    redis_url,
    source_params,
)


def migration_run() -> dict:
    """The run the checks, the gate and every task after it work on: the fresh load's, or the final
    re-sync's (with its snapshot). Each pulls it itself: a task that only passed it on cost its
    start-up on the critical path. Only the branch that ran is pulled: pulling the skipped one's
    XCom would log an error-level "XCom not found" for a skip that is by design."""
    ctx = get_current_context()
    ran = "final_sync" if ctx["params"]["mode"] == "final" else "prepare.snapshot"
    return ctx["ti"].xcom_pull(task_ids=ran)


def gate_verdict() -> dict:
    """The verdict `validate.checks` recorded with its branch (the ends and roll_back read it)."""
    return get_current_context()["ti"].xcom_pull(task_ids="validate.checks", key="verdict")


@dag(
    dag_id="pocketbase_migration",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=default_args(),
    doc_md=__doc__,
    tags=["pbmigrate", "migration"],
    params={
        **source_params(),
        "batch_size": Param(100_000, type="integer", minimum=1,
                            description="Rows per batch task (one id range of one collection)."),
        "orphans": Param("reject", enum=["reject", "null"],
                         description="Dangling relation ids: reject the row, or load it with the relation NULL."),
        "max_reject_ratio": Param(0.0, type="number", minimum=0, maximum=1,
                                  description="Rejected / read rows above which the gate refuses promotion."),
        "mode": Param("full", enum=["full", "final"],
                      description="full: snapshot and load into the staging schema. final: PocketBase frozen, "
                                  "one last re-sync of the loaded staging schema, then the gates and the cut-over."),
        "overlap_seconds": Param(300, type="integer", minimum=0,
                                 description="mode=final: re-read rows updated this long before the watermark."),
        "cutover": Param("auto", enum=["auto", "manual"],
                         description="auto: cut over when the gate passes. manual: stop when ready (flag "
                                     "unchanged); promote later with the pocketbase_cutover DAG."),
        **loadtest_params(),
    },
)
def pocketbase_migration():
    @task_group(group_id="prepare")
    def prepare():
        @task
        @fail_fast
        def snapshot() -> dict:
            ctx = get_current_context()
            p = ctx["params"]
            if p["mode"] == "final":
                raise AirflowSkipException("mode=final: no fresh snapshot and load, the final re-sync runs")
            from pbmigrate import tasks

            params = tasks.run_params(
                source_path=param_text(p, "source_path"), target_schema=p["target_schema"],
                mapping=param_text(p, "mapping"), batch_size=p["batch_size"], collections=p["collections"] or [],
                orphans=p["orphans"],
            )
            return tasks.prepare(params=params, pg_url=postgres_url(), dag_run_id=ctx["run_id"],
                                    api=pocketbase_api())

        # After the files (wired below), beside the checks: never on the critical path, so it takes
        # the slot the last files task frees (held up to [workers] min_heartbeat_interval after it
        # ends) and the checks the free one. It also runs when there are no files to copy.
        @task(trigger_rule="none_failed_min_one_success", weight_rule="absolute", priority_weight=1)
        @fail_fast
        def assess(run: dict) -> dict:
            import os

            from pbmigrate import tasks

            os.nice(10)  # its scans yield the cores to the checks' GX import and checksums, the critical path
            return tasks.assess(run, postgres_url(), api=pocketbase_api())

        snap = snapshot()
        return snap, assess(snap)  # after the load (wired below): it reads the load's rejects

    @task_group(group_id="data")
    def data(run: dict):
        @task
        @fail_fast
        def plan_batches(run: dict) -> list[dict]:
            """The typed staging tables, then the id ranges the load tasks share. One task: as two
            side by side, each held its slot up to 1 s after it ended, and the load waited for both."""
            from pbmigrate import tasks

            tasks.create_schema(run, postgres_url(), api=pocketbase_api())
            return tasks.plan_batches(run, api=pocketbase_api(), max_batches=conf.getint("core", "max_map_length"))

        @task(map_index_template="{{ batch_label }}", max_active_tis_per_dagrun=8)
        @fail_fast
        def load(run: dict, batch: dict) -> dict:
            from pbmigrate import tasks

            get_current_context()["batch_label"] = batch["label"]
            return tasks.run_batch(run, batch, postgres_url(), api=pocketbase_api())

        @task
        @fail_fast
        def finalize(run: dict) -> list[dict]:
            """Keys, indexes and foreign keys (their report in XCom `report`), then the files group's
            plan, which it returns: a task of its own between the two cost its start-up and two
            scheduling gaps (0.5 s) on the critical path."""
            from pbmigrate import tasks

            report = tasks.finalize_run(run, postgres_url(), api=pocketbase_api())
            get_current_context()["ti"].xcom_push(key="report", value=report)
            return tasks.plan_file_batches(run, postgres_url(), api=pocketbase_api(),
                                           max_batches=conf.getint("core", "max_map_length"), files=files_store())

        loaded = load.partial(run=run).expand(batch=plan_batches(run))
        done = finalize(run)
        loaded >> done
        return done

    @task_group(group_id="files")
    def files(run: dict, planned):
        @task(map_index_template="{{ files_label }}", max_active_tis_per_dagrun=4)
        @fail_fast
        def copy(run: dict, batch: dict) -> dict:
            from pbmigrate import tasks

            get_current_context()["files_label"] = batch["label"]
            return tasks.copy_files(run, batch, postgres_url(), files_store(), api=pocketbase_api())

        # one mapped task per id range finalize planned (the ranges the ledger proves loaded)
        return copy.partial(run=run).expand(batch=planned)

    @task_group(group_id="cache")
    def cache():
        @task  # after a passed gate
        @fail_fast
        def warm() -> dict:
            """Every section, two at a time in one task: as two tasks the second often waited for
            the slot the assessment (at a lower priority) still held, and the run's end with it."""
            from pbmigrate import tasks

            return tasks.warm_sections(migration_run(), pg_url=postgres_url(), redis_url=redis_url())

        return warm()

    @task(trigger_rule="all_skipped")  # after the snapshot skipped itself (mode=final); mode=full never starts it
    @fail_fast
    def final_sync() -> dict:
        from pbmigrate import tasks

        ctx = get_current_context()
        p = ctx["params"]
        return tasks.final_sync(
            source_path=param_text(p, "source_path"), target_schema=p["target_schema"],
            mapping=param_text(p, "mapping"), collections=p["collections"] or [],
            overlap_seconds=p["overlap_seconds"], pg_url=postgres_url(), dag_run_id=ctx["run_id"],
            api=pocketbase_api(), files=files_store(),
        )

    @task_group(group_id="validate")
    def validate():
        @task.branch(trigger_rule="none_failed_min_one_success")  # after the fresh load's files or the final re-sync
        @fail_fast
        def checks() -> str | list[str]:
            """Every check recorded, then the gate's verdict on them, which it follows: a passed gate
            warms the cache (a failed warm-up then blocks promotion) and, with param loadtest,
            load-tests the staging schema beside it (on a private Redis: the warm-up is not its
            business), and picks the end param cutover names (`cutover_auto` or `cutover_manual`,
            empty tasks the scheduler marks without a process), so the other end is skipped here
            at once; a refused one rolls back. The checks, the gate and the branch are one task:
            each task costs its start-up on the run's critical path."""
            from pbmigrate import tasks

            ctx = get_current_context()
            p = ctx["params"]
            run = migration_run()
            ctx["ti"].xcom_push(key="summary", value=tasks.validate(run, postgres_url(), api=pocketbase_api(),
                                                                    files=files_store()))
            verdict = tasks.gate(run, postgres_url(), p["max_reject_ratio"])
            ctx["ti"].xcom_push(key="verdict", value=verdict)
            end = tasks.decide(verdict, p["cutover"], cut_over="cutover_auto", hold="cutover_manual")
            return tasks.follow(verdict, ["cache.warm", *(["loadtest"] if p["loadtest"] else []), end])

        return checks()

    @task
    @fail_fast
    def loadtest() -> dict:
        """Param loadtest: a short load test of the staging schema, recorded; with loadtest_gate a miss fails here."""
        from pbmigrate import tasks

        ctx = get_current_context()
        p = ctx["params"]
        return tasks.loadtest(migration_run(), postgres_url(), p, param_text(p, "loadtest_mix"),
                              dag_run_id=ctx["run_id"])

    @task
    @fail_fast
    def cut_over() -> dict:
        """cutover=auto: backups, schema swap, feature flag."""
        from pbmigrate import tasks

        return tasks.cut_over(migration_run(), postgres_url(), redis_url())

    @task
    @fail_fast
    def hold() -> dict:
        """cutover=manual: validated and warm, waiting for the pocketbase_cutover DAG."""
        from pbmigrate import tasks

        return tasks.hold(migration_run(), postgres_url())

    @task(retries=0)  # it fails on purpose after rolling back: a retry would only fail again
    @fail_fast
    def roll_back() -> None:
        from pbmigrate import tasks

        tasks.roll_back(migration_run(), postgres_url(), redis_url(), gate_verdict())

    run, assessed = prepare()
    final = final_sync()
    run >> final
    done = data(run)
    copied = files(run, done)
    [done, copied] >> assessed  # not in a slot the load needs, nor beside finalize's index builds
    choice = validate()
    [done, copied, final] >> choice
    warmed, tested = cache(), loadtest()
    auto, manual = EmptyOperator(task_id="cutover_auto"), EmptyOperator(task_id="cutover_manual")
    choice >> [warmed, tested, auto, manual, roll_back()]
    # the warm-up, the load test (skipped when param loadtest is off) and the assessment (recorded
    # before anything is promoted; at a lower priority it may end after the checks, and the warm-up
    # need not wait for it) are done: an empty join
    ready = EmptyOperator(task_id="ready", trigger_rule="none_failed_min_one_success")
    [warmed, tested, assessed] >> ready
    [ready, auto] >> cut_over()  # all_success: the end the branch did not pick is skipped with it
    [ready, manual] >> hold()


pocketbase_migration()
