"""Files move with their records: real PocketBase servers (0.22.27 and 0.40.6) receive uploads
through their API (multipart), the pipeline copies them to a real store (a directory; S3 through
moto's standalone server for the protocol only), validation re-reads every object, and re-sync
follows files replaced through the API.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from pbdev.pbserver import PocketBaseServer, check
from pbmigrate import context, files, resync, tasks
from pbmigrate.audit import meta
from pbmigrate.cutover import promote
from pbmigrate.validate import quality, report
from tests.conftest import moto_server

ROOT = Path(__file__).resolve().parents[2]
SUPERUSER = ("root@example.com", "root-pass-12345")
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360f8cfc0f01f0005000201e2263ca30000000049454e44ae426082"
)
BIG = os.urandom(3 * 1024 * 1024 + 17)  # larger than a copy chunk: streamed in pieces
KILL_RECORDS = 40


@pytest.fixture(autouse=True)
def work_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PBM_WORK_DIR", str(tmp_path / "work"))
    return tmp_path / "work"


def _spec() -> dict:
    return {"name": "uploads", "fields": [
        {"name": "title", "type": "text"},
        {"name": "avatar", "type": "file"},
        {"name": "gallery", "type": "file", "maxSelect": 4},
        {"name": "contract", "type": "file", "protected": True},
    ]}


def _record_id(pb: PocketBaseServer, title: str) -> str:
    return pb.list_all("uploads", filter=f"title='{title}'")[0]["id"]


@pytest.fixture(scope="module", params=["0.22.27", "0.40.6"])
def built(request, tmp_path_factory) -> dict:
    """A pb_data with uploads made through the API, and what was uploaded (by original name)."""
    version = request.param
    pb_data = tmp_path_factory.mktemp(f"files_{version}") / "pb_data"
    sent = {
        "my avatar ü 1.png": (PNG, "image/png"),
        "résumé final.txt": ("Grüße, ünïcødé ✓\n".encode(), "text/plain"),
        "big blob.bin": (BIG, "application/octet-stream"),
        "secret contract.pdf": (b"%PDF-1.4 protected\n", "application/pdf"),
        "second.png": (PNG + b"\x00", "image/png"),
    }
    with PocketBaseServer(pb_data, version=version) as pb:
        pb.create_superuser(*SUPERUSER)
        pb.session(*SUPERUSER)
        pb.create_collection(_spec())
        f = {k: (k, *v) for k, v in sent.items()}
        pb.create_record("uploads", {"title": "full"}, files={
            "avatar": [f["my avatar ü 1.png"]], "gallery": [f["résumé final.txt"], f["big blob.bin"]],
            "contract": [f["secret contract.pdf"]]})
        pb.create_record("uploads", {"title": "avatar only"}, files={"avatar": [f["second.png"]]})
        pb.create_record("uploads", {"title": "no files"})
        for i in range(KILL_RECORDS):
            pb.create_record("uploads", {"title": f"bulk {i}"}, files={
                "gallery": [(f"bulk {i}.txt", os.urandom(20_000) + str(i).encode(), "text/plain")]})
        coll_id = pb.collection("uploads")["id"]
    return {"version": version, "pb_data": pb_data, "sent": sent, "collection_id": coll_id}


@pytest.fixture
def pb_data(built, tmp_path) -> Path:
    """A private copy of the built pb_data (tests delete and replace files)."""
    dest = tmp_path / "pb_data"
    shutil.copytree(built["pb_data"], dest)
    return dest


def dir_store(tmp_path: Path) -> dict:
    return {"url": (tmp_path / "store").as_uri(), "options": {}}


def load_run(pb_data: Path | None, pg_url: str, target: str, api: dict | None = None) -> dict:
    """prepare, schema and data as the DAG runs them; the run dict."""
    params = tasks.run_params(source_path=str(pb_data) if pb_data else "", target_schema=target, mapping="",
                                 batch_size=1000, collections=["uploads"], orphans="reject")
    run = tasks.prepare(params=params, pg_url=pg_url, dag_run_id=f"test_{target}", api=api)
    tasks.create_schema(run, pg_url, api=api)
    for b in tasks.plan_batches(run, api=api):
        tasks.run_batch(run, b, pg_url, api=api)
    tasks.finalize_run(run, pg_url, api=api)
    return run


def copy_all(run: dict, pg_url: str, store: dict | None, api: dict | None = None) -> list[dict]:
    return [files.copy_batch(run, b, pg_url, store, api=api)
            for b in files.plan_file_batches(run, pg_url, api=api, files=store)]


def file_check(run: dict, pg_url: str, store: dict, api: dict | None = None) -> meta.Check:
    source = context.open_run_source(run, api)
    try:
        plan = context.run_plan(run, source)
    finally:
        source.close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        (check_,) = files.file_checks(conn, plan, run, store)
    return check_


def names_of(pg_url: str, schema: str, title: str) -> dict:
    with psycopg.connect(pg_url) as conn:
        rid, avatar, gallery, contract = conn.execute(
            f"SELECT id, avatar, gallery, contract FROM {schema}.uploads WHERE title = %s", (title,)).fetchone()
    return {"id": rid, "avatar": avatar, "gallery": gallery, "contract": contract}


def _attrs(store_root: Path, key: str) -> dict:
    return json.loads((store_root / (key + ".attrs")).read_text())


def test_uploads_are_copied_byte_equal_with_content_type_and_original_name(built, pb_data, fresh_pg_url, tmp_path):
    store = dir_store(tmp_path)
    run = load_run(pb_data, fresh_pg_url, "fl")
    results = copy_all(run, fresh_pg_url, store)
    assert sum(r["copied"] for r in results) == 4 + 1 + KILL_RECORDS and sum(r["missing"] for r in results) == 0
    root = tmp_path / "store"
    rec = names_of(fresh_pg_url, "fl_staging", "full")
    by_original = {}
    for name in [rec["avatar"], *rec["gallery"], rec["contract"]]:
        key = f"uploads/{rec['id']}/{name}"
        attrs = _attrs(root, key)
        by_original[attrs["user.metadata"]["original-filename"]] = ((root / key).read_bytes(),
                                                                    attrs["user.content_type"])
        src = pb_data / "storage" / built["collection_id"] / rec["id"] / name
        assert (root / key).read_bytes() == src.read_bytes()
        assert attrs["user.content_type"] == json.loads(Path(f"{src}.attrs").read_text())["user.content_type"]
    for original, (data, ctype) in built["sent"].items():
        if original == "second.png":
            continue
        assert by_original[original][0] == data, original  # byte-equal, found by its original name
        assert by_original[original][1].split(";")[0] == ctype  # PocketBase's own, e.g. "; charset=utf-8"
    assert not list(root.rglob("thumbs_*"))  # derived: never copied
    assert json.loads((root / "_collections.json").read_text()) == {built["collection_id"]: "uploads"}
    with psycopg.connect(fresh_pg_url) as conn:
        ledger = conn.execute("SELECT count(*), sum(size), count(md5) FROM pbm_meta.files WHERE run_id = %s "
                              "AND status = 'done'", (run["run_id"],)).fetchone()
    stored = [p for p in root.rglob("*") if p.is_file() and p.suffix != ".attrs" and p.name != "_collections.json"]
    assert ledger[0] == 45 and ledger[1] == sum(p.stat().st_size for p in stored)
    assert ledger[2] == 45  # every source file had PocketBase's md5 in its .attrs: all checked
    ok = file_check(run, fresh_pg_url, store)
    assert ok.success and ok.observed["verified"] == 45 and ok.observed["md5_checked"] == 45
    # a retry of every task copies nothing
    again = copy_all(run, fresh_pg_url, store)
    assert sum(r["copied"] for r in again) == 0 and sum(r["skipped"] for r in again) == 45
    # the report shows files and bytes per collection
    with psycopg.connect(fresh_pg_url, autocommit=True) as conn:
        rep = report.build(conn, run)
    uploads = next(c for c in rep["collections"] if c["collection"] == "uploads")
    assert uploads["files"] == {"files": 45, "bytes": ledger[1], "missing": 0}
    assert "## Files" in report.render_markdown(rep)
    # an object altered in the store after the copy fails the proof
    (root / f"uploads/{rec['id']}/{rec['avatar']}").write_bytes(PNG[:-1] + b"\x01")
    bad = file_check(run, fresh_pg_url, store)
    assert not bad.success and bad.observed["sha256_mismatch"] == 1 and bad.observed["md5_mismatch"] == 1


def test_api_mode_downloads_protected_files_with_a_file_token(built, pb_data, fresh_pg_url, tmp_path):
    store = dir_store(tmp_path)
    with PocketBaseServer(pb_data, version=built["version"]) as pb:
        api = {"url": pb.url, "email": SUPERUSER[0], "password": SUPERUSER[1]}
        rid = _record_id(pb, "full")
        contract = pb.list_all("uploads", filter="title='full'")[0]["contract"]
        if built["version"] != "0.22.27":  # 0.22 served protected files without a token
            assert pb.admin.get(f"/api/files/uploads/{rid}/{contract}").status_code in (401, 403, 404)
        run = load_run(None, fresh_pg_url, "fa", api=api)
        results = copy_all(run, fresh_pg_url, store, api=api)
        assert sum(r["copied"] for r in results) == 45 and sum(r["missing"] for r in results) == 0
        root = tmp_path / "store"
        assert (root / f"uploads/{rid}/{contract}").read_bytes() == built["sent"]["secret contract.pdf"][0]
        assert _attrs(root, f"uploads/{rid}/{contract}")["user.content_type"] == "application/pdf"
        ok = file_check(run, fresh_pg_url, store, api=api)
        assert ok.success and ok.observed["verified"] == 45
    with psycopg.connect(fresh_pg_url) as conn:  # the file token never lands anywhere
        dump = json.dumps(conn.execute("SELECT json_agg(f) FROM pbm_meta.files f").fetchone()[0])
        dump += json.dumps(conn.execute("SELECT json_agg(r) FROM pbm_meta.rejects r").fetchone()[0])
    assert "token" not in dump


def test_file_deleted_from_storage_behind_pocketbases_back_is_a_reject(built, pb_data, fresh_pg_url, tmp_path):
    if built["version"] != "0.40.6":
        pytest.skip("one version is enough for the reject path")
    import sqlite3

    store = dir_store(tmp_path)
    with sqlite3.connect(pb_data / "data.db") as raw:  # a script wrote a path where a name belongs
        raw.execute("UPDATE uploads SET avatar = '../../../escaped.png' WHERE title = 'no files'")
    run = load_run(pb_data, fresh_pg_url, "fm")
    rec = names_of(fresh_pg_url, "fm_staging", "avatar only")
    bad = names_of(fresh_pg_url, "fm_staging", "no files")
    (pb_data / "storage" / built["collection_id"] / rec["id"] / rec["avatar"]).unlink()
    results = copy_all(run, fresh_pg_url, store)
    assert sum(r["missing"] for r in results) == 2 and sum(r["copied"] for r in results) == 44
    assert not list(tmp_path.rglob("escaped.png"))
    with psycopg.connect(fresh_pg_url, autocommit=True) as conn:
        rejects = conn.execute("SELECT collection, record_id, field, reason, stage FROM pbm_meta.rejects "
                               "WHERE run_id = %s ORDER BY reason", (run["run_id"],)).fetchall()
        assert rejects == [
            ("uploads", bad["id"], "avatar", "bad file name: unsafe file name '../../../escaped.png': not a single "
                                             "path component", "files"),
            ("uploads", rec["id"], "avatar", f"missing file: {rec['avatar']} is not in PocketBase's storage "
                                             f"({built['collection_id']}/{rec['id']}/)", "files")]
        check_ = file_check(run, fresh_pg_url, store)
        assert check_.success and check_.observed["rejected"] == 2  # explained by the rejects...
        quality.record_checks(conn, run["run_id"], [check_])
        # ... and the rows are still loaded, so the row count expects them
        assert quality.ledger_counts(conn, run["run_id"])["uploads"]["expected"] == 3 + KILL_RECORDS
    verdict = promote.gate(run, fresh_pg_url, 0.0)  # ... which the gate counts like a row's
    assert not verdict["promote"] and verdict["rejected"] == 2
    assert promote.gate(run, fresh_pg_url, 0.5)["promote"]
    # the file comes back: a retry of the task settles it, and the reject is gone
    shutil.copy(built["pb_data"] / "storage" / built["collection_id"] / rec["id"] / rec["avatar"],
                pb_data / "storage" / built["collection_id"] / rec["id"] / rec["avatar"])
    again = copy_all(run, fresh_pg_url, store)
    assert sum(r["copied"] for r in again) == 1 and sum(r["missing"] for r in again) == 1


KILL_AFTER = 20  # copies returned before the copying process SIGKILLs itself, 3 more in flight

# The copy kills itself when its KILL_AFTER-th copy returns, while its other workers are inside theirs
# (opening the source is slowed so they are): no parent polling the store against the clock, so CPU
# load cannot move the kill to before the 10th copy or after the last one.
_KILLED_COPY = """
import json, os, signal, sys, threading, time
from pbmigrate import files
from pbmigrate.files import copy as files_copy
orig_open, orig_copy = files.LocalStorage.open, files_copy.copy_one
returned, lock = [0], threading.Lock()
def slow(self, *a):
    time.sleep(0.05)
    return orig_open(self, *a)
