"""`make airflow EXECUTOR=celery WORKERS=2`: the CeleryExecutor (Redis broker, metadata database as
result backend) with two workers as separate processes, each in its own folder under its own
hostname. The sample migrates to the same tables as under the LocalExecutor, its batches run on
both workers, and a worker killed in the middle of a batch loses nothing and duplicates nothing.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Iterator

import psycopg
import pytest

from airflow_stack import Stack
from tests.stack import Api, running_stack

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
CONF = {"batch_size": 1000, "cutover": "manual"}  # manual: the staging schema stays to be compared
HEARTBEAT_TIMEOUT = "15"  # seconds without a task heartbeat before the scheduler gives the try up


def digests(pg_url: str, schema: str) -> dict[str, tuple[int, str]]:
    """Every table's row count and an order-independent digest of its rows."""
    out = {}
    with psycopg.connect(pg_url) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s AND table_type = 'BASE TABLE'",
            (schema,))]
        for t in tables:
            out[t] = conn.execute(f'SELECT count(*), md5(coalesce(string_agg(x.r, E\'\\n\' ORDER BY x.r), \'\')) '
                                  f'FROM (SELECT t::text AS r FROM "{schema}"."{t}" t) x').fetchone()
    return out


def ledger(pg_url: str, run_id: str) -> list[tuple]:
    with psycopg.connect(pg_url) as conn:
        return conn.execute("SELECT b.collection, b.lo, b.hi, b.rows_loaded, b.checksum FROM pbm_meta.batches b "
                            "JOIN pbm_meta.runs r USING (run_id) WHERE r.dag_run_id = %s ORDER BY 1, 2",
                            (run_id,)).fetchall()


def migrate(stack: Stack, api: Api, target: str) -> str:
    run_id = api.trigger("pocketbase_migration", {"source_path": str(stack.sample_dir / "pb_data"),
                                                  "target_schema": target, **CONF})
    state = api.wait("pocketbase_migration", run_id)["state"]
    assert state == "success", api.failed_log("pocketbase_migration", run_id)
    return run_id


@pytest.fixture(scope="module")
def local_result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The sample migrated under the LocalExecutor: the reference, and the sample both stacks read."""
    home = tmp_path_factory.mktemp("airflow_local")
    with running_stack(home, sample_rows=3000) as st:  # stopped before the Celery stack starts
        run_id = migrate(st, Api(st), "game")
        result = {"sample": st.sample_dir, "tables": digests(st.pg_url, "game_staging"),
                  "ledger": ledger(st.pg_url, run_id)}
    return result


@pytest.fixture(scope="module")
def celery_stack(tmp_path_factory: pytest.TempPathFactory, local_result: dict) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("airflow_celery")
    shutil.copytree(local_result["sample"], home / "sample")  # the very same data.db
    env = {"AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": HEARTBEAT_TIMEOUT,
           "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "3",
           "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": "60"}  # a message the killed worker had reserved
    with running_stack(home, executor="celery", workers=2, sample_rows=3000, extra_env=env) as st:
        yield st


def test_celery_migrates_the_sample_like_local_with_batches_on_both_workers(celery_stack: Stack,
                                                                           local_result: dict) -> None:
    api = Api(celery_stack)
    run_id = migrate(celery_stack, api, "game")

    assert digests(celery_stack.pg_url, "game_staging") == local_result["tables"]
    assert ledger(celery_stack.pg_url, run_id) == local_result["ledger"]  # same ranges, counts, checksums
    loads = [ti for ti in api.task_instances("pocketbase_migration", run_id) if ti["task_id"] == "data.load"]
    # one load task a slot, sharing the ranges: on 3,000 rows one may take them all before the other
    # starts (the next test holds both at once, one on each worker)
    assert len(loads) == 2 and {ti["hostname"] for ti in loads} <= {"worker1", "worker2"}
    for name in ("worker1", "worker2"):  # each worker in its own folder, the work itself in the shared one
        assert (celery_stack.home / "workers" / name).is_dir()
    assert any(celery_stack.shared_work_dir.glob("game/*/report.md"))


def test_a_worker_killed_mid_batch_is_retried_on_the_other_with_no_duplicate(celery_stack: Stack,
                                                                            local_result: dict) -> None:
    api = Api(celery_stack)
    target = "fault"
    lock = psycopg.connect(celery_stack.pg_url)  # holds every staging table: batches block inside their COPY
    try:
        run_id = api.trigger("pocketbase_migration", {"source_path": str(celery_stack.sample_dir / "pb_data"),
                                                      "target_schema": target, **CONF})
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any(
                ti["task_id"] == "data.plan_batches" and ti["state"] == "success"  # it creates the tables
                for ti in api.task_instances("pocketbase_migration", run_id)):
            time.sleep(0.2)
        tables = [r[0] for r in lock.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", (f"{target}_staging",))]
        assert tables
        lock.execute("SET lock_timeout = '5s'")
        lock.execute(f'LOCK TABLE {", ".join(f"{target}_staging.{t}" for t in tables)} IN ACCESS EXCLUSIVE MODE')

        running: dict[str, dict] = {}
        deadline = time.monotonic() + 120
        while len(running) < 2 and time.monotonic() < deadline:  # a batch in flight on each worker
            running = {ti["hostname"]: ti for ti in api.task_instances("pocketbase_migration", run_id)
                       if ti["task_id"] == "data.load" and ti["state"] == "running"}
            time.sleep(0.5)
        assert set(running) == {"worker1", "worker2"}, running
        victim = running["worker1"]
        pid = celery_stack.running()["worker1"]
        os.killpg(os.getpgid(pid), signal.SIGKILL)  # the host goes away: worker, its task process, all of it
    finally:
        lock.close()  # the blocked batches go on; the killed one's transaction died with its connection

    state = api.wait("pocketbase_migration", run_id, timeout=300)["state"]
    assert state == "success", api.failed_log("pocketbase_migration", run_id)
    again = next(ti for ti in api.task_instances("pocketbase_migration", run_id)
                 if ti["task_id"] == "data.load" and ti["map_index"] == victim["map_index"])
    assert again["try_number"] >= 2 and again["hostname"] == "worker2" and again["state"] == "success"
    assert digests(celery_stack.pg_url, f"{target}_staging") == local_result["tables"]  # nothing lost or doubled
    assert ledger(celery_stack.pg_url, run_id) == local_result["ledger"]  # one ledger row per batch
