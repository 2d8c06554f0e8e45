"""Shared fixtures: a throw-away PostgreSQL database, a Redis logical db, the 0.22 fixture copy.

Every test talks to real services. Each test session creates its own database and cleans up.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import redis

ROOT = Path(__file__).resolve().parents[1]
# Airflow reads its configuration once, when first imported; point it at a private home before any
# test module can import it, so the order tests run in cannot matter. The airflow_home fixture
# migrates that database when a test first needs it.
AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="pbm_test_airflow_"))
os.environ.update({
    "AIRFLOW_HOME": str(AIRFLOW_HOME),
    "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
    "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{AIRFLOW_HOME / 'airflow.db'}",
})
atexit.register(shutil.rmtree, AIRFLOW_HOME, True)
FIXTURE_022 = ROOT / "tests" / "fixtures" / "pocketbase-v0.22-testdata"  # licence: tests/fixtures/README.md
PG_ADMIN_URL = os.environ.get("PBM_TEST_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_TEST_URL = os.environ.get("PBM_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")


def _create_db(name: str) -> str:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name


def _drop_db(name: str) -> None:
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for the whole test session, dropped afterwards."""
    name = f"pbm_test_{uuid.uuid4().hex[:8]}"
    url = _create_db(name)
    yield url
    _drop_db(name)


@pytest.fixture
def fresh_pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test (slower; use when schemas must not mix)."""
    name = f"pbm_t_{uuid.uuid4().hex[:8]}"
    url = _create_db(name)
    yield url
    _drop_db(name)


@pytest.fixture
def pg(pg_url: str) -> Iterator[psycopg.Connection]:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A Redis logical db of its own, flushed before and after the test."""
    client = redis.Redis.from_url(REDIS_TEST_URL)
    client.flushdb()
    yield REDIS_TEST_URL
    client.flushdb()
    client.close()


@contextlib.contextmanager
def moto_server(log_path: Path) -> Iterator[str]:
    """moto's standalone S3 server on a free loopback port (the S3 protocol only), stopped by its pid."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with log_path.open("wb") as log:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                        break
                except OSError:
                    time.sleep(0.1)
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


@pytest.fixture
def fixture_022(tmp_path: Path) -> Path:
    """A private copy of PocketBase's own 0.22 test data (SQLite may write -wal/-shm beside it)."""
    dest = tmp_path / "pb_data"
    shutil.copytree(FIXTURE_022, dest)
    return dest


@pytest.fixture(scope="session")
def airflow_home(pg_url: str) -> Path:
    """One Airflow home (SQLite metadata) for every dag.test() run of the session."""
    import airflow_local

    airflow_local.configure(AIRFLOW_HOME, pg_url=pg_url, redis_url=REDIS_TEST_URL, retry_delay=0.05)
    return AIRFLOW_HOME


@pytest.fixture
def run_dag(airflow_home: Path, monkeypatch: pytest.MonkeyPatch):
    """Run a DAG with dag.test() against a given target database: run_dag(dag_id, conf, pg_url=...)."""
    import airflow_local

    def _run(dag_id: str, conf: dict, *, pg_url: str | None = None, redis_url: str | None = None):
        if pg_url:
            monkeypatch.setenv("AIRFLOW_CONN_PBM_POSTGRES", pg_url)
        if redis_url:
            monkeypatch.setenv("AIRFLOW_CONN_PBM_REDIS", redis_url)
        return airflow_local.run_dag(dag_id, conf)

    return _run
