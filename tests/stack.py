"""A real local Airflow (scripts/airflow_stack.py) for a test module: free ports, its own metadata
and target databases, its own home; stopped by process id in a finalizer, also when a test fails."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import redis
import requests

from airflow_stack import Stack, _group_alive, free_port
from tests.conftest import REDIS_TEST_URL, _create_db, _drop_db

# Redis dbs apart from the one the redis_url fixture flushes: the stack's cache warm-up must not land in
# another test's db, and the Celery broker has a db of its own.
_REDIS_BASE = REDIS_TEST_URL.rsplit("/", 1)[0]
STACK_REDIS_URL = os.environ.get("PBM_TEST_STACK_REDIS_URL", _REDIS_BASE + "/12")
BROKER_URL = os.environ.get("PBM_TEST_BROKER_URL", _REDIS_BASE + "/10")


@contextmanager
def running_stack(home: Path, *, executor: str = "local", workers: int = 2, sample_rows: int = 3000,
                  extra_env: dict[str, str] | None = None, broker_url: str | None = None) -> Iterator[Stack]:
    tag = uuid.uuid4().hex[:8]
    meta_db, target_db = f"pbm_af_{tag}", f"pbm_ui_{tag}"
    stack = Stack(home=home, port=free_port(), executor=executor, workers=workers,
                  metadata_url=_create_db(meta_db), pg_url=_create_db(target_db), redis_url=STACK_REDIS_URL,
                  broker_url=broker_url or BROKER_URL, sample_rows=sample_rows,
                  extra_env={"PBM_RETRY_DELAY_SECONDS": "1", **(extra_env or {})})
    dbs = [redis.Redis.from_url(u) for u in {stack.redis_url, stack.broker_url}]
    try:
        for db in dbs:
            db.flushdb()
        stack.start(timeout=300)
        yield stack
    finally:
        pids = stack.running()
        stack.stop(timeout=10)  # then SIGKILL: a test has no work to let finish
        for db in dbs:
            db.flushdb()
            db.close()
        _drop_db(meta_db)
        _drop_db(target_db)
        leftover = {name: pid for name, pid in pids.items() if _group_alive(pid)}  # each is its group's leader
        assert not leftover, f"still running after stop: {leftover}"


class Api:
    """The REST API v2 of a stack: trigger, wait, read task instances (the UI is not the point there)."""

    def __init__(self, stack: Stack):
        self.stack = stack
        self.session = stack.api()
        self.base = f"{stack.url}/api/v2"

    def get(self, path: str, **params: object) -> dict:
        resp = self.session.get(self.base + path, params=params, timeout=30)
        resp.raise_for_status()
        return resp.json()

    def send(self, method: str, path: str, body: dict) -> dict:
        resp = self.session.request(method, self.base + path, json=body, timeout=30)
        assert resp.ok, resp.text
        return resp.json()

    def trigger(self, dag_id: str, conf: dict) -> str:
        return self.send("POST", f"/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf})["dag_run_id"]

    def run_ids(self, dag_id: str) -> set[str]:
        return {r["dag_run_id"] for r in self.get(f"/dags/{dag_id}/dagRuns", limit=100)["dag_runs"]}

    def run(self, dag_id: str, run_id: str) -> dict:
        return self.get(f"/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}")

    def wait(self, dag_id: str, run_id: str, timeout: float = 240.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.run(dag_id, run_id)
            if run["state"] in ("success", "failed"):
                return run
            time.sleep(1)
        raise AssertionError(f"{dag_id} {run_id} still {run['state']} after {timeout:.0f} s")

    def new_run(self, dag_id: str, before: set[str], timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            fresh = self.run_ids(dag_id) - before
            if fresh:
                return fresh.pop()
            time.sleep(0.5)
        raise AssertionError(f"no new run of {dag_id} within {timeout:.0f} s")

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        out: list[dict] = []
        while True:
            page = self.get(f"/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances", limit=100,
                            offset=len(out))
            out += page["task_instances"]
            if len(out) >= page["total_entries"] or not page["task_instances"]:
                return out

    def failed_log(self, dag_id: str, run_id: str) -> str:
        """The logs of the failed task instances of a run, for an assertion message."""
        lines = []
        for ti in self.task_instances(dag_id, run_id):
            if ti["state"] in ("failed", "upstream_failed"):
                try:
                    path = (f"/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}/taskInstances/{ti['task_id']}/logs/"
                            f"{max(ti['try_number'], 1)}")
                    if ti["map_index"] >= 0:
                        path += f"?map_index={ti['map_index']}"
                    resp = self.session.get(self.base + path, timeout=30, headers={"Accept": "text/plain"})
                    lines.append(f"--- {ti['task_id']} [{ti['map_index']}] {ti['state']}\n{resp.text[-3000:]}")
                except requests.RequestException as exc:
                    lines.append(f"--- {ti['task_id']}: {exc}")
        return "\n".join(lines)
