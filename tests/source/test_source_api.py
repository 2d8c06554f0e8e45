"""ApiSource against real PocketBase servers of each generation (0.22.27, 0.23.12, 0.40.6).

The API source must give exactly what SqliteSource reads from the same data.db (a read-only
snapshot taken while the server runs), minus the secrets the API never returns, so one converter
serves both. The data mixes records PocketBase wrote itself (every field type, HTML characters in
JSON, json values of each kind, files) with > 1000 rows written by sqlite3 while the server was
stopped, whose ids put quotes on page boundaries and upper case before lower case.
"""

from __future__ import annotations

import http.server
import random
import socket
import sqlite3
import string
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from pbdev.pbserver import PocketBaseServer
from pbmigrate.errors import SourceError
from pbmigrate.source.api import SECRETS_WARNING, ApiSource, _split_points
from pbmigrate.source.catalog import Collection, Field
from pbmigrate.source.pbclient import Retryable, never_sent
from pbmigrate.source.snapshot import take_snapshot
from pbmigrate.source.sqlite import SqliteSource

EMAIL, PASSWORD = "root@example.com", "root-pass-12345"
BULK_ROWS = 2500  # past both perPage caps (500 on 0.22, 1000 on 0.23+)
PNG = bytes.fromhex(
    "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
    "1f15c4890000000d49444154789c6360f8cfc0f01f0005000201e2263ca30000000049454e44ae426082"
)


@dataclass
class Env:
    server: PocketBaseServer
    snapshot: Path
    bulk_ids: list[str]

    def api(self, **kwargs: object) -> ApiSource:
        return ApiSource(self.server.url, EMAIL, PASSWORD, **kwargs)  # type: ignore[arg-type]


def _at_least(version: str, minimum: tuple[int, int]) -> bool:
    return tuple(int(p) for p in version.split(".")[:2]) >= minimum


def _posts_spec(server: PocketBaseServer) -> dict:
    fields: list[dict] = [
        {"name": "title", "type": "text"},
        {"name": "body", "type": "editor"},
        {"name": "count", "type": "number"},
        {"name": "intnum", "type": "number", "onlyInt": True},
        {"name": "flag", "type": "bool"},
        {"name": "contact", "type": "email"},
        {"name": "site", "type": "url"},
        {"name": "published", "type": "date"},
        {"name": "status", "type": "select", "values": ["draft", "published"]},
        {"name": "labels", "type": "select", "values": ["a", "b&c", "<d>", "é"], "maxSelect": 3},
        {"name": "cover", "type": "file"},
        {"name": "gallery", "type": "file", "maxSelect": 5},
        {"name": "author", "type": "relation", "collection": "users"},
        {"name": "tagrefs", "type": "relation", "collection": "tags", "maxSelect": 10},
        {"name": "meta", "type": "json"},
    ]
    if server.generation >= 23:
        fields += [
            {"name": "secret", "type": "password"},
            {"name": "touched", "type": "autodate", "onCreate": False, "onUpdate": True},
        ]
    if _at_least(server.version, (0, 27)):
        fields.append({"name": "location", "type": "geoPoint"})
    return {"name": "posts", "fields": fields}


def _populate(server: PocketBaseServer) -> None:
    """Records written by PocketBase itself, through the API."""
    server.create_collection({"name": "tags", "fields": [{"name": "label", "type": "text"}]})
    server.create_collection(_posts_spec(server))
    server.create_collection({"name": "bulk", "fields": [
        {"name": "title", "type": "text"},
        {"name": "n", "type": "number"},
        {"name": "flag", "type": "bool"},
        {"name": "tags", "type": "select", "values": ["a", "b", "c"], "maxSelect": 3},
        {"name": "meta", "type": "json"},
    ]})
    tags = [server.create_record("tags", {"label": t})["id"] for t in ("x", "y", "z")]
    users = [
        server.create_record("users", {"email": f"u{i}@example.com", "password": "user-pass-123",
                                       "passwordConfirm": "user-pass-123", "name": f"User <{i}>"})["id"]
        for i in range(2)
    ]
    full = {
        "title": 'Hello "world" ünïcødé <&> a\u0000b', "body": "<p>Hi <b>there</b></p>",
        "count": 3.14, "intnum": 42, "flag": True, "contact": "x@example.com",
        "site": "https://example.com/a?b=c&d=e", "published": "2024-06-30T10:00:00+02:00",
        "status": "published", "labels": ["b&c", "<d>", "é"], "author": users[0],
        "tagrefs": [tags[2], tags[0]], "meta": {"k": [1, 2.5, {"z": None}], "s": "<x>é\u2028", "a": 1},
    }
    if server.generation >= 23:
        full["secret"] = "s3cret-pass"
    if _at_least(server.version, (0, 27)):
        full["location"] = {"lon": 23.32, "lat": 42.69}
    server.create_record("posts", full)
    for meta in (True, False, 1.5, 123, 9007199254740993, "hello", "", [], [1, "<"], None):
        server.create_record("posts", {"title": f"meta {meta!r}", "meta": meta})
    server.create_record("posts", {"title": "empty"})
    server.create_record("posts", {"title": "files", "count": -5},
                         files={"cover": [("my cover.png", PNG, "image/png")],
                                "gallery": [("a.png", PNG, "image/png"), ("b.png", PNG, "image/png")]})


