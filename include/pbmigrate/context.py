"""The run context: what travels between a run's tasks (through XCom) and the few helpers every
stage uses to get back the run's folder, source and plan from it.

It is a TypedDict: plain JSON for XCom, checked by type checkers in the engine, and validated by
`tasks` when a task receives it (`RunContext` as a pydantic TypeAdapter). API credentials are never
in it; tasks get them from the connection.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, NotRequired

from pydantic import TypeAdapter, ValidationError
from typing_extensions import TypedDict  # pydantic refuses typing.TypedDict on Python < 3.12

from pbmigrate.errors import ParamError
from pbmigrate.plan.mapping import load_mapping
from pbmigrate.plan.model import Plan, build_plan
from pbmigrate.source import Source, open_source


class RunParams(TypedDict):
    """The params that shaped a run: a resumed run must have been started with the same ones."""

    source_path: str
    target_schema: str
    mapping: str
    batch_size: int
    collections: list[str]
    orphans: str


class RunContext(TypedDict):
    """One run as its tasks see it (`prepare` makes it; `final_sync` points it at its snapshot)."""

    run_id: str
    dag_run_id: str
    target_schema: str
    staging_schema: str
    source: str
    source_kind: Literal["sqlite", "api"]
    snapshot_path: str | None
    storage_path: NotRequired[str | None]
    params: RunParams
    resumed: bool
    resynced: NotRequired[bool]  # a final re-sync wrote the staging schema: compare, not the ledger
    resync: NotRequired[dict[str, Any]]


RUN_CONTEXT = TypeAdapter(RunContext)


def checked_run(run: dict) -> RunContext:
    """`run` as received from XCom, checked against `RunContext`: a stale or hand-made dict fails
    here in one line, not three tasks later. Returned as given (keys a caller added survive)."""
    try:
        RUN_CONTEXT.validate_python(run)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ParamError(f"not a pbmigrate run context: {where}: {first['msg']}") from None
    return run  # type: ignore[return-value]


def work_dir() -> Path:
    """Where snapshots and reports go; on a multi-worker setup, shared storage."""
    return Path(os.environ.get("PBM_WORK_DIR", "/tmp/pbmigrate"))


def safe_name(name: str) -> str:
    """A run id (or any name) as a file name: Airflow's run ids hold ':' and '+'."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def run_dir(target_schema: str, run_id: str) -> Path:
    """The folder of one run's snapshot, backups, validation results and report."""
    return work_dir() / target_schema / safe_name(run_id)


def open_run_source(run: dict, api: dict | None = None) -> Source:
    if run["source_kind"] == "sqlite":
        return open_source(run["snapshot_path"])
    if not api:
        raise ParamError("API mode needs the pbm_pocketbase connection (url, email, password)")
    return open_source(None, **api)


def run_plan(run: dict, source: Source) -> Plan:
    p = run["params"]
    return build_plan(source.catalog(), load_mapping(p["mapping"]), collections=p["collections"],
                      has_secrets=source.has_secrets)


def source_plan(run: dict, api: dict | None = None) -> Plan:
    """The run's plan, for a task that needs the plan only: the source is opened and closed again."""
    source = open_run_source(run, api)
    try:
        return run_plan(run, source)
    finally:
        source.close()
