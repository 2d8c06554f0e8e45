"""A whole game stack on loopback, for the tests and the load test: same data on both backends.

`migrate` moves a PocketBase ``pb_data`` into ``<target>_staging`` with the engine's own task
functions (the DAG's data phase without Airflow: snapshot, schema, batches, finalize), then warms
the profiles as the DAG's cache group does. `GameServer` runs ``python -m pbgame`` as a child
process on a free port and stops it by its pid, also on failure.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import requests

from pbmigrate import tasks
from pbmigrate.cache.warmup import warm_run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def migrate(pb_data: str | Path, pg_url: str, redis_url: str | None, *, target: str = "game",
            mapping: str = "game.yaml", work_dir: str | Path | None = None, batch_size: int = 50_000) -> dict:
    """Source ``pb_data`` -> ``<target>_staging``; returns the run dict (staging schema in it)."""
    if work_dir:
        os.environ["PBM_WORK_DIR"] = str(work_dir)
    params = tasks.run_params(source_path=str(pb_data), target_schema=target, mapping=mapping,
                                 batch_size=batch_size, collections=None, orphans="reject")
    run = tasks.prepare(params=params, pg_url=pg_url, dag_run_id=f"testbed_{uuid.uuid4().hex[:8]}")
    tasks.create_schema(run, pg_url)
    for batch in tasks.plan_batches(run):
        tasks.run_batch(run, batch, pg_url)
    run["finalize"] = tasks.finalize_run(run, pg_url)
    if redis_url:
        run["warm"] = [warm_run(run, section, pg_url=pg_url, redis_url=redis_url)
                       for section in ("profiles", "leaderboards")]
    return run


class GameServer:
    """``python -m pbgame`` on 127.0.0.1:<free port>, configured through ``PBG_*`` variables."""

    def __init__(self, env: dict[str, str], *, workers: int = 1, log_path: str | Path | None = None,
                 port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = env
        self.workers = workers
        self.log_path = Path(log_path) if log_path else None
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> GameServer:
        out: Any = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pbgame", "--port", str(self.port), "--workers", str(self.workers)],
            env={**os.environ, **self.env}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the game service exited with {self.proc.returncode} (log: {self.log_path})")
            try:
                if requests.get(self.url + "/health", timeout=1).status_code in (200, 503):
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the game service did not answer within {timeout} s (log: {self.log_path})")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: uvicorn's workers go too
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.proc = None

    def __enter__(self) -> GameServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def shadow_counts(metrics_text: str) -> dict[tuple[str, str], float]:
    """(endpoint, result) -> count from the service's /metrics text."""
    out: dict[tuple[str, str], float] = {}
    for line in metrics_text.splitlines():
        if line.startswith("pbgame_shadow_compares_total{"):
            labels, value = line[len("pbgame_shadow_compares_total{"):].split("} ")
            kv = dict(part.split("=", 1) for part in labels.split(","))
            out[(kv["endpoint"].strip('"'), kv["result"].strip('"'))] = float(value)
    return out
