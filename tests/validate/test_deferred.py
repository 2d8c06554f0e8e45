"""Deferred imports: GX's import without scipy.stats and altair, which still work when used."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from pbmigrate.validate import deferred

INCLUDE = Path(__file__).resolve().parents[2] / "include"


def _fresh(code: str) -> str:
    """`code` in a fresh interpreter (this one may have imported GX or scipy already)."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         env={"PYTHONPATH": str(INCLUDE), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()


def test_gx_imports_without_scipy_stats_and_altair_which_load_on_first_use():
    out = _fresh("""
        import sys
        from pbmigrate.validate import quality
        quality.import_gx()
        import great_expectations as gx  # the real thing: its expectations are there
        assert gx.expectations.ExpectColumnKLDivergenceToBeLessThan
        loaded = lambda: sorted(m for m in sys.modules if m.startswith(("scipy.stats.", "altair.")))
        print(type(sys.modules["scipy.stats"]).__name__, type(sys.modules["altair"]).__name__, len(loaded()))
        from scipy import stats
        import altair as alt
        print(round(float(stats.entropy([0.5, 0.5], [0.9, 0.1])), 4), alt.Chart.__name__,
              type(sys.modules["scipy.stats"]).__name__, len(loaded()) > 50)
    """).splitlines()
    assert out == ["Deferred Deferred 0", "0.5108 Chart module True"]


def test_a_deferred_module_loads_once_on_its_first_attribute(tmp_path, monkeypatch):
    pkg = tmp_path / "pbm_defer_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "heavy.py").write_text("import builtins\n"
                                  "builtins.PBM_HEAVY_RUNS = getattr(builtins, 'PBM_HEAVY_RUNS', 0) + 1\n"
                                  "VALUE = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import builtins

    try:
        assert deferred.defer("pbm_defer_pkg.heavy")
        assert not deferred.defer("pbm_defer_pkg.heavy")  # already there (a stand-in)
        from pbm_defer_pkg import heavy

        assert isinstance(heavy, deferred.Deferred) and not hasattr(builtins, "PBM_HEAVY_RUNS")
        assert heavy.VALUE == 42 and heavy.VALUE == 42
        assert builtins.PBM_HEAVY_RUNS == 1
        assert not isinstance(sys.modules["pbm_defer_pkg.heavy"], deferred.Deferred)
        assert not deferred.defer("pbm_defer_pkg.heavy")  # imported for real: left alone
        assert not deferred.defer("pbm_defer_pkg.absent")  # not installed: nothing to stand in for
        assert "pbm_defer_pkg.absent" not in sys.modules
    finally:
        for name in ("pbm_defer_pkg.heavy", "pbm_defer_pkg"):
            sys.modules.pop(name, None)
        if hasattr(builtins, "PBM_HEAVY_RUNS"):
            del builtins.PBM_HEAVY_RUNS
