"""A PocketBase whose own file storage is S3: real PocketBase servers (0.22.27, 0.40.6, and 0.40.6
with its settings encrypted by `--encryptionEnv`) store uploads in a bucket of moto's standalone
server (the S3 protocol only); the pipeline reads the bucket from PocketBase's `_params` settings in
the snapshot and copies the files to the default directory store. The S3 secret must not reach
the ledger, the rejects, the tasks' return values (XCom) or the logs.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import boto3
import psycopg
import pytest

from pbdev.pbserver import PocketBaseServer
from pbmigrate.errors import ParamError
from pbmigrate.files import settings as pb_settings
from tests.conftest import moto_server
from tests.files.test_files import PNG, SUPERUSER, copy_all, dir_store, file_check, load_run, names_of

ACCESS_KEY = "pbm-source-access"
SECRET = f"pbm-S3-secret-{uuid.uuid4().hex}"  # searched for wherever the pipeline writes
KEY_VAR = "PBM_TEST_PB_SETTINGS_KEY"
ENC_KEY = uuid.uuid4().hex  # 32 characters, as PocketBase's --encryptionEnv wants
BIG = os.urandom(2 * 1024 * 1024 + 5)  # several copy chunks, one S3 part (PocketBase uploads it whole)
SENT = {
    "my avatar ü 1.png": (PNG, "image/png"),
    "résumé final.txt": ("Grüße, ünïcødé ✓\n".encode(), "text/plain"),
    "big blob.bin": (BIG, "application/octet-stream"),
    "secret contract.pdf": (b"%PDF-1.4 protected\n", "application/pdf"),
}


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> str:
    with moto_server(tmp_path_factory.mktemp("moto") / "moto.log") as url:
        yield url


def _client(url: str):
    return boto3.client("s3", endpoint_url=url, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET,
                        region_name="us-east-1")


@pytest.fixture(scope="module", params=["0.22.27", "0.40.6", "0.40.6-encrypted"])
def built(request, s3, tmp_path_factory) -> dict:
    """A pb_data whose PocketBase keeps its files in a moto bucket, uploads made through its API."""
    version, _, mode = request.param.partition("-")
    bucket = f"pb-files-{request.param.replace('.', '-')}"
    _client(s3).create_bucket(Bucket=bucket)
    pb_data = tmp_path_factory.mktemp(f"s3src_{request.param}") / "pb_data"
    env = {KEY_VAR: ENC_KEY} if mode else {}
    os.environ.update(env)
    try:
        with PocketBaseServer(pb_data, version=version, encryption_env=KEY_VAR if mode else None) as pb:
            pb.create_superuser(*SUPERUSER)
            pb.session(*SUPERUSER)
            resp = pb.admin.patch("/api/settings", json={"s3": {
                "enabled": True, "bucket": bucket, "region": "us-east-1", "endpoint": s3, "accessKey": ACCESS_KEY,
                "secret": SECRET, "forcePathStyle": True}})
            assert resp.status_code == 200, resp.text
            pb.create_collection({"name": "uploads", "fields": [
                {"name": "title", "type": "text"}, {"name": "avatar", "type": "file"},
                {"name": "gallery", "type": "file", "maxSelect": 4},
                {"name": "contract", "type": "file", "protected": True}]})
            f = {k: (k, *v) for k, v in SENT.items()}
            pb.create_record("uploads", {"title": "full"}, files={
                "avatar": [f["my avatar ü 1.png"]], "gallery": [f["résumé final.txt"], f["big blob.bin"]],
                "contract": [f["secret contract.pdf"]]})
            for i in range(6):
                pb.create_record("uploads", {"title": f"bulk {i}"},
                                 files={"gallery": [(f"bulk {i}.txt", os.urandom(3000), "text/plain")]})
            coll_id = pb.collection("uploads")["id"]
    finally:
        for k in env:
            os.environ.pop(k, None)
    return {"version": version, "encrypted": bool(mode), "pb_data": pb_data, "bucket": bucket,
            "collection_id": coll_id}


@pytest.fixture
def pb_data(built, tmp_path, monkeypatch) -> Path:
    dest = tmp_path / "pb_data"
    shutil.copytree(built["pb_data"], dest)
    monkeypatch.setenv("PBM_WORK_DIR", str(tmp_path / "work"))
    if built["encrypted"]:
        monkeypatch.setenv("PB_ENCRYPTION_KEY", ENC_KEY)
    return dest


def _pbm_meta_dump(pg_url: str) -> str:
    with psycopg.connect(pg_url) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'pbm_meta'")]
        return "".join(json.dumps(conn.execute(f'SELECT json_agg(t) FROM pbm_meta."{t}" t').fetchone()[0])
                       for t in tables)


def test_files_in_pocketbases_own_s3_bucket_are_copied_and_proven(built, pb_data, fresh_pg_url, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    # PocketBase wrote the uploads to the bucket only: a copy that read pb_data/storage would find nothing
    assert not [p for p in (pb_data / "storage").rglob("*") if p.is_file()]
    if built["encrypted"]:
        raw = (pb_data / "data.db").read_bytes()
        assert SECRET.encode() not in raw and b'"s3"' not in raw  # the settings really are ciphertext
    store = dir_store(tmp_path)
    run = load_run(pb_data, fresh_pg_url, "s3s")
    results = copy_all(run, fresh_pg_url, store)
    assert sum(r["copied"] for r in results) == 4 + 6 and sum(r["missing"] for r in results) == 0
    root = tmp_path / "store"
    rec = names_of(fresh_pg_url, "s3s_staging", "full")
    got = {}
    for name in [rec["avatar"], *rec["gallery"], rec["contract"]]:
        attrs = json.loads((root / f"uploads/{rec['id']}/{name}.attrs").read_text())
        got[attrs["user.metadata"]["original-filename"]] = ((root / f"uploads/{rec['id']}/{name}").read_bytes(),
                                                            attrs["user.content_type"], attrs["md5"])
    for original, (data, ctype) in SENT.items():
        assert got[original][0] == data, original  # byte-equal, found by the original name kept in S3 metadata
        assert got[original][1].split(";")[0] == ctype
        assert got[original][2] == base64.b64encode(hashlib.md5(data).digest()).decode()  # the bucket's ETag md5
    check_ = file_check(run, fresh_pg_url, store)
    assert check_.success and check_.observed["verified"] == 10 and check_.observed["md5_checked"] == 10
    # a retry reads nothing again
    assert sum(r["copied"] for r in copy_all(run, fresh_pg_url, store)) == 0
    # the secret reached none of: the ledger and every other pbm_meta table (rejects included),
    # the tasks' return values and the run (XCom), the logs
    assert SECRET not in _pbm_meta_dump(fresh_pg_url)
    assert SECRET not in json.dumps([run, results])
    assert SECRET not in caplog.text
    assert any(f"s3://{built['bucket']} (" in r.getMessage() for r in caplog.records)  # it did log the source


def test_an_object_deleted_from_the_bucket_behind_pocketbases_back_is_a_reject(built, pb_data, fresh_pg_url, s3,
                                                                               tmp_path):
    if built["version"] != "0.40.6" or built["encrypted"]:
        pytest.skip("one version is enough for the reject path")
    store = dir_store(tmp_path)
    run = load_run(pb_data, fresh_pg_url, "s3m")
    rec = names_of(fresh_pg_url, "s3m_staging", "full")
    client = _client(s3)
    key = f"{built['collection_id']}/{rec['id']}/{rec['avatar']}"
    saved = client.get_object(Bucket=built["bucket"], Key=key)["Body"].read()
    client.delete_object(Bucket=built["bucket"], Key=key)
    try:
        results = copy_all(run, fresh_pg_url, store)
    finally:
        client.put_object(Bucket=built["bucket"], Key=key, Body=saved)  # the module's other tests use the bucket
    assert sum(r["missing"] for r in results) == 1 and sum(r["copied"] for r in results) == 9
    with psycopg.connect(fresh_pg_url) as conn:
        rejects = conn.execute("SELECT record_id, field, reason, stage FROM pbm_meta.rejects WHERE run_id = %s",
                               (run["run_id"],)).fetchall()
    assert rejects == [(rec["id"], "avatar", f"missing file: {rec['avatar']} is not in PocketBase's S3 bucket "
                                             f"{built['bucket']} ({built['collection_id']}/{rec['id']}/)", "files")]
    assert SECRET not in _pbm_meta_dump(fresh_pg_url)


def test_encrypted_settings_without_the_key_or_with_another_fail_in_one_line(built, pb_data, fresh_pg_url,
                                                                            tmp_path, monkeypatch):
    if not built["encrypted"]:
        pytest.skip("only encrypted settings need the key")
    run = load_run(pb_data, fresh_pg_url, "s3k")  # the rows need no key: only the files do
    monkeypatch.delenv("PB_ENCRYPTION_KEY")
    with pytest.raises(ParamError) as no_key:
        copy_all(run, fresh_pg_url, dir_store(tmp_path))
    monkeypatch.setenv("PB_ENCRYPTION_KEY", uuid.uuid4().hex)
    with pytest.raises(ParamError) as wrong_key:
        copy_all(run, fresh_pg_url, dir_store(tmp_path))
    for exc in (no_key, wrong_key):
        assert "\n" not in str(exc.value) and SECRET not in str(exc.value) and ENC_KEY not in str(exc.value)
        assert "--encryptionEnv" in str(exc.value)
    assert "set PB_ENCRYPTION_KEY" in str(no_key.value) and "do not decrypt" in str(wrong_key.value)
    # PBM_PB_ENCRYPTION_ENV names the variable PocketBase itself reads, so one secret serves both
    monkeypatch.delenv("PB_ENCRYPTION_KEY")
    monkeypatch.setenv("PBM_PB_ENCRYPTION_ENV", KEY_VAR)
    monkeypatch.setenv(KEY_VAR, ENC_KEY)
    assert pb_settings.encryption_key() == ENC_KEY
    assert sum(r["copied"] for r in copy_all(run, fresh_pg_url, dir_store(tmp_path))) == 10


def test_the_migration_dag_moves_the_bucket_and_the_secret_stays_out_of_airflow_redis_and_reports(
        built, pb_data, fresh_pg_url, redis_url, run_dag, tmp_path, caplog, capfd):
    if built["version"] != "0.40.6" or built["encrypted"]:
        pytest.skip("one DAG run is enough")
    caplog.set_level(logging.DEBUG)
    conf = {"source_path": str(pb_data), "mapping": "", "target_schema": "s3dag", "batch_size": 4,
            "max_reject_ratio": 0, "cutover": "auto"}  # auto: backups, report, cache warm-up into Redis
    dr = run_dag("pocketbase_migration", conf, pg_url=fresh_pg_url, redis_url=redis_url)
    assert dr.state == "success"
    with psycopg.connect(fresh_pg_url) as conn:
        stored = conn.execute("SELECT count(*) FILTER (WHERE status = 'done'), count(md5) FROM pbm_meta.files"
                              ).fetchone()
        checked = conn.execute("SELECT bool_and(success), sum((observed->>'verified')::int) FROM pbm_meta.checks "
                               "WHERE check_name = 'files'").fetchone()
    assert stored == (10, 10) and checked == (True, 10)
    import redis as redis_lib

    client = redis_lib.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(count=1000))
        assert keys  # the cut-over wrote to Redis: what is searched is not empty
        values = b"".join(client.dump(k) or b"" for k in keys)
    finally:
        client.close()
    assert SECRET.encode() not in values and not any(SECRET.encode() in k for k in keys)
    from tests.conftest import AIRFLOW_HOME

    # Airflow's metadata DB (XCom, task instances) and its task logs; our work dir (reports,
    # backups), except the snapshot and its backup: copies of data.db, settings and all, as
    # PocketBase keeps them
    seen = []
    for root in (AIRFLOW_HOME, tmp_path / "work"):
        for p in root.rglob("*"):
            if not p.is_file() or (root != AIRFLOW_HOME and p.read_bytes().startswith(b"SQLite format 3")):
                continue
            seen.append(p.name)
            assert SECRET.encode() not in p.read_bytes(), p
    assert "airflow.db" in seen and any(n.endswith(".md") for n in seen)  # XCom and the run's report were read
    import sqlite3

    with contextlib.closing(sqlite3.connect(AIRFLOW_HOME / "airflow.db")) as adb:
        xcom = adb.execute("SELECT task_id, CAST(value AS TEXT) FROM xcom WHERE dag_id = 'pocketbase_migration'"
                           ).fetchall()
    assert any("bytes_copied" in (v or "") for _, v in xcom)  # the files tasks' XCom was searched
    assert not any(SECRET in (v or "") for _, v in xcom)
    assert SECRET not in _pbm_meta_dump(fresh_pg_url)
    out, err = capfd.readouterr()
    assert SECRET not in caplog.text + out + err


def test_resync_follows_a_file_replaced_in_pocketbases_bucket_through_the_api(built, pb_data, fresh_pg_url,
                                                                             tmp_path, monkeypatch):
    if built["version"] != "0.40.6" or built["encrypted"]:
        pytest.skip("one version is enough for the re-sync")
    from pbdev.pbserver import check
    from pbmigrate import resync

    store = dir_store(tmp_path)
    monkeypatch.setenv("PBM_FILES_URL", store["url"])  # the re-sync finds the store as the DAG gives it
    root = tmp_path / "store"
    run = load_run(pb_data, fresh_pg_url, "s3r")
    copy_all(run, fresh_pg_url, None)
    with psycopg.connect(fresh_pg_url, autocommit=True) as conn:
        conn.execute("UPDATE pbm_meta.runs SET status = 'validated' WHERE run_id = %s", (run["run_id"],))
    new_bytes = b"replaced in the bucket \xc3\xbc\n"
    with PocketBaseServer(pb_data, version=built["version"]) as pb:  # the last test of its bucket: it may write
        pb.session(*SUPERUSER)
        (rec,) = pb.list_all("uploads", filter="title='bulk 0'")
        check(pb.admin.patch(f"/api/collections/uploads/records/{rec['id']}",
                             files=[("gallery", ("new ü.txt", new_bytes, "text/plain"))]))
        (new,) = pb.list_all("uploads", filter="title='bulk 0'")[0]["gallery"]
    (old,) = rec["gallery"]
    summary = resync.run_resync(source_path=str(pb_data), target_schema="s3r", mapping="", collections=["uploads"],
                                pg_url=fresh_pg_url, resync_id="s3-resync", overlap_seconds=3600)
    assert summary["totals"]["updated"] == 1
    assert (root / f"uploads/{rec['id']}/{new}").read_bytes() == new_bytes  # read from the bucket
    assert not (root / f"uploads/{rec['id']}/{old}").exists()
    ok = file_check(run, fresh_pg_url, None)
    assert ok.success and ok.observed["verified"] == 10 and ok.observed["md5_checked"] == 10
    assert SECRET not in _pbm_meta_dump(fresh_pg_url)
