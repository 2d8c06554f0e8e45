"""The load test, CI-sized: a few hundred players for tens of seconds on both backends, no failed request."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

from tests.conftest import PG_ADMIN_URL, ROOT, _drop_db

MIX = ("profile_me", "profile_other", "leaderboard", "history", "inventory", "match_result", "login")


def test_ci_sized_load_test_has_no_failed_request_on_either_backend(tmp_path: Path) -> None:
    db = f"pbm_lt_{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "USERS": "300", "SPAWN_RATE": "60", "DURATION": "10", "ROWS": "20000",
           "CAPACITY_STEPS": "100", "PROCESSES": "1", "SERVICE_WORKERS": "1", "THINK": "1,3",
           "LOGIN_SHARE": "0.1", "LT_DATABASE": db, "LT_PG_ADMIN_URL": PG_ADMIN_URL, "COOLDOWN": "1",
           "OUT": str(tmp_path)}
    try:
        proc = subprocess.run([sys.executable, str(ROOT / "bench" / "loadtest" / "run.py")], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=400)
    finally:
        _drop_db(db)  # the runner drops it too; this covers a runner that was killed
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    path = Path(proc.stdout.strip().splitlines()[-1])  # the JSON's path is the last line
    result = json.loads(path.read_text())
    assert (path.parent / "report.html").is_file() and list(path.parent.glob("*_players.html"))
    assert not (path.parent / "work" / "sample").exists()  # its own redis-server and data are gone
    for backend in ("pocketbase", "postgres"):
        b = result[backend]
        assert b["players"]["users"] == 300
        assert b["error_rate"] == 0, (backend, b["endpoints"])
        assert {"rps", "p50_ms", "p95_ms", "p99_ms", "error_rate", "capacity_rps"} <= set(b)
        for name in MIX:  # every journey of the mix ran, none failed
            assert b["endpoints"][name]["requests"] > 0 and b["endpoints"][name]["failures"] == 0, (backend, name)
        assert b["capacity_steps"][0]["offered_rps"] == 100 and b["capacity_steps"][0]["error_rate"] == 0
    pb, pg = result["pocketbase"]["capacity_rps"], result["postgres"]["capacity_rps"]
    assert result["improvement"] == (round(pg / pb, 2) if pb and pg else None)
