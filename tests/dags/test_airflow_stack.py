"""`make airflow` refuses bad ground in one line and a non-zero exit, before starting anything."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from airflow_stack import free_port

ROOT = Path(__file__).resolve().parents[2]


def _start(home: Path, port: int, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "airflow_stack.py"), "start", "--home", str(home),
                           "--port", str(port)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})


def _one_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_a_busy_port_is_named(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = _one_line(_start(tmp_path / "home", port))
    assert f"port {port} is busy" in line
    assert not list((tmp_path / "home").glob("pids/*.pid"))  # nothing was started


def test_postgres_down_is_named(tmp_path: Path) -> None:
    dead = free_port()  # nothing listens there
    line = _one_line(_start(tmp_path / "home", free_port(),
                            PBM_AIRFLOW_DB_URL=f"postgresql://postgres@127.0.0.1:{dead}/pbm_airflow"))
    assert f"PostgreSQL does not answer at 127.0.0.1:{dead}" in line


def test_a_stale_pid_file_is_named_and_airflow_stop_clears_it(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid now belongs to no process: what a crash leaves behind
    pids = tmp_path / "home" / "pids"
    pids.mkdir(parents=True)
    (pids / "scheduler.pid").write_text(str(gone.pid))

    line = _one_line(_start(tmp_path / "home", free_port()))
    assert "stale pid file" in line and "scheduler.pid" in line and str(gone.pid) in line

    stop = subprocess.run([sys.executable, str(ROOT / "scripts" / "airflow_stack.py"), "stop", "--home",
                           str(tmp_path / "home")], capture_output=True, text=True, timeout=60)
    assert stop.returncode == 0 and not (pids / "scheduler.pid").exists()
