"""The incremental re-sync against a real PocketBase server changed through its API.

Each test builds its own small game-like PocketBase (authors, posts with a cascade relation and a
multi relation, tags created without autodate fields, so without `updated`), loads it with the
migration's own task functions, changes PocketBase through the REST API and re-syncs. A test passes
when the target equals a fresh snapshot of PocketBase by `compare_ranges` and by the values read back.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import psycopg
import pytest

from pbdev.pbserver import PocketBaseServer, check
from pbmigrate import resync, tasks
from pbmigrate.plan.mapping import load_mapping
from pbmigrate.plan.model import build_plan
from pbmigrate.source.snapshot import take_snapshot
from pbmigrate.source.sqlite import SqliteSource

EMAIL, PASSWORD = "root@example.com", "root-pass-12345"
AUTHORS, TAGS, POSTS = 12, 30, 30


@dataclass
class Env:
    pb: PocketBaseServer
    pb_data: Path
    pg_url: str
    target: str
    run: dict
    authors: list[str]
    tags: list[str]
    posts: list[str]

    def resync(self, **kwargs: object) -> dict:
        args: dict = {"source_path": str(self.pb_data), "target_schema": self.target, "mapping": "",
                      "collections": [], "pg_url": self.pg_url, "resync_id": f"resync-{time.monotonic_ns()}",
                      "range_rows": 5}
        args.update(kwargs)
        return resync.run_resync(**args)

    def create(self, collection: str, data: dict) -> str:
        return self.pb.create_record(collection, data)["id"]

    def update(self, collection: str, rid: str, data: dict) -> dict:
        return check(self.pb.admin.patch(f"/api/collections/{collection}/records/{rid}", json=data))

    def delete(self, collection: str, rid: str) -> None:
        check(self.pb.admin.delete(f"/api/collections/{collection}/records/{rid}"))

    def query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with psycopg.connect(self.pg_url, autocommit=True) as conn:
            return conn.execute(sql.replace("{s}", f'"{self.target}_staging"'), args).fetchall()

    def differences(self, schema: str | None = None) -> dict[str, list[dict]]:
        """compare_ranges of every table against a fresh snapshot: {} when the target has converged."""
        snap = take_snapshot(self.pb_data, self.pb_data.parent / "check" / "data.db")
        source = SqliteSource(snap.path)
        out: dict[str, list[dict]] = {}
        try:
            plan = build_plan(source.catalog(), load_mapping(""))
            with psycopg.connect(self.pg_url, autocommit=True) as conn:
                for t in plan.tables:
                    diffs = resync.compare_ranges(conn, source, t, schema or f"{self.target}_staging",
                                                run_id=self.run["run_id"], range_rows=5)
                    bad = [d.as_dict() for d in diffs if not d.equal]
                    if bad:
                        out[t.name] = bad
        finally:
            source.close()
        return out


def _schema(pb: PocketBaseServer) -> None:
    pb.create_collection({"name": "authors", "fields": [
        {"name": "name", "type": "text"},
        {"name": "score", "type": "number"},
    ], "indexes": ["CREATE UNIQUE INDEX idx_authors_name ON authors (name)"]})
    pb.create_collection({"name": "tags", "autodate": False, "fields": [{"name": "label", "type": "text"}]})
    pb.create_collection({"name": "posts", "fields": [
        {"name": "title", "type": "text"},
        {"name": "author", "type": "relation", "collection": "authors", "cascadeDelete": True},
        {"name": "tags", "type": "relation", "collection": "tags", "maxSelect": 5},
    ]})


@pytest.fixture
def env(tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
        ) -> Iterator[Env]:
    monkeypatch.setenv("PBM_WORK_DIR", str(tmp_path / "work"))
    target = "rs_" + request.node.name.removeprefix("test_")[:30].lower()
    pb_data = tmp_path / "pb_data"
    with PocketBaseServer(pb_data) as pb:
        pb.create_superuser(EMAIL, PASSWORD)
        pb.session(EMAIL, PASSWORD)
        _schema(pb)
        authors = [pb.create_record("authors", {"name": f"author {i}", "score": i})["id"] for i in range(AUTHORS)]
        tags = [pb.create_record("tags", {"label": f"tag {i}"})["id"] for i in range(TAGS)]
        posts = [pb.create_record("posts", {"title": f"post {i}", "author": authors[i % AUTHORS],
                                            "tags": [tags[i % TAGS], tags[(i * 7 + 3) % TAGS]]})["id"]
                 for i in range(POSTS)]
        params = tasks.run_params(source_path=str(pb_data), target_schema=target, mapping="", batch_size=8,
                                     collections=[], orphans=getattr(request, "param", "reject"))
        run = tasks.prepare(params=params, pg_url=pg_url, dag_run_id=f"full-{target}")
        tasks.create_schema(run, pg_url)
        for batch in tasks.plan_batches(run):
            tasks.run_batch(run, batch, pg_url)
        tasks.finalize_run(run, pg_url)
        yield Env(pb, pb_data, pg_url, target, run, authors, tags, posts)


def _figures(summary: dict, collection: str) -> tuple[int, int, int]:
    c = summary["collections"][collection]
    return c["inserted"], c["updated"], c["deleted"]


def test_inserts_updates_and_deletes_between_runs_all_arrive(env: Env) -> None:
    new_author = env.create("authors", {"name": "newcomer", "score": 99})
    new_post = env.create("posts", {"title": "fresh", "author": new_author, "tags": [env.tags[5], env.tags[1]]})
    env.update("authors", env.authors[1], {"score": 1234.5})
    env.update("posts", env.posts[2], {"title": "retitled", "tags": [env.tags[9]]})
    env.delete("posts", env.posts[3])
    env.delete("authors", env.authors[0])  # cascades to posts 0, 12 and 24 inside PocketBase

    summary = env.resync()

    assert _figures(summary, "authors") == (1, 1, 1)
    assert _figures(summary, "posts") == (1, 1, 4)
    assert _figures(summary, "tags") == (0, 0, 0)
    assert env.differences() == {}
    assert env.query("SELECT score FROM {s}.authors WHERE id = %s", (env.authors[1],)) == [(1234.5,)]
    assert env.query("SELECT target_id, position FROM {s}.posts_tags WHERE owner_id = %s ORDER BY position",
                     (new_post,)) == [(env.tags[5], 0), (env.tags[1], 1)]
    assert env.query("SELECT target_id FROM {s}.posts_tags WHERE owner_id = %s", (env.posts[2],)) == [(env.tags[9],)]
    assert env.query("SELECT count(*) FROM {s}.posts WHERE id = ANY(%s)",
                     ([env.posts[0], env.posts[3], env.posts[12], env.posts[24]],)) == [(0,)]
    # The same figures are in pbm_meta, and the watermark moved to the newest `updated` read.
    rows = env.query("SELECT collection, inserted, updated, deleted FROM pbm_meta.resyncs WHERE resync_id = %s "
                     "AND collection <> 'users' ORDER BY collection", (summary["resync_id"],))
    assert rows == [("authors", 1, 1, 1), ("posts", 1, 1, 4), ("tags", 0, 0, 0)]
    newest = env.pb.list_all("posts", sort="-updated")[0]["updated"]
    (mark,) = env.query("SELECT updated_at FROM pbm_meta.watermarks WHERE target_schema = %s AND collection = 'posts'",
                        (env.target,))[0]
    assert resync.pb_timestamp(mark) == newest.replace("T", " ")


def test_collection_without_updated_converges_by_range_checksums(env: Env) -> None:
    env.update("tags", env.tags[7], {"label": "renamed"})
    extra = env.create("tags", {"label": "brand new"})
    env.delete("tags", env.tags[10])  # PocketBase unsets it from the posts that held it

    summary = env.resync()

    tags = summary["collections"]["tags"]
    assert tags["mode"] == "checksum"
    assert (tags["inserted"], tags["updated"], tags["deleted"]) == (1, 1, 1)
    assert 1 <= tags["ranges_recopied"] <= 3 < tags["ranges_compared"]
    assert env.differences() == {}
    assert env.query("SELECT label FROM {s}.tags WHERE id = ANY(%s) ORDER BY label", ([env.tags[7], extra],)) == [
        ("brand new",), ("renamed",)]
    assert env.query("SELECT count(*) FROM {s}.posts_tags WHERE target_id = %s", (env.tags[10],)) == [(0,)]


def test_two_resyncs_without_change_write_nothing(env: Env) -> None:
    env.update("posts", env.posts[5], {"title": "changed once"})
    env.update("tags", env.tags[2], {"label": "changed once"})
    env.resync()
    tables = ("authors", "posts", "tags", "posts_tags")
    before = {t: env.query(f"SELECT ctid::text, xmin::text FROM {{s}}.{t} ORDER BY 1") for t in tables}

    summary = env.resync()  # the changed rows are still inside the overlap window

    assert summary["totals"] == {"inserted": 0, "updated": 0, "deleted": 0, "rejected": 0}
    assert {t: env.query(f"SELECT ctid::text, xmin::text FROM {{s}}.{t} ORDER BY 1") for t in tables} == before
    assert summary["collections"]["posts"]["rows_read"] >= 1


def test_update_made_during_a_resync_is_caught_by_the_next(env: Env) -> None:
    rid = env.authors[4]
    stop = threading.Event()
    writes: list[tuple[datetime, int]] = []

    def writer() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            env.update("authors", rid, {"score": n})
            writes.append((datetime.now().astimezone(), n))

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        while len(writes) < 5:
            time.sleep(0.01)
        first = env.resync()
        finished = datetime.fromisoformat(first["finished_at"])
        while not any(t > finished for t, _ in writes):
            time.sleep(0.01)
    finally:
        stop.set()
        thread.join()
    snapshot_at = datetime.fromisoformat(first["snapshot_at"])
    during = [n for t, n in writes if snapshot_at < t < finished]
    assert during, "no update landed while the re-sync ran"
    last = writes[-1][1]
    (seen,) = env.query("SELECT score FROM {s}.authors WHERE id = %s", (rid,))[0]
    assert seen < last  # the snapshot could not see the later writes

    second = env.resync()

    assert second["collections"]["authors"]["updated"] == 1
    assert env.query("SELECT score FROM {s}.authors WHERE id = %s", (rid,)) == [(float(last),)]
    assert env.differences() == {}


def test_rejected_rows_follow_the_full_load_rules_and_clear_when_fixed(env: Env) -> None:
    bad = env.authors[2]
    env.update("authors", bad, {"name": "nul\u0000byte"})

    first = env.resync()

    assert first["collections"]["authors"]["rejected"] == 1
    assert first["collections"]["posts"]["rejected"] == 3  # their author is gone: dangling, as the load rules
    rejects = env.query("SELECT collection, record_id, field, stage FROM pbm_meta.rejects WHERE run_id = %s "
                        "ORDER BY collection, record_id", (env.run["run_id"],))
    assert ("authors", bad, "name", "resync") in rejects
    assert sorted(r[1] for r in rejects if r[0] == "posts") == sorted(env.posts[i] for i in (2, 14, 26))
    assert env.query("SELECT count(*) FROM {s}.authors WHERE id = %s", (bad,)) == [(0,)]
    assert env.differences() == {}
    source = SqliteSource(first["snapshot_path"])
    try:
        plan = build_plan(source.catalog(), load_mapping(""))
        with psycopg.connect(env.pg_url, autocommit=True) as conn:
            posts = resync.compare_collection(conn, source, plan.table_for("posts"), f"{env.target}_staging",
                                            run_id=env.run["run_id"])
    finally:
        source.close()
    assert posts["equal"] and (posts["source_rows"], posts["rejected"], posts["target_rows"]) == (POSTS, 3, POSTS - 3)

    env.update("authors", bad, {"name": "fixed"})
    second = env.resync()

    assert _figures(second, "authors")[0] == 1 and _figures(second, "posts")[0] == 3
    assert env.query("SELECT count(*) FROM pbm_meta.rejects WHERE run_id = %s", (env.run["run_id"],)) == [(0,)]
    assert env.differences() == {}


@pytest.mark.parametrize("env", ["null"], indirect=True)
def test_null_policy_unsets_relations_to_a_rejected_record_and_restores_them(env: Env) -> None:
    bad = env.authors[2]
    env.update("authors", bad, {"name": "nul\u0000byte"})

    first = env.resync()

    assert first["collections"]["authors"]["rejected"] == 1 and first["collections"]["posts"]["rejected"] == 0
    owned = [env.posts[i] for i in (2, 14, 26)]
    assert env.query("SELECT count(*) FROM {s}.posts WHERE id = ANY(%s) AND author IS NULL", (owned,)) == [(3,)]
    assert env.differences() == {}  # the nulled relations are what the orphans policy says

    env.update("authors", bad, {"name": "fixed"})
    second = env.resync()

    assert second["collections"]["authors"]["inserted"] == 1 and second["collections"]["posts"]["updated"] == 3
    assert env.query("SELECT count(*) FROM {s}.posts WHERE id = ANY(%s) AND author = %s", (owned, bad)) == [(3,)]
    assert env.differences() == {}


def test_unique_values_moving_between_records_converge(env: Env) -> None:
    a, b, c, d = env.authors[5:9]
    env.update("authors", a, {"name": "moved away"})  # a releases a name that b takes
    env.update("authors", b, {"name": "author 5"})
    env.update("authors", c, {"name": "parked"})  # c and d swap theirs
    env.update("authors", d, {"name": "author 7"})
    env.update("authors", c, {"name": "author 8"})

    first = env.resync()

    assert first["collections"]["authors"]["updated"] == 2  # the release and take land at once
    assert first["collections"]["authors"]["rejected"] == 2  # a swap cannot, inside one transaction
    reasons = env.query("SELECT reason FROM pbm_meta.rejects WHERE run_id = %s AND collection = 'authors'",
                        (env.run["run_id"],))
    assert all(r[0].startswith("duplicate value under unique index idx_authors_name") for r in reasons)
    assert env.differences() == {}  # nothing unexplained: the rejects account for what is missing

    second = env.resync()

    assert second["collections"]["authors"]["inserted"] == 2
    assert env.query("SELECT count(*) FROM pbm_meta.rejects WHERE run_id = %s", (env.run["run_id"],)) == [(0,)]
    names = dict(env.query("SELECT id, name FROM {s}.authors WHERE id = ANY(%s)", ([a, b, c, d],)))
    assert names == {a: "moved away", b: "author 5", c: "author 8", d: "author 7"}
    assert env.differences() == {}


def test_api_mode_resync_reads_changes_through_the_server(env: Env) -> None:
    """Without a data.db the server filters the changed rows and returns missing ones by id; the
    load's column converters take the pages as they take a snapshot's rows."""
    api = {"url": env.pb.url, "email": EMAIL, "password": PASSWORD}
    new_author = env.create("authors", {"name": "through the api", "score": 7})
    env.update("posts", env.posts[4], {"title": "paged", "tags": [env.tags[2], env.tags[8]]})
    env.update("tags", env.tags[3], {"label": "relabelled"})
    env.delete("posts", env.posts[5])

    summary = env.resync(source_path="", api=api)

    assert summary["snapshot_path"] is None
    assert _figures(summary, "authors") == (1, 0, 0)
    assert _figures(summary, "posts") == (0, 1, 1)
    assert _figures(summary, "tags") == (0, 1, 0)
    assert env.query("SELECT target_id FROM {s}.posts_tags WHERE owner_id = %s ORDER BY position",
                     (env.posts[4],)) == [(env.tags[2],), (env.tags[8],)]
    assert env.query("SELECT score FROM {s}.authors WHERE id = %s", (new_author,)) == [(7.0,)]
    assert env.differences() == {}


def test_the_first_resync_vacuums_the_loaded_tables_so_the_walk_reads_the_index_only(env: Env) -> None:
    """Every run hashes every id range; on a heap with its visibility map unset each id costs a
    heap visit, and autovacuum may be off or behind after the bulk load."""
    env.resync()

    assert env.query("SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                     "WHERE n.nspname = %s AND c.relname = ANY(%s) AND c.relallvisible < c.relpages",
                     (f"{env.target}_staging", ["authors", "posts", "tags"])) == []


def test_resync_after_cutover_refuses_unless_forced(env: Env) -> None:
    with psycopg.connect(env.pg_url, autocommit=True) as conn:  # what the cut-over leaves behind
        conn.execute(f'ALTER SCHEMA "{env.target}_staging" RENAME TO "{env.target}"')
        conn.execute("UPDATE pbm_meta.runs SET status = 'promoted' WHERE run_id = %s", (env.run["run_id"],))
        conn.execute("INSERT INTO pbm_meta.cutovers (run_id, target_schema, action, backend) "
                     "VALUES (%s, %s, 'cutover', 'postgres')", (env.run["run_id"], env.target))
    env.update("authors", env.authors[3], {"score": -1})

    with pytest.raises(resync.ResyncRefused, match=r"cut over to PostgreSQL.*no longer the source of truth"):
        env.resync()

    forced = env.resync(force=True)
    assert forced["schema"] == env.target and forced["forced"] is True
    with psycopg.connect(env.pg_url, autocommit=True) as conn:
        assert conn.execute(f'SELECT score FROM "{env.target}".authors WHERE id = %s',
                            (env.authors[3],)).fetchone() == (-1.0,)
    assert env.differences(schema=env.target) == {}


def test_a_migration_after_the_cut_over_can_be_resynced_again(env: Env) -> None:
    with psycopg.connect(env.pg_url, autocommit=True) as conn:  # the first load was cut over
        conn.execute(f'ALTER SCHEMA "{env.target}_staging" RENAME TO "{env.target}"')
        conn.execute("UPDATE pbm_meta.runs SET status = 'promoted' WHERE run_id = %s", (env.run["run_id"],))
        conn.execute("INSERT INTO pbm_meta.cutovers (run_id, target_schema, action, backend) "
                     "VALUES (%s, %s, 'cutover', 'postgres')", (env.run["run_id"], env.target))
    with pytest.raises(resync.TargetCutOver):
        env.resync()
    params = tasks.run_params(source_path=str(env.pb_data), target_schema=env.target, mapping="", batch_size=8,
                                 collections=[], orphans="reject")
    run = tasks.prepare(params=params, pg_url=env.pg_url, dag_run_id=f"again-{env.target}")  # cutover=manual
    tasks.create_schema(run, env.pg_url)
    for batch in tasks.plan_batches(run):
        tasks.run_batch(run, batch, env.pg_url)
    tasks.finalize_run(run, env.pg_url)
    env.update("authors", env.authors[2], {"score": 99})

    summary = env.resync()

    assert summary["run_id"] == run["run_id"] and summary["schema"] == f"{env.target}_staging"
    assert _figures(summary, "authors") == (0, 1, 0) and not summary["forced"]
    assert env.differences() == {}


def test_resync_waits_for_a_migration_holding_the_target(env: Env) -> None:
    with resync.target_lock(env.pg_url, env.target, shared=True, holder="pbmigrate migration"), \
            pytest.raises(resync.TargetBusy, match="pbmigrate migration"):
        env.resync(lock_wait_seconds=0.5)
    assert env.resync()["totals"]["inserted"] == 0


def test_resync_refuses_params_that_differ_from_the_migration(env: Env) -> None:
    with pytest.raises(resync.ResyncRefused, match="param collections"):
        env.resync(collections=["posts"])


def test_final_sync_returns_the_run_for_the_gates(env: Env) -> None:
    env.update("posts", env.posts[7], {"title": "last words"})

    run = resync.final_sync(source_path=str(env.pb_data), target_schema=env.target, mapping="", collections=[],
                          pg_url=env.pg_url, dag_run_id="manual__final")

    assert run["run_id"] == env.run["run_id"] and run["resynced"] is True
    assert run["staging_schema"] == f"{env.target}_staging"
    assert Path(run["snapshot_path"]).is_file() and run["snapshot_path"] != env.run["snapshot_path"]
    assert run["resync"]["totals"]["updated"] == 1
    with psycopg.connect(env.pg_url, autocommit=True) as conn:
        assert resync.last_resync(conn, env.run["run_id"])["resync_id"] == "final:manual__final"


DAG_RUN = """
import json, sys
sys.path.insert(0, {scripts!r})
from pathlib import Path
import airflow_local
airflow_local.configure(Path({home!r}), pg_url={pg_url!r}, retry_delay=0.1, work_dir=Path({work!r}))
dag = airflow_local.load_dag("pocketbase_resync")
print("DAG", json.dumps({{"schedule": str(dag.schedule), "catchup": dag.catchup,
                         "max_active_runs": dag.max_active_runs, "params": sorted(dag.params.keys())}}))
