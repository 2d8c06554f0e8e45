"""The Airflow UI in a real browser, against a real local Airflow (api-server, scheduler,
dag-processor, triggerer; LocalExecutor; PostgreSQL metadata): what a data engineer does with it.

Playwright drives Debian's chromium (never a downloaded browser). The browser is used where the UI
is the point (login, the trigger form, the grid, the logs); the REST API waits for states.
Screenshots go to `<pytest tmp>/screenshots` (the path is printed).
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest

from pbdev.pbserver import PocketBaseServer
from tests.stack import Api, running_stack

CHROMIUM = Path("/usr/bin/chromium")
BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run"]
LOAD = re.compile(r"^load (\d+) of (\d+): (\d+) batches, ([\d,]+) rows, shared$")  # a mapped load task's name
RANGE_LINE = re.compile(r"(\w+) -> \w+ \[(\w+)\.\.(\w+)\]: read ([\d,]+), loaded ([\d,]+), rejected ([\d,]+).*; "
                        r"[\d,]+ rows/s")  # one loaded id range in a load task's log

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900),
              pytest.mark.skipif(not CHROMIUM.exists(), reason="Debian's chromium is missing (scripts/services.sh)")]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("airflow_ui")
    with running_stack(home, sample_rows=3000, extra_env={"PBM_RESYNC_SCHEDULE": "* * * * *"}) as st:
        yield st


@pytest.fixture(scope="module")
def api(stack) -> Api:
    return Api(stack)


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("screenshots")
    print(f"screenshots: {folder}")
    return folder


@pytest.fixture(scope="module")
def browser() -> Iterator:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser, stack):
    """A logged-in page: the simple auth manager's form, with the stack's user and password."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    pg.set_default_timeout(30_000)
    pg.goto(stack.url + "/")
    pg.wait_for_url(re.compile(r".*/auth/login.*"))  # nobody gets in without logging in
    pg.get_by_label("Username").fill(stack.user)
    pg.get_by_label("Password").fill(stack.password)
    pg.get_by_role("button", name="Sign in").click()
    pg.wait_for_url(stack.url + "/")
    yield pg
    context.close()


@pytest.fixture(scope="module")
def pocketbase(stack, api: Api) -> Iterator[dict]:
    """A real PocketBase serving a copy of the sample, as the `pbm_pocketbase` connection (API mode)."""
    import json

    copy = stack.home / "pb_api" / "pb_data"
    shutil.copytree(stack.sample_dir / "pb_data", copy)
    su = json.loads((stack.sample_dir / "sample.json").read_text())["superuser"]
    with PocketBaseServer(copy) as pb:
        host, port = pb.url.split("://", 1)[1].rsplit(":", 1)
        api.send("POST", "/connections", {"connection_id": "pbm_pocketbase", "conn_type": "http", "host": host,
                                          "port": int(port), "login": su["email"], "password": su["password"]})
        yield {"url": pb.url, "data": copy}


def open_trigger_form(page, stack, dag_id: str):
    page.goto(f"{stack.url}/dags/{dag_id}")
    page.get_by_role("button", name="Trigger").first.click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_text("Run Parameters").wait_for()
    return dialog


def trigger_from_form(page, stack, api: Api, dag_id: str, fields: dict[str, str], shot: Path | None = None,
                      choices: dict[str, str] | None = None) -> str:
    """Fill the given fields and pick the given choices (enum params) of the trigger form, others keep
    their defaults; press Trigger: the run id."""
    dialog = open_trigger_form(page, stack, dag_id)
    for name, value in fields.items():
        dialog.locator(f"#element_{name}").fill(value)
    for name, value in (choices or {}).items():
        box = dialog.locator(f"#element_{name} input[role=combobox]")
        box.fill(value)
        box.press("Enter")
        assert dialog.locator(f"#element_{name}").inner_text().strip().endswith(value)
    if shot:
        page.screenshot(path=str(shot), full_page=True)
    before = api.run_ids(dag_id)
    button = dialog.get_by_role("button", name="Trigger", exact=True)
    assert button.is_enabled(), "the form refuses its own values"
    button.click()
    return api.new_run(dag_id, before)