def _bulk_ids() -> list[str]:
    """Byte-sorted ids: upper case first, quotes and backslashes at the 500/1000 page boundaries."""
    ids = [f"B{i:014d}" for i in range(5)] + [f"b{i:014d}" for i in range(5, BULK_ROWS)]
    for pos in (499, 999, 1499):
        ids[pos] = ids[pos - 1] + "'"  # sorts between its neighbours
    ids[1999] = ids[1998] + "\\'q"
    ids[1000] = ids[999] + "\\z"  # a backslash (0.40 reads \\ in filters, older ones do not)
    return ids


def _insert_bulk(data_db: Path, ids: list[str]) -> None:
    """Rows in PocketBase's storage form, written while the server is stopped."""
    rows = []
    for i, rid in enumerate(ids):
        meta = (None, i, i + 0.5, f'{{"k":{i}}}', "true")[i % 5]
        tags = ('["a","c"]', "[]", '["b"]')[i % 3]
        n = i * 1.5 if i % 2 else i
        stamp = f"2024-01-01 00:00:{i % 60:02d}.{i % 1000:03d}Z"
        rows.append((rid, f"row {i} <&> é", n, i % 2, tags, meta, stamp, stamp))
    conn = sqlite3.connect(data_db)
    try:
        with conn:
            conn.executemany(
                "INSERT INTO bulk (id, title, n, flag, tags, meta, created, updated) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
    finally:
        conn.close()


@pytest.fixture(scope="module", params=["0.22.27", "0.23.12", None], ids=["v0.22", "v0.23", "v0.40"])
def env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    base = tmp_path_factory.mktemp(f"api-{request.param or 'latest'}")
    server = PocketBaseServer(base / "pb_data", version=request.param)
    server.create_superuser(EMAIL, PASSWORD)
    try:
        server.start()
        _populate(server)
        server.stop()
        ids = _bulk_ids()
        _insert_bulk(server.data_dir / "data.db", ids)
        server.start()
        snap = take_snapshot(server.data_dir, base / "snapshot.db")
        yield Env(server, Path(snap.path), sorted(ids))
    finally:
        server.stop()


def _masked(api: ApiSource, coll: Collection, rows: list[tuple]) -> list[tuple]:
    """SQLite rows with the columns the API cannot return set to None."""
    hidden = {i for i, f in enumerate(coll.fields) if f.name in api.unexported_fields(coll)}
    return [tuple(None if i in hidden else v for i, v in enumerate(r)) for r in rows]


def test_rows_and_ids_equal_the_sqlite_snapshot(env: Env) -> None:
    api, lite = env.api(), SqliteSource(env.snapshot)
    try:
        api_cat, lite_cat = api.catalog(), lite.catalog()
        assert api_cat.generation == lite_cat.generation == env.server.generation
        names = {c.name for c in lite_cat.migrating()}
        assert {"posts", "tags", "bulk", "users"} <= names
        assert names == {c.name for c in api_cat.migrating()}
        for name in sorted(names):
            coll = api_cat.get(name)
            assert coll.fields == lite_cat.get(name).fields, name
            expected = list(lite.rows(lite_cat.get(name)))
            assert list(api.rows(coll)) == _masked(api, coll, expected), name
            assert list(api.ids(coll)) == list(lite.ids(lite_cat.get(name))), name
            assert api.count(coll) == lite.count(lite_cat.get(name)) == len(expected), name
    finally:
        api.close()
        lite.close()


def test_secrets_come_out_as_none_and_are_warned_about(env: Env) -> None:
    api = env.api()
    try:
        users = api.catalog().get("users")
        secret_cols = {"tokenKey", "passwordHash" if env.server.generation == 22 else "password"}
        assert secret_cols <= set(api.unexported_fields(users))
        positions = [i for i, f in enumerate(users.fields) if f.name in secret_cols]
        rows = list(api.rows(users))
        assert len(rows) == 2
        assert all(r[i] is None for r in rows for i in positions)
        assert api.warnings()[0] == SECRETS_WARNING
        assert "password hashes or token keys" in SECRETS_WARNING
    finally:
        api.close()


def test_paging_past_the_server_cap_reads_every_row_once(env: Env) -> None:
    api = env.api()
    try:
        bulk = api.catalog().get("bulk")
        ids = list(api.ids(bulk))
        assert ids == env.bulk_ids  # byte order: 'B...' before 'b...', quoted ids in place
        assert len(ids) == len(set(ids)) == BULK_ROWS
    finally:
        api.close()


def test_range_bounds_match_sqlite(env: Env) -> None:
    api, lite = env.api(), SqliteSource(env.snapshot)
    try:
        bulk, lbulk = api.catalog().get("bulk"), lite.catalog().get("bulk")
        ids = env.bulk_ids
        cases = [
            (ids[499], ids[1999]),  # bounds that need quoting
            (ids[1000], ids[1999]),  # a backslash in a bound
            (ids[0], ids[4]),
            (None, ids[1000]),
            (ids[2400], None),
            (ids[10] + "0", ids[20] + "0"),  # bounds that are not ids
            (ids[30], ids[30]),
            (ids[40], ids[39]),  # empty
        ]
        for lo, hi in cases:
            expected = list(lite.rows(lbulk, lo, hi))
            assert list(api.rows(bulk, lo, hi)) == _masked(api, bulk, expected), (lo, hi)
            unordered = list(api.rows(bulk, lo, hi, ordered=False))  # two cursors at once
            assert sorted(unordered, key=lambda r: r[0]) == _masked(api, bulk, expected), (lo, hi)
            assert list(api.ids(bulk, lo, hi)) == list(lite.ids(lbulk, lo, hi)), (lo, hi)
    finally:
        api.close()
        lite.close()


def test_rows_since_and_rows_by_ids_let_the_server_filter(env: Env) -> None:
    api, lite = env.api(), SqliteSource(env.snapshot)
    try:
        bulk, lbulk = api.catalog().get("bulk"), lite.catalog().get("bulk")
        pos = [f.name for f in bulk.fields].index("updated")
        everything = _masked(api, bulk, list(lite.rows(lbulk)))
        since = "2024-01-01 00:00:50.000Z"  # the stamps cycle through seconds 00-59
        changed = list(api.rows_since(bulk, "updated", since))
        assert changed == [r for r in everything if r[pos] >= since]
        assert 0 < len(changed) < BULK_ROWS

        ids = env.bulk_ids
        wanted = [ids[2499], ids[0], ids[999], ids[1000], ids[1999], "nope-not-an-id", *ids[1200:1450]]
        by_id = {r[0]: r for r in everything}
        expected = [by_id[i] for i in sorted(set(wanted)) if i in by_id]
        assert list(api.rows_by_ids(bulk, wanted)) == expected  # several requests, quoted ids too
        assert list(api.rows_by_ids(bulk, [])) == []
    finally:
        api.close()
        lite.close()


def test_server_restart_mid_read_yields_every_row_exactly_once(env: Env) -> None:
    api, lite = env.api(retries=6), SqliteSource(env.snapshot)
    stopped = threading.Event()
    errors: list[BaseException] = []

    def restart() -> None:
        try:
            env.server.stop()
            stopped.set()
            time.sleep(1.5)
            env.server.start()
        except BaseException as exc:  # surfaced by the assertion below
            errors.append(exc)
            stopped.set()

    try:
        bulk = api.catalog().get("bulk")
        expected = _masked(api, bulk, list(lite.rows(lite.catalog().get("bulk"))))
        got: list[tuple] = []
        thread = threading.Thread(target=restart)
        for row in api.rows(bulk):
            got.append(row)
            if len(got) == 700:
                thread.start()
                assert stopped.wait(30)
                assert not env.server.running
        thread.join(60)
        assert not errors
        assert api.retried >= 1  # a page request really met the stopped server
        assert got == expected
    finally:
        api.close()
        lite.close()
        if not env.server.running:
            env.server.start()


def test_expired_or_rejected_token_logs_in_again(env: Env) -> None:
    api = env.api()
    try:
        tags = api.catalog().get("tags")
        assert api.logins == 1
        api.http.auth.token = "not-a-token"
        assert api.count(tags) == 3  # 401/403, then a fresh login
        assert api.logins == 2
        api.http.auth.expires = 0  # as if the token were about to expire
        assert len(list(api.ids(tags))) == 3
        assert api.logins == 3
        # the token rides on each request: threads sharing the session never see its headers change
        assert "Authorization" not in api.http.session.headers
    finally:
        api.close()


def test_wrong_password_names_the_server(env: Env) -> None:
    with pytest.raises(SourceError, match="wrong email or password") as err:
        ApiSource(env.server.url, EMAIL, "not-the-password")
    assert env.server.url in str(err.value)
    assert "not-the-password" not in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_collection_is_a_source_error(env: Env) -> None:
    api = env.api()
    try:
        ghost = Collection("nope", "nope", "base", False, (Field("id", "text", primary_key=True),))
        with pytest.raises(SourceError, match="unknown collection 'nope'"):
            list(api.rows(ghost))
    finally:
        api.close()


def test_backup_create_and_download_gives_a_zip_with_data_db(env: Env, tmp_path: Path) -> None:
    api = env.api()
    try:
        with pytest.raises(SourceError, match="must match"):
            api.create_backup("Bad Name.zip")
        key = api.create_backup()
        assert key.startswith("pbmigrate_") and key.endswith(".zip")
        assert key in {b["key"] for b in api.list_backups()}
        path = api.download_backup(key, tmp_path)
        assert path == tmp_path / key
        with zipfile.ZipFile(path) as zf:
            assert "data.db" in zf.namelist()
        named = api.create_backup("pbm_named-1.zip")
        assert api.download_backup(named, tmp_path / "copy.zip").is_file()
        api.delete_backup(key)
        api.delete_backup(named)
    finally:
        api.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_url_is_a_one_line_source_error() -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    started = time.monotonic()
    with pytest.raises(SourceError, match="Connection refused") as err:
        ApiSource(url, EMAIL, PASSWORD, retries=1)
    assert url in str(err.value) and "\n" not in str(err.value)
    assert time.monotonic() - started < 5


def test_a_web_server_that_is_not_pocketbase_is_refused() -> None:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"<html>hello</html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        with pytest.raises(SourceError, match="not a PocketBase server") as err:
            ApiSource(url, EMAIL, PASSWORD, retries=0)
        assert url in str(err.value)
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_split_points_cut_a_range_of_random_ids_evenly() -> None:
    rnd = random.Random(3)
    ids = sorted("".join(rnd.choices(string.ascii_lowercase + string.digits, k=15)) for _ in range(20_000))
    for lo, hi, parts in [(None, None, 2), (ids[0], ids[-1], 3), (ids[5000], ids[9000], 2)]:
        cuts = _split_points(lo, hi, parts)
        assert len(cuts) == parts - 1 and cuts == sorted(cuts)
        inside = [i for i in ids if (lo is None or i >= lo) and (hi is None or i <= hi)]
        sizes = [sum(1 for i in inside if a <= i < b) for a, b in zip(["", *cuts], [*cuts, "\uffff"])]
        assert sum(sizes) == len(inside)
        assert max(sizes) - min(sizes) < len(inside) * 0.05, sizes  # about equal parts
    assert _split_points("abc", "abc", 2) == []  # nothing strictly inside: one cursor
    assert all("B" < c <= "b~" for c in _split_points("B", "b~", 4))  # odd characters: still in range


def test_a_refused_connection_is_known_unsent_by_its_type_not_its_text() -> None:
    """A request that is not idempotent may be repeated only when the server cannot have seen
    it: told from urllib3's exception type (the old check searched repr(exc) for a class name)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    try:
        requests.post(f"http://127.0.0.1:{port}/api/backups", timeout=5)
    except requests.ConnectionError as exc:
        refused = exc
    assert never_sent(refused)
    assert not never_sent(requests.ReadTimeout("read timed out"))  # sent: the server may have acted
    assert not never_sent(requests.ConnectionError("Connection aborted"))
    assert not never_sent(Retryable("HTTP 503"))
