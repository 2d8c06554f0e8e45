"""
### PocketBase -> PostgreSQL + Redis: full migration

Reads the user's plan top to bottom: **prepare** (connections and privileges, a consistent
snapshot of the source; the pre-migration assessment runs beside finalize: the load's own pass
found the bad values), **schema** (typed tables in the staging schema), **data** (batches planned beside the
schema, one load task per slot sharing the id ranges, then keys, indexes and foreign keys), **files**
(the uploads behind every file field, one mapped task per id range, into the `pbm_files` store), **cache**
(warm Redis from the migrated tables: public profiles, leaderboards, games in progress),
**validate** (one GX checkpoint per table, per-batch checksums, then the gate), the optional
**loadtest** (param `loadtest`: the game service on the staging schema against PocketBase on the
source snapshot, recorded in `pbm_meta.loadtests`; with `loadtest_gate` a miss refuses promotion), and the branch:
**cut over** (backups, schema swap, feature flag), **hold** (`cutover=manual`: validated, waiting
for the pocketbase_cutover DAG) or **roll back** (staging dropped; the run ends failed).
The reconciliation report ends the log of whichever of the three ran.

Every task is one call into `pbmigrate`; the DAG only wires them. Re-triggering a failed run
resumes it: batches already in the ledger (`pbm_meta.batches`) are skipped.
"""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import Param, conf, dag, get_current_context, task, task_group

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
    def prepare(mode):
        @task
        @fail_fast
        def snapshot() -> dict:
            from pbmigrate import tasks

            ctx = get_current_context()
            p = ctx["params"]
            params = tasks.run_params(
                source_path=param_text(p, "source_path"), target_schema=p["target_schema"],
                mapping=param_text(p, "mapping"), batch_size=p["batch_size"], collections=p["collections"] or [],
                orphans=p["orphans"],
            )
            return tasks.prepare(params=params, pg_url=postgres_url(), dag_run_id=ctx["run_id"],
                                    api=pocketbase_api())

        @task
        @fail_fast
        def assess(run: dict) -> dict:
            from pbmigrate import tasks

            return tasks.assess(run, postgres_url(), api=pocketbase_api())

        snap = snapshot()
        mode >> snap  # mode=final skips the fresh snapshot and load
        return snap, assess(snap)  # after the load (wired below): it reads the load's rejects

    @task_group(group_id="schema")
    def schema(run: dict):
        @task
        @fail_fast
        def create_tables(run: dict) -> list[str]:
            from pbmigrate import tasks

            return tasks.create_schema(run, postgres_url(), api=pocketbase_api())

        return create_tables(run)

    @task_group(group_id="data")
    def data(run: dict, tables: list[str]):
        @task
        @fail_fast
        def plan_batches(run: dict) -> list[dict]:
            from pbmigrate import tasks

            return tasks.plan_batches(run, api=pocketbase_api(), max_batches=conf.getint("core", "max_map_length"))

        @task(map_index_template="{{ batch_label }}", max_active_tis_per_dagrun=8)
        @fail_fast
        def load(run: dict, batch: dict) -> dict:
            from pbmigrate import tasks

            get_current_context()["batch_label"] = batch["label"]
            return tasks.run_batch(run, batch, postgres_url(), api=pocketbase_api())

        @task
        @fail_fast
        def finalize(run: dict) -> dict:
            from pbmigrate import tasks

            return tasks.finalize_run(run, postgres_url(), api=pocketbase_api())

        batches = plan_batches(run)  # reads the source only: beside create_tables
        loaded = load.partial(run=run).expand(batch=batches)
        tables >> loaded
        done = finalize(run)
        loaded >> done
        return loaded, done

    @task_group(group_id="files")
    def files(run: dict, finalized: dict):
        @task
        @fail_fast
        def plan_files(run: dict) -> list[dict]:
            from pbmigrate import tasks

            return tasks.plan_file_batches(run, postgres_url(), api=pocketbase_api(),
                                           max_batches=conf.getint("core", "max_map_length"), files=files_store())

        @task(map_index_template="{{ files_label }}", max_active_tis_per_dagrun=4)
        @fail_fast
        def copy(run: dict, batch: dict) -> dict:
            from pbmigrate import tasks

            get_current_context()["files_label"] = batch["label"]
            return tasks.copy_files(run, batch, postgres_url(), files_store(), api=pocketbase_api())

        batches = plan_files(run)
        finalized >> batches
        return copy.partial(run=run).expand(batch=batches)

    @task_group(group_id="cache")
    def cache(run: dict):
        @task(map_index_template="{{ section }}")
        @fail_fast
        def warm(run: dict, section: str) -> dict:
            from pbmigrate import tasks

            get_current_context()["section"] = section
            return tasks.warm(run, section, pg_url=postgres_url(), redis_url=redis_url())

        return warm.partial(run=run).expand(section=["profiles", "leaderboards", "game_state"])

    @task.branch
    @fail_fast
    def choose_mode() -> str:
        return "final_sync" if get_current_context()["params"]["mode"] == "final" else "prepare.snapshot"

    @task
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

    @task(trigger_rule="none_failed_min_one_success")
    @fail_fast
    def loaded_run() -> dict:
        """The run the gates check: the fresh load's, or the final re-sync's (with its snapshot).

        It pulls from the branch that ran only: pulling the skipped one's XCom would log an
        error-level "XCom not found" for a skip that is by design."""
        ctx = get_current_context()
        ran = "final_sync" if ctx["params"]["mode"] == "final" else "prepare.snapshot"
        return ctx["ti"].xcom_pull(task_ids=ran)

    @task_group(group_id="validate")
    def validate(run: dict):
        @task
        @fail_fast
        def checks(run: dict) -> dict:
            from pbmigrate import tasks

            return tasks.validate(run, postgres_url(), api=pocketbase_api(), files=files_store())

        @task
        @fail_fast
        def gate(run: dict) -> dict:
            from pbmigrate import tasks

            return tasks.gate(run, postgres_url(), get_current_context()["params"]["max_reject_ratio"])

        summary = checks(run)
        verdict = gate(run)
        summary >> verdict
        return verdict

    @task.branch
    @fail_fast
    def decide(verdict: dict) -> str:
        """A passed gate warms the cache (a failed warm-up then blocks promotion); a refused one rolls back."""
        from pbmigrate import tasks

        return tasks.decide(verdict, "auto", cut_over="cache.warm")

    @task
    @fail_fast
    def loadtest(run: dict) -> dict:
        """Param loadtest: a short load test of the staging schema, recorded; with loadtest_gate a miss fails here."""
        from pbmigrate import tasks

        ctx = get_current_context()
        p = ctx["params"]
        return tasks.loadtest(run, postgres_url(), p, param_text(p, "loadtest_mix"), dag_run_id=ctx["run_id"])

    @task.branch
    @fail_fast
    def promote(verdict: dict) -> str:
        """cutover=auto: cut over now; manual: hold, validated and warm, for the pocketbase_cutover DAG."""
        from pbmigrate import tasks

        return tasks.decide(verdict, get_current_context()["params"]["cutover"])

    @task
    @fail_fast
    def cut_over(run: dict) -> dict:
        from pbmigrate import tasks

        return tasks.cut_over(run, postgres_url(), redis_url())

    @task
    @fail_fast
    def hold(run: dict) -> dict:
        from pbmigrate import tasks

        return tasks.hold(run, postgres_url())

    @task(retries=0)  # it fails on purpose after rolling back: a retry would only fail again
    @fail_fast
    def roll_back(run: dict, verdict: dict) -> None:
        from pbmigrate import tasks

        tasks.roll_back(run, postgres_url(), redis_url(), verdict)

    mode = choose_mode()
    run, assessed = prepare(mode)
    batches_loaded, done = data(run, schema(run))
    batches_loaded >> assessed  # beside finalize, not in a slot the load needs
    copied = files(run, done)
    final = final_sync()
    mode >> final
    loaded = loaded_run()
    [assessed, done, copied, final] >> loaded
    verdict = validate(loaded)
    choice = decide(verdict)
    choice >> cache(loaded) >> loadtest(loaded) >> promote(verdict) >> [cut_over(loaded), hold(loaded)]
    choice >> roll_back(loaded, verdict)


pocketbase_migration()