def counted(*a):
    out = orig_copy(*a)
    with lock:
        returned[0] += 1
        if returned[0] == KILL_AFTER:
            os.kill(os.getpid(), signal.SIGKILL)
    return out
files.LocalStorage.open = slow
files_copy.copy_one = counted  # looked up by copy_refs at each call
files_copy.LEDGER_ROWS = 7  # read by copy_refs where it lives
run, batch, pg_url, store, KILL_AFTER = json.loads(sys.argv[1])
files.copy_batch(run, batch, pg_url, store)
"""


def test_a_retry_after_a_kill_in_the_middle_of_a_collection_copies_nothing_twice(built, pb_data, fresh_pg_url,
                                                                                 tmp_path, monkeypatch):
    if built["version"] != "0.40.6":
        pytest.skip("one version is enough for the kill")
    store = dir_store(tmp_path)
    root = tmp_path / "store"
    run = load_run(pb_data, fresh_pg_url, "fk")
    (batch,) = files.plan_file_batches(run, fresh_pg_url, files=store)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "include"), os.environ.get("PYTHONPATH", "")])}
    spec = json.dumps([run, batch, fresh_pg_url, store, KILL_AFTER])
    proc = subprocess.run([sys.executable, "-c", _KILLED_COPY, spec], env=env, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    # what the kill left committed (data and a complete `.attrs`); a file cut off inside its copy
    # or its `.attrs` is not committed, and the retry must copy it again
    opened = files.open_store(store)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*.attrs")
              if opened.head(str(p.relative_to(root))[:-len(".attrs")]) is not None}
    assert KILL_AFTER <= len(before) < 45  # killed in the middle of the collection
    with psycopg.connect(fresh_pg_url) as conn:
        (ledgered,) = conn.execute("SELECT count(*) FROM pbm_meta.files WHERE run_id = %s", (run["run_id"],)).fetchone()
    assert ledgered <= len(before)  # the ledger lags the store by up to LEDGER_ROWS copies
    puts: list[str] = []
    put = files.FileStore.put
    monkeypatch.setattr(files.FileStore, "put", lambda self, key, *a, **k: puts.append(key) or put(self, key, *a, **k))
    retry = files.copy_batch(run, batch, fresh_pg_url, store)
    assert len(puts) == len(set(puts)) == retry["copied"] == 45 - len(before)
    assert not {f"{root}/{k}.attrs" for k in puts} & {str(p) for p in before}  # none copied again
    assert all(p.stat().st_mtime_ns == m for p, m in before.items())
    assert retry["skipped"] == ledgered and retry["adopted"] == len(before) - ledgered
    assert file_check(run, fresh_pg_url, store).observed["verified"] == 45


def test_resync_copies_a_file_replaced_through_the_api_and_removes_the_old_one(built, pb_data, fresh_pg_url,
                                                                                tmp_path, monkeypatch):
    store = dir_store(tmp_path)
    monkeypatch.setenv("PBM_FILES_URL", store["url"])
    root = tmp_path / "store"
    run = load_run(pb_data, fresh_pg_url, "fr")
    copy_all(run, fresh_pg_url, None)  # through PBM_FILES_URL, as the re-sync will
    with psycopg.connect(fresh_pg_url, autocommit=True) as conn:
        conn.execute("UPDATE pbm_meta.runs SET status = 'validated' WHERE run_id = %s", (run["run_id"],))
    with PocketBaseServer(pb_data, version=built["version"]) as pb:
        pb.session(*SUPERUSER)
        rid = _record_id(pb, "avatar only")
        old = pb.list_all("uploads", filter="title='avatar only'")[0]["avatar"]
        new_bytes = PNG + b"replaced avatar"
        check(pb.admin.patch(f"/api/collections/uploads/records/{rid}",
                             files=[("avatar", ("replaced ö.png", new_bytes, "image/png"))]))
        gone = _record_id(pb, "bulk 3")
        gone_name = pb.list_all("uploads", filter="title='bulk 3'")[0]["gallery"][0]
        check(pb.admin.delete(f"/api/collections/uploads/records/{gone}"))
        new = pb.list_all("uploads", filter="title='avatar only'")[0]["avatar"]
    assert new != old
    summary = resync.run_resync(source_path=str(pb_data), target_schema="fr", mapping="", collections=["uploads"],
                              pg_url=fresh_pg_url, resync_id="resync-1", overlap_seconds=3600)
    assert summary["totals"]["updated"] == 1 and summary["totals"]["deleted"] == 1
    assert (root / f"uploads/{rid}/{new}").read_bytes() == new_bytes
    assert _attrs(root, f"uploads/{rid}/{new}")["user.content_type"] == "image/png"
    assert not (root / f"uploads/{rid}/{old}").exists() and not (root / f"uploads/{rid}/{old}.attrs").exists()
    assert not (root / f"uploads/{gone}/{gone_name}").exists()
    ok = file_check(run, fresh_pg_url, None)
    assert ok.success and ok.observed["verified"] == 44 and ok.observed["stale_ledger_rows"] == 0
    again = resync.run_resync(source_path=str(pb_data), target_schema="fr", mapping="", collections=["uploads"],
                            pg_url=fresh_pg_url, resync_id="resync-2", overlap_seconds=3600)
    assert again["totals"] == {"inserted": 0, "updated": 0, "deleted": 0, "rejected": 0}
    # the pre-cut-over backup lists the files it covers
    with psycopg.connect(fresh_pg_url, autocommit=True) as conn:
        meta.ensure_meta(conn)
        done = promote.backup(conn, run, fresh_pg_url)
    listed = next(b for b in done if b["kind"] == "files")
    lines = Path(listed["path"]).read_text().splitlines()
    assert json.loads(lines[0]) == {"store": files.safe_store_url(store["url"]), "files": 44}
    assert {json.loads(line)["key"] for line in lines[1:]} == {
        str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.suffix != ".attrs"
        and p.name != "_collections.json"}


@pytest.fixture
def s3_server(tmp_path) -> str:
    """moto's standalone S3 server on a free loopback port, stopped by its pid."""
    with moto_server(tmp_path / "moto.log") as url:
        yield url


