"""Run this repository's DAGs locally with `dag.test()`: no scheduler, an SQLite metadata database.

Used by `make demo` and by the DAG tests. Call `configure()` before anything imports Airflow.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def configure(home: Path, *, pg_url: str, redis_url: str | None = None, pocketbase: dict | None = None,
              retry_delay: float | None = None, work_dir: Path | None = None) -> None:
    """Point Airflow at a private home, this repo's dags/ and plugins/, and the pbm_* connections."""
    home.mkdir(parents=True, exist_ok=True)
    env = {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        "AIRFLOW__LOGGING__LOGGING_LEVEL": os.environ.get("PBM_AIRFLOW_LOG_LEVEL", "INFO"),
        "AIRFLOW_CONN_PBM_POSTGRES": pg_url,
        "PBM_WORK_DIR": str(work_dir or home / "work"),
    }
    if redis_url:
        env["AIRFLOW_CONN_PBM_REDIS"] = redis_url
    if pocketbase:
        from urllib.parse import quote

        url = pocketbase["url"]
        scheme, rest = url.split("://", 1)
        env["AIRFLOW_CONN_PBM_POCKETBASE"] = (
            f"{scheme}://{quote(pocketbase['email'], safe='')}:{quote(pocketbase['password'], safe='')}@{rest}"
        )
    if retry_delay is not None:
        env["PBM_RETRY_DELAY_SECONDS"] = str(retry_delay)
    os.environ.update(env)
    for p in (str(ROOT / "plugins"), str(ROOT / "dags")):
        if p not in sys.path:
            sys.path.insert(0, p)
    if not (home / "airflow.db").exists():
        subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())


def load_dag(dag_id: str):
    """Parse dags/<dag_id>.py the way the scheduler does (the file name is the dag id)."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags" / f"{dag_id}.py"))
    if bag.import_errors:
        raise RuntimeError(f"DAG import errors: {bag.import_errors}")
    return bag.get_dag(dag_id)


def run_dag(dag_id: str, conf: dict):
    """One run of the DAG with `dag.test()`; returns the DagRun (check `.state`)."""
    return load_dag(dag_id).test(run_conf=conf)
