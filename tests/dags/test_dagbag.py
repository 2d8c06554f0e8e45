"""The DAG folder as the scheduler sees it: no import errors, and the team's policies hold."""

from __future__ import annotations

import time

import pytest

import airflow_local

DAG_IDS = {"pocketbase_migration", "pocketbase_resync", "pocketbase_cutover"}


@pytest.fixture(scope="module")
def dagbag(airflow_home):
    from airflow.dag_processing.dagbag import DagBag

    started = time.monotonic()
    bag = DagBag(dag_folder=str(airflow_local.ROOT / "dags"))
    bag.parse_seconds = time.monotonic() - started
    return bag


def test_every_dag_file_parses_without_import_errors_and_quickly(dagbag):
    assert dagbag.import_errors == {}
    assert set(dagbag.dag_ids) == DAG_IDS
    assert dagbag.parse_seconds < 10  # heavy imports (GX, psycopg pools) live inside the tasks


@pytest.mark.parametrize("dag_id", sorted(DAG_IDS))
def test_dags_are_tagged_documented_and_describe_every_param(dagbag, dag_id):
    dag = dagbag.get_dag(dag_id)
    assert "pbmigrate" in dag.tags
    assert dag.doc_md and dag.doc_md.strip()
    assert dag.catchup is False
    for name, param in dag.params.items():
        assert (param.description or "").strip(), f"{dag_id}: param {name!r} has no description"


@pytest.mark.parametrize("dag_id", sorted(DAG_IDS))
def test_tasks_retry_with_backoff_and_fail_fast_on_permanent_errors(dagbag, dag_id):
    dag = dagbag.get_dag(dag_id)
    for task in dag.tasks:
        assert task.owner == "data-engineering"
        if task.retries:
            assert task.retry_exponential_backoff, task.task_id
        if task.inherits_from_empty_operator:  # the ends' markers and joins: nothing runs
            continue
        # every task body is wrapped by fail_fast, so a Permanent error is never retried
        callable_ = getattr(task, "python_callable", None)
        assert callable_ is not None and getattr(callable_, "__wrapped__", None) is not None, task.task_id