def test_s3_store_keeps_bytes_content_type_and_original_name(built, pb_data, fresh_pg_url, s3_server):
    if built["version"] != "0.40.6":
        pytest.skip("the S3 protocol once is enough")
    import boto3

    creds = {"aws_access_key_id": "pbm-test", "aws_secret_access_key": "pbm-test-secret", "region_name": "us-east-1"}
    s3 = boto3.client("s3", endpoint_url=s3_server, **creds)
    s3.create_bucket(Bucket="game-files")
    store = {"url": "s3://game-files/migrated", "options": {
        "key": creds["aws_access_key_id"], "secret": creds["aws_secret_access_key"],
        "client_kwargs": {"endpoint_url": s3_server, "region_name": "us-east-1"}}}
    run = load_run(pb_data, fresh_pg_url, "fs3")
    results = copy_all(run, fresh_pg_url, store)
    assert sum(r["copied"] for r in results) == 45
    rec = names_of(fresh_pg_url, "fs3_staging", "full")
    big = next(n for n in rec["gallery"] if n.startswith("big"))
    head = s3.head_object(Bucket="game-files", Key=f"migrated/uploads/{rec['id']}/{big}")
    assert head["ContentType"] == "application/octet-stream" and head["ContentLength"] == len(BIG)
    got = s3.get_object(Bucket="game-files", Key=f"migrated/uploads/{rec['id']}/{rec['avatar']}")
    assert got["Body"].read() == PNG and got["ContentType"] == "image/png"
    from urllib.parse import unquote

    assert unquote(got["Metadata"]["original-filename"]) == "my avatar ü 1.png"
    assert got["Metadata"]["md5"] == base64.b64encode(hashlib.md5(PNG).digest()).decode()
    ok = file_check(run, fresh_pg_url, store)
    assert ok.success and ok.observed["verified"] == 45 and ok.observed["md5_checked"] == 45
    with psycopg.connect(fresh_pg_url) as conn:
        stores = conn.execute("SELECT DISTINCT store FROM pbm_meta.files").fetchall()
    assert stores == [("s3://game-files/migrated",)]  # no credentials in the ledger