def task_log_text(page, stack, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> str:
    url = f"{stack.url}/dags/{dag_id}/runs/{quote(run_id, safe='')}/tasks/{task_id}"
    page.goto(url + (f"/mapped/{map_index}" if map_index >= 0 else ""))
    page.get_by_text("Done. Returned value was").first.wait_for()
    return page.locator("body").inner_text()


def assert_succeeded(api: Api, dag_id: str, run_id: str) -> None:
    state = api.wait(dag_id, run_id)["state"]
    assert state == "success", api.failed_log(dag_id, run_id)


def test_a_migration_from_the_trigger_form_shows_its_batches_logs_and_report(page, stack, api: Api,
                                                                              shots: Path) -> None:
    dialog = open_trigger_form(page, stack, "pocketbase_migration")
    params = api.get("/dags/pocketbase_migration/details")["params"]
    text = dialog.inner_text()
    for name, spec in params.items():  # every param, each with its description
        assert spec.get("description"), f"param {name} has no description"
        assert name in text and spec["description"] in text, name
    page.keyboard.press("Escape")

    sample = str(stack.sample_dir / "pb_data")
    run_id = trigger_from_form(page, stack, api, "pocketbase_migration",
                               {"source_path": sample, "target_schema": "ui"},
                               shot=shots / "trigger_form.png")
    assert_succeeded(api, "pocketbase_migration", run_id)
    assert api.run("pocketbase_migration", run_id)["conf"]["source_path"] == sample

    page.goto(f"{stack.url}/dags/pocketbase_migration/runs/{quote(run_id, safe='')}/tasks/data.load/mapped")
    page.get_by_text("Task Instances").first.wait_for()
    page.get_by_text(LOAD).first.wait_for()
    page.screenshot(path=str(shots / "grid_batches.png"), full_page=True)
    names = [n.strip() for n in page.get_by_text(LOAD).all_inner_texts()]
    loads = sorted((ti for ti in api.task_instances("pocketbase_migration", run_id) if ti["task_id"] == "data.load"),
                   key=lambda ti: ti["map_index"])
    assert sorted(names) == sorted(ti["rendered_map_index"] for ti in loads) and len(names) == 2  # one per slot
    (batches,) = {int(LOAD.match(n).group(3)) for n in names}  # both tasks share every range
    assert batches > 5

    seen = []  # the ranges each task's log says it loaded: every range once, by one of the two
    for ti in loads:
        log = task_log_text(page, stack, "pocketbase_migration", run_id, "data.load", ti["map_index"])
        if not seen:
            page.screenshot(path=str(shots / "batch_log.png"), full_page=True)
        lines = list(RANGE_LINE.finditer(log))
        assert all(int(m.group(4).replace(",", "")) > 0 for m in lines), log[-3000:]
        seen.append({m.group(1, 2, 3) for m in lines})
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == batches, seen
    assert {c for c, _, _ in seen[0] | seen[1]} >= {"users", "matches", "participants"}

    report = task_log_text(page, stack, "pocketbase_migration", run_id, "cut_over")
    page.screenshot(path=str(shots / "report_log.png"), full_page=True)
    assert f"Migration report: run `{run_id}`" in report and "Status: promoted" in report


def test_the_stack_builds_the_execution_api_before_a_task_calls_it(stack, api: Api) -> None:
    """The execution API builds its versioned routes on the first request it serves (5 to 10 s of
    CPU here): the stack's start makes that request, so no task's start call waits for it."""
    log = (stack.log_dir / "api-server.log").read_text(errors="replace")
    warmed = log.find("path=/execution/health")
    first_task_call = log.find("path=/execution/task-instances/")
    assert warmed >= 0, "the stack never called /execution/health"
    assert first_task_call < 0 or warmed < first_task_call


WORKLOAD_DONE = re.compile(r"Workload finished .*?duration=([\d.]+) .*?workload_id=([0-9a-f-]{36})")


def test_no_task_holds_its_executor_slot_after_it_ended(stack, api: Api) -> None:
    """A task's supervisor frees its slot when the task process is reaped. Once the process has closed
    its sockets, Airflow polls for its exit every `min_heartbeat_interval` (5 s by default), so the
    next task started 3.5-5 s after each heavy one; the stack sets 1 s. Held = the supervisor's
    workload time minus the task's own run time, for every task of the migrations run so far."""
    done = {m.group(2): float(m.group(1)) for m in
            WORKLOAD_DONE.finditer((stack.log_dir / "scheduler.log").read_text(errors="replace"))}
    held = {}
    for run_id in api.run_ids("pocketbase_migration"):
        for ti in api.task_instances("pocketbase_migration", run_id):
            if ti["id"] in done and ti["duration"] is not None:
                held[f"{ti['task_id']}[{ti['map_index']}]"] = round(done[ti["id"]] - ti["duration"], 2)
    assert len(held) >= 10, f"too few finished workloads in the scheduler's log: {held}"
    assert max(held.values()) < 2.5, held


def test_the_forms_defaults_run_api_mode_and_an_empty_mapping_copies_every_collection(
        page, stack, api: Api, pocketbase: dict) -> None:
    api_run = trigger_from_form(page, stack, api, "pocketbase_migration", {"target_schema": "api"})
    assert_succeeded(api, "pocketbase_migration", api_run)
    assert api.run("pocketbase_migration", api_run)["conf"]["source_path"] in (None, "")

    # into the target the re-sync's defaults name, held (cutover=manual) for the scheduled re-sync below
    plain_run = trigger_from_form(page, stack, api, "pocketbase_migration",
                                  {"source_path": str(stack.sample_dir / "pb_data"), "mapping": ""},
                                  choices={"cutover": "manual"})
    assert_succeeded(api, "pocketbase_migration", plain_run)
    assert api.run("pocketbase_migration", plain_run)["conf"]["mapping"] in (None, "")

    with psycopg.connect(stack.pg_url) as conn:
        runs = {t: (kind, status, params["mapping"]) for t, kind, status, params in conn.execute(
            "SELECT target_schema, source_kind, status, params FROM pbm_meta.runs")}
        plain_tables = {r[0] for r in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'game_staging'")}
    assert runs["api"] == ("api", "promoted", "game.yaml") and runs["game"][0] == "sqlite"
    assert runs["game"][1] != "promoted" and runs["game"][2] == ""
    # no mapping: PocketBase's own collection names (game.yaml would rename participants to game_sessions)
    assert "participants" in plain_tables and "game_sessions" not in plain_tables


def test_unpaused_resync_runs_on_its_schedule_with_the_migrations_params(page, stack, api: Api,
                                                                        shots: Path) -> None:
    page.goto(f"{stack.url}/dags/pocketbase_resync")
    page.get_by_text("* * * * *").first.wait_for()  # PBM_RESYNC_SCHEDULE
    before = api.run_ids("pocketbase_resync")
    assert api.get("/dags/pocketbase_resync")["is_paused"] is True  # created paused
    page.locator("[data-scope=switch][data-part=control]").first.click()  # the pause toggle beside the name
    deadline = time.monotonic() + 15
    while api.get("/dags/pocketbase_resync")["is_paused"] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert api.get("/dags/pocketbase_resync")["is_paused"] is False
    run_id = api.new_run("pocketbase_resync", before, timeout=90)
    run = api.wait("pocketbase_resync", run_id)
    assert run["run_type"] == "scheduled" and run["state"] == "success", api.failed_log("pocketbase_resync", run_id)
    assert not run["conf"]  # a scheduled run has no conf: the recorded params did it

    page.goto(f"{stack.url}/dags/pocketbase_resync/runs/{quote(run_id, safe='')}")
    page.get_by_text("Success").first.wait_for()
    page.screenshot(path=str(shots / "scheduled_resync.png"), full_page=True)
    with psycopg.connect(stack.pg_url) as conn:
        synced = {r[0] for r in conn.execute("SELECT collection FROM pbm_meta.resyncs WHERE resync_id = %s "
                                             "AND target_schema = 'game'", (run_id,))}
    # the DAG's default mapping is game.yaml; the held run's empty mapping was used (else: refused)
    assert {"users", "participants", "matches"} <= synced
