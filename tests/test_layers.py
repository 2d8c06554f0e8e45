"""The engine's layering: import-linter's contracts (pyproject.toml), and no private name used
outside the module that defines it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE = [*sorted((ROOT / "include").rglob("*.py")), *sorted((ROOT / "dags").glob("*.py")),
        *sorted((ROOT / "plugins").glob("*.py"))]
OURS = ("pbmigrate", "pbgame", "pbdev")


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_uses(path: Path) -> list[str]:
    """`from ours.x import _y`, and `m._y` where `m` is a module or name imported from our packages."""
    tree = ast.parse(path.read_text(), str(path))
    imported: set[str] = set()
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in OURS:
            for alias in node.names:
                if _private(alias.name):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: imports {node.module}.{alias.name}")
                imported.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            imported.update((a.asname or a.name).split(".")[0] for a in node.names if a.name.split(".")[0] in OURS)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and _private(node.attr) and isinstance(node.value, ast.Name)
                and node.value.id in imported):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: uses {node.value.id}.{node.attr}")
    return found


def test_no_private_name_is_used_outside_its_module():
    assert [u for p in CODE for u in private_uses(p)] == []


def test_the_checker_finds_a_private_import(tmp_path: Path):
    bad = tmp_path / "x.py"
    bad.write_text("from pbmigrate.audit import meta\nfrom pbmigrate.plan.model import _INDEX\nmeta._LOCK\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        assert [u.split(": ")[1] for u in private_uses(bad)] == ["imports pbmigrate.plan.model._INDEX",
                                                                 "uses meta._LOCK"]
    finally:
        ROOT = saved


def test_import_contracts_hold():
    """The engine never imports Airflow, pbgame or pbdev; stages import downward only."""
    out = subprocess.run([str(Path(sys.executable).with_name("lint-imports"))], cwd=ROOT, capture_output=True,
                         text=True, env={"PYTHONPATH": str(ROOT / "include"), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stdout[-3000:]
    assert "2 kept, 0 broken" in out.stdout


def test_dags_call_the_engine_through_tasks_only():
    """One module holds every function a DAG task calls: the DAG files import nothing else of it."""
    imports = set()
    for path in sorted((ROOT / "dags").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pbmigrate"):
                imports.add((node.module, tuple(a.name for a in node.names)))
    assert imports == {("pbmigrate", ("tasks",))}


def test_a_task_process_loads_only_the_stage_it_calls():
    """Every Airflow task is a process that imports `pbmigrate.tasks`: a gate or a branch must not
    pay for Arrow, DuckDB, GX or the re-sync (about a second and 80 MB here), only for its stage."""
    data_path = ["pyarrow", "duckdb", "great_expectations", "pbmigrate.resync", "pbmigrate.load.batch",
                 "pbmigrate.validate.quality"]
    code = (f"import sys; from pbmigrate import tasks; loaded = lambda: [m for m in {[*data_path, 'redis']!r} "
            "if m in sys.modules]; before = loaded()\n"
            "from pbmigrate.cutover import promote\n"
            "print(before, loaded())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT / "include"), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[] ['redis']"  # the gate's stage needs Redis for the flag, nothing more