def test_the_pbm_files_connection_becomes_the_store_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.syspath_prepend(str(ROOT / "plugins"))
    import pbm_airflow

    monkeypatch.delenv("AIRFLOW_CONN_PBM_FILES", raising=False)
    assert pbm_airflow.files_store() is None  # optional: the engine falls back to PBM_FILES_URL / the work dir
    assert files.store_config(None, "game") == {"url": (tmp_path / "work" / "files" / "game").as_uri(), "options": {}}
    monkeypatch.setenv("AIRFLOW_CONN_PBM_FILES", json.dumps({
        "conn_type": "fs", "host": "s3://game-files/uploads", "login": "KEY", "password": "SECRET",
        "extra": {"client_kwargs": {"endpoint_url": "http://minio:9000"}}}))
    assert pbm_airflow.files_store() == {"url": "s3://game-files/uploads", "options": {
        "client_kwargs": {"endpoint_url": "http://minio:9000"}, "key": "KEY", "secret": "SECRET"}}
    monkeypatch.setenv("AIRFLOW_CONN_PBM_FILES", "file:///srv/files/game")
    cfg = pbm_airflow.files_store()
    assert cfg["url"] == "/srv/files/game"
    assert files.FileStore(str(tmp_path / "s"), cfg["options"]).local
    assert files.safe_store_url("s3://KEY:SECRET@game-files/uploads") == "s3://game-files/uploads"