run = dag.test(run_conf={conf!r})
print("STATE", run.state, run.run_id)
"""


def test_resync_dag_runs_the_engine_on_its_schedule(env: Env, tmp_path: Path) -> None:
    import subprocess
    import sys

    env.update("posts", env.posts[1], {"title": "through Airflow"})
    script = DAG_RUN.format(scripts=str(Path(__file__).resolve().parents[2] / "scripts"), home=str(tmp_path / "af"),
                            pg_url=env.pg_url, work=str(tmp_path / "work"),
                            conf={"source_path": str(env.pb_data), "target_schema": env.target, "mapping": ""})
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240,
                          env={**__import__("os").environ, "PBM_RESYNC_SCHEDULE": "*/5 * * * *"})
    lines = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in proc.stdout.splitlines()
             if line.startswith(("DAG ", "STATE "))}
    assert "STATE" in lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    import json

    dag = json.loads(lines["DAG"])
    assert dag["schedule"] == "*/5 * * * *" and dag["catchup"] is False and dag["max_active_runs"] == 1
    assert {"source_path", "target_schema", "mapping", "collections", "overlap_seconds", "force"} <= set(dag["params"])
    state, run_id = lines["STATE"].split()
    assert state == "success", proc.stderr[-3000:]
    assert env.query("SELECT collection, updated FROM pbm_meta.resyncs WHERE resync_id = %s AND updated > 0",
                     (run_id,)) == [("posts", 1)]
